"""Online evaluation of the answers routers served never waits behind applications' events, on the real nats-server
(probe p55 F1): the served answers have a consumer of their own, declared with the inference stream (so a home made
before gets it, and no served answer the other readers took is lost to it), and an event naming a made-up
deployment costs the evaluator no read of the applied state.

Before, one ordered consumer read every tenant's events, served and not, and read a missing document for every
made-up deployment name past the 256 it kept: another tenant's 40,000 events took a canary's scores from 0.2 s to
27-73 s, and its rollout paused past its progress deadline."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest

from lockgate.codec import Codec
from lockgate.contracts import InferenceEvent, InferenceScored
from lockgate.server.service import ServiceContext
from lockgate.services.evaluator import online, online_handler, safety
from tests.integration.test_online_eval_config import _apply, _event, _folder

pytestmark = pytest.mark.timeout(120)
_scored: Codec[InferenceScored] = Codec(InferenceScored)
HOLD = "hold me "  # an answer the held scorer keeps until released


class _Held:
    """pii_free as it is, except that an answer starting with HOLD waits in it until `release`: the applications'
    lane kept busy for as long as the test needs (a flood's backlog, without its timing)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.entered = asyncio.Event()
        self.release = threading.Event()

    def __call__(self, output: str, expected: Any, params: Mapping[str, Any]) -> float:
        if output.startswith(HOLD):
            self.loop.call_soon_threadsafe(self.entered.set)
            self.release.wait(60)
        return safety.pii_free(output, expected, params)


async def test_served_answers_are_scored_while_an_applications_events_wait(
        context: ServiceContext, run_services: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    context.settings = context.settings.replace(online_eval_sample=1.0)
    held = _Held()
    monkeypatch.setitem(online.ONLINE, "pii_free", held)
    evaluator = (await run_services("evaluator"))["evaluator"].online
    bus = context.bus
    try:
        # Another tenant's application: its event is being scored (held), its lane waits for it.
        waiting = InferenceEvent(tenant="evil", app="x", deployment="chat", status="ok",
                                 response=HOLD + "x" * online_handler.OFF_LOOP)
        await bus.publish(bus.subjects.inference("x", "evil"), [waiting])
        await asyncio.wait_for(held.entered.wait(), 30)
        served = [_event(i, "canary") for i in range(5)]
        await bus.publish(bus.subjects.served("shop", "acme"), served)
        # The held event's scores are counted once released: these are the served answers'. Before: a timeout,
        # the served message queued behind the held one on the one consumer.
        await evaluator.scored.wait_for(len(served), timeout_s=30)
        assert not held.release.is_set() and evaluator.scored.count == len(served)
    finally:
        held.release.set()
    await evaluator.scored.wait_for(len(served) + 1, timeout_s=30)  # and the application's, once it is done


DOCUMENTED = "online_eval:\n  sample: {default: 1.0}\n  scorers: [length]\n"


async def test_events_naming_made_up_deployments_read_no_document(
        context: ServiceContext, run_services: Any, tmp_path: Path) -> None:
    context.settings = context.settings.replace(online_eval_sample=1.0)  # every made-up name's events scored
    await _apply(context.bus, context.settings, _folder(tmp_path, DOCUMENTED))  # acme's `chat` has a document
    bus = context.bus
    # Every read of the applied state's keys the server routes (the evaluator's gets, on this same connection).
    bucket = f"KV_{bus.subjects.kv_gitops}"
    gets = [await bus.nc.subscribe(f"$JS.API.STREAM.MSG.GET.{bucket}"),
            await bus.nc.subscribe(f"$JS.API.DIRECT.GET.{bucket}"),
            await bus.nc.subscribe(f"$JS.API.DIRECT.GET.{bucket}.>")]
    scores = await bus.nc.subscribe(bus.subjects.eval_scores("chat"))
    evaluator = (await run_services("evaluator"))["evaluator"].online

    made_up = [InferenceEvent(tenant="evil", app="x", deployment=f"made-up-{i}", status="ok", response="ok")
               for i in range(300)]  # past PLANS_MAX (256): before, each was read again every time
    await bus.publish(bus.subjects.inference("x", "evil"), made_up)
    await bus.publish(bus.subjects.inference("x", "evil"), made_up[:100], msg_id="again")  # the same names again
    own = _event(0, "stable")
    await bus.publish(bus.subjects.inference("shop", "acme"), [own])
    await evaluator.scored.wait_for(len(made_up) + 100 + 1, timeout_s=60)
    await bus.nc.flush()  # the server routed every request sent before it to `gets` already

    assert sum(sub.pending_msgs for sub in gets) == 1  # chat's document, once; before: 401, one per made-up name
    # And the documented deployment is scored by its document's scorers (not the global ones).
    assert _scored.decode((await scores.next_msg(timeout=10)).data).scores == {"length": float(len(own.response or ""))}


async def test_a_home_made_before_gets_the_served_consumer_and_keeps_the_served_answers_for_it(
        context: ServiceContext, run_services: Any) -> None:
    context.settings = context.settings.replace(online_eval_sample=1.0)
    bus = context.bus
    subjects = bus.subjects
    spec = subjects.streams["inference"]
    served_lane, online_lane = subjects.durable("evaluator", "served"), subjects.durable("evaluator", "online")
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await bus.js.delete_consumer(spec.name, served_lane)  # a home made before: one evaluator consumer
    await bus.ensure_topology()  # the upgraded stack's start (its topology owner's connect)

    # Served answers published before the evaluator starts, and taken by every other reader (the old evaluator
    # consumer among them): the stream keeps them only for the served consumer the start declared. Before, there
    # was none, and they were gone unscored.
    served = [_event(i, "canary") for i in range(3)]
    await bus.publish(subjects.served("shop", "acme"), served)
    for durable in spec.readers:  # the stack's (whatever it declares)
        if durable != served_lane:
            sub = await bus.js.pull_subscribe_bind(durable, spec.name)
            for msg in await sub.fetch(1, timeout=10):
                await msg.ack_sync()
            await sub.unsubscribe()

    evaluator = (await run_services("evaluator"))["evaluator"].online
    await evaluator.scored.wait_for(len(served), timeout_s=30)
    # Each lane narrowed to its own subjects: the old consumer to the applications' events.
    filters = {d: (await bus.js.consumer_info(spec.name, d)).config.filter_subject for d in (served_lane, online_lane)}
    assert filters == {served_lane: subjects.served_all, online_lane: subjects.inference_sent}
