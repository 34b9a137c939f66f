"""Only answers a router served are a canary's live evidence, on the real nats-server: an application's events
(its own subject, which any application may publish on) are stored, priced and watched for drift as a whole, but
fill no canary-versus-stable window of the drift monitor, and their online scores are marked not served (the
router's analysis skips those). The router's own evidence subscription is in test_router_drift_replay."""

from __future__ import annotations

from typing import Any

import pytest

from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.contracts import DriftReport, InferenceEvent, InferenceScored
from lockgate.server.service import ServiceContext
from tests.integration.test_drift_restart import _events

pytestmark = pytest.mark.timeout(90)

_reports: Codec[DriftReport] = Codec(DriftReport)
_scores: Codec[InferenceScored] = Codec(InferenceScored)


async def test_an_applications_canary_events_fill_no_canary_window(
        context: ServiceContext, bus: Bus, run_services: Any) -> None:
    window = context.settings.drift_window_size
    drift = (await run_services("drift"))["drift"].handlers
    sub = await bus.nc.subscribe(bus.subjects.drift("chat"))
    # What an application could send naming the deployment's variants: a full stable and canary window, the
    # canary's answers three times as long (a drift a canary-versus-stable report would flag).
    app = bus.subjects.inference("shop")
    await bus.publish(app, _events(window, "stable", start=0))
    await bus.publish(app, _events(window, "canary", start=100, words=15))
    await drift.events.wait_for(2 * window, 15)  # watched as the deployment's traffic...
    assert "chat" not in drift.monitor.pairs  # ...but no variant window holds any of it
    # The same answers served by a router are compared.
    served = bus.subjects.served("shop")
    await bus.publish(served, _events(window, "stable", start=200))
    await bus.publish(served, _events(window, "canary", start=300, words=15))
    reports = [_reports.decode((await sub.next_msg(timeout=15)).data)]
    while reports[-1].comparison != "canary_vs_stable":  # now-versus-reference reports come too
        reports.append(_reports.decode((await sub.next_msg(timeout=15)).data))
    report = reports[-1]
    assert (report.current_n, report.reference_n, report.release) == (window, window, "r2")


async def test_online_scores_say_whether_a_router_served_the_answer(
        context: ServiceContext, bus: Bus, run_services: Any) -> None:
    context.settings = context.settings.replace(online_eval_sample=1.0)
    await run_services("evaluator")
    sub = await bus.nc.subscribe(bus.subjects.eval_scores("chat"))
    sent = InferenceEvent(app="shop", deployment="chat", variant="canary", release="r2", response="fine")
    served = InferenceEvent(app="shop", deployment="chat", variant="canary", release="r2", response="fine")
    await bus.publish(bus.subjects.inference("shop"), [sent])
    await bus.publish(bus.subjects.served("shop"), [served])
    got = {}
    while len(got) < 2:
        scored = _scores.decode((await sub.next_msg(timeout=15)).data)
        got[scored.event_id] = scored.served
    assert got == {sent.id: False, served.id: True}
