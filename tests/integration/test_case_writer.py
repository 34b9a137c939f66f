"""The evaluator's case writer on real NATS and chDB: a case is stored once, whatever the cancellation
or republishing (the old writer stored 1,001 to 1,096 rows for 1,000 cases)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from lockgate.bus import Bus
from lockgate.services.evaluator.domain import CaseResult, case_fact
from lockgate.services.evaluator.persist import CaseWriter
from lockgate.services.query.evals import eval_cases
from lockgate.store import Store

pytestmark = pytest.mark.timeout(60)
N = 1000


def results() -> list[CaseResult]:
    return [CaseResult(case_id=f"c{i:04d}", repeat=i % 2, input=f"q{i}", expected=f"a{i}", output=f"a{i}",
                       scores={"exact_match": 1.0}, details={"n": i}) for i in range(N)]


class StallsAfterFirstPublish:
    """The real bus, except that the first publish, once JetStream has stored it, never returns to the
    writer: the moment a cancelled writer used to lose track of rows it had already written."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.subjects = bus.subjects
        self.stored = asyncio.Event()
        self.release = asyncio.Event()

    async def publish(self, subject: str, payload: Any, **kw: Any) -> Any:
        ack = await self.bus.publish(subject, payload, **kw)
        if not self.stored.is_set():
            self.stored.set()
            await self.release.wait()
        return ack


async def test_a_writer_cancelled_mid_flush_and_a_resumed_rerun_store_each_case_once(
    bus: Bus, store: Store, run_services: Any
) -> None:
    run_id = "run-cancelled"
    stalling = StallsAfterFirstPublish(bus)
    first = CaseWriter(stalling, run_id, "r1", batch=64, interval_s=0.01)  # type: ignore[arg-type]

    async def evaluate() -> None:
        for r in results():
            first.add(r)
        await first.close()

    task = asyncio.create_task(evaluate())
    await asyncio.wait_for(stalling.stored.wait(), 10)  # mid-flush: 64 cases in JetStream, not acknowledged
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    # The resumed run has not seen those cases stored, so it publishes every case again, batched otherwise.
    second = CaseWriter(bus, run_id, "r1", batch=100, interval_s=0.01)
    for r in reversed(results()):
        second.add(r)
    await second.close()
    assert second.written == N

    # The cancelled writer's flush finally returns, and its close (called again, as a stop would) sends the rest.
    stalling.release.set()
    await first.close()
    assert first.written == N

    sink = (await run_services("sink"))["sink"].handlers
    facts = await bus.js.stream_info(bus.subjects.streams["facts"].name)
    assert facts.state.messages >= N // 64 + N // 100  # both writers' batches reached the stream
    await sink.progress("eval_cases").wait_for(facts.state.messages)
    assert store.scalar("SELECT count() FROM eval_cases WHERE run_id = {r:String}", {"r": run_id}) == N
    stored = eval_cases(store, run_id, limit=2 * N)
    assert len({(c["case_id"], c["repeat"]) for c in stored}) == len(stored) == N


async def test_the_same_batch_published_twice_is_one_message(bus: Bus) -> None:
    writer = CaseWriter(bus, "run-x", "r1")
    cases = results()[:10]
    one = writer.fact([case_fact(r) for r in cases])
    other = writer.fact([case_fact(r) for r in reversed(cases)])
    assert one.id == other.id  # the id is the batch's keys, not their order
    for fact in (one, other):
        await bus.publish(bus.subjects.eval_cases, fact)
    info = await bus.js.stream_info(bus.subjects.streams["facts"].name)
    assert info.state.messages == 1
