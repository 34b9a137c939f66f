"""A large answer's online scorers run off the event loop, on the whole answer, on the real nats-server (probe p55
F2): an answer of OFF_LOOP characters or more is scored in the evaluator's scoring thread, so the loop the router
shares under `lockgate up` keeps serving, and PII past its first 64 KiB still fails pii_free.

Before, every answer was scored on the event loop: a 900 KB answer held it about 1 s (pii_free, refusal, non_toxic),
and ten of them stalled the router's requests in the same process."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pytest

from lockgate.codec import Codec
from lockgate.contracts import InferenceEvent, InferenceScored
from lockgate.server.service import ServiceContext
from lockgate.services.evaluator import online, online_handler, safety

pytestmark = pytest.mark.timeout(120)
_scored: Codec[InferenceScored] = Codec(InferenceScored)
PII = " write to jane.doe@example.com"


async def test_a_large_answer_is_scored_whole_off_the_event_loop(
        context: ServiceContext, run_services: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    context.settings = context.settings.replace(online_eval_sample=1.0)
    threads: dict[int, int] = {}  # answer length -> the thread pii_free scored it on

    def pii_free(output: str, expected: Any, params: Mapping[str, Any]) -> float:
        threads[len(output)] = threading.get_ident()
        return safety.pii_free(output, expected, params)

    monkeypatch.setitem(online.ONLINE, "pii_free", pii_free)
    bus = context.bus
    scores = await bus.nc.subscribe(bus.subjects.eval_scores("mine"))
    evaluator = (await run_services("evaluator"))["evaluator"].online
    large = "lorem ipsum " * (online_handler.OFF_LOOP // 12 + 1) + PII  # the PII past the first 64 KiB
    events = [InferenceEvent(tenant="evil", app="x", deployment="mine", status="ok", response=text)
              for text in (large, PII)]
    await bus.publish(bus.subjects.inference("x", "evil"), events)
    await evaluator.scored.wait_for(2, timeout_s=30)

    loop = threading.get_ident()  # the test's, the services' and the router's event loop
    assert threads[len(large)] != loop  # before: the loop's
    assert threads[len(PII)] == loop  # a short answer stays on it (no thread's hop for little work)
    got = {s.event_id: s.scores for s in [_scored.decode((await scores.next_msg(timeout=10)).data) for _ in events]}
    assert {got[e.id]["pii_free"] for e in events} == {0.0}  # the whole answer scored: no PII escapes past a cut
