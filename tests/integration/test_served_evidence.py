"""Only answers a router served are a canary's live evidence, on the real nats-server: an application's events
(its own subject, which any application may publish on) are stored, priced and watched for drift in windows of
their own, but fill no canary-versus-stable window of the drift monitor, their drift reports say they are not
served (neither the router nor the gatekeeper acts on those), and their online scores are marked not served
(the router's analysis skips those). The router's own evidence subscription is in test_router_drift_replay."""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec
import pytest

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.contracts import DriftReport, GateDecided, InferenceEvent, InferenceScored
from lockgate.server.apikeys import bootstrap
from lockgate.server.service import ServiceContext
from lockgate.services.gatekeeper.domain import decision_id
from lockgate.signing import ensure_signer_trusted
from tests.helpers import register_model_release
from tests.integration.test_drift_canary import _decide
from tests.integration.test_drift_restart import _events, arms

pytestmark = pytest.mark.timeout(90)

_reports: Codec[DriftReport] = Codec(DriftReport)
_scores: Codec[InferenceScored] = Codec(InferenceScored)
_decided: Codec[GateDecided] = Codec(GateDecided)


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
    await bus.publish(served, arms(_events(window, "canary", start=300, words=15), _events(window, "stable", start=300)))
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


async def test_the_online_evaluator_scores_no_event_of_another_tenant_or_app_than_its_subject(
        context: ServiceContext, bus: Bus, run_services: Any) -> None:
    # Found by a probe: the online evaluator, alone among the inference stream's readers, took a message's events
    # whatever tenant and app they named; a per-application user's events named as tenant default's app and
    # deployment were scored, and stored in `inference_scores` as that tenant's (sink, cost and drift refused them).
    context.settings = context.settings.replace(online_eval_sample=1.0)
    await run_services("evaluator")
    sub = await bus.nc.subscribe(bus.subjects.eval_scores("chat"))
    forged = InferenceEvent(tenant="default", app="shop", deployment="chat", response="fine")
    own = InferenceEvent(tenant="evil", app="bot", deployment="chat", response="fine")
    later = InferenceEvent(tenant="evil", app="bot", deployment="chat", response="fine")
    subject = bus.subjects.inference("bot", "evil")  # what that user may publish on
    await bus.publish(subject, [forged, own])
    await bus.publish(subject, [later])  # handled after the first message: its score comes after that one's
    scored = []
    while later.id not in scored:
        scored.append(_scores.decode((await sub.next_msg(timeout=15)).data).event_id)
    assert scored == [own.id, later.id]


@pytest.mark.parametrize("acts", ["router", "gatekeeper"])
async def test_an_applications_own_drifting_events_neither_abort_a_canary_nor_block_it(
        context: ServiceContext, bus: Bus, run_services: Any, acts: str) -> None:
    # Found by a probe: 1,000 gRPC events of the app naming its deployment, answers of 4,000 tokens, drifted the
    # deployment's now-versus-reference window and aborted a passing canary within seconds. Either the router
    # acts on a DRIFT report itself, or (the monitor's own threshold out of reach) the gatekeeper's drift policy.
    window = context.settings.drift_window_size
    signer = ensure_signer_trusted(context.settings)
    await register_model_release(bus, "r1", "m", "default")
    await register_model_release(bus, "r2", "m", "canary")
    context.settings = context.settings.replace(deployment="chat", app="shop")
    policy = ""
    if acts == "gatekeeper":
        context.settings = context.settings.replace(drift_psi_threshold=1e9)
        policy = (await artifacts.register(bus, "policy", "drift-watch", {
            "name": "drift-watch", "rules": [{"metric": "score", "op": ">=", "threshold": 0.5}],
            "drift": [{"max_psi": 0.5}]})).hash
    await _decide(bus, signer, "r1", "PASS", publish=False)
    router = (await run_services("drift", "gatekeeper", "router"))["router"]
    keys = bootstrap(context.settings.home, tenant="acme", app="shop")
    body = {"stable_release": "r1", "canary_release": "r2", "strategy": {"steps": [50, 100], "interval_s": 3600}}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as http, \
            http.put(f"{router.url}/lockgate/v1/deployments/chat", json=body) as resp:
        assert resp.status == 200, await resp.text()
    await _decide(bus, signer, "r2", "PASS", policy=policy)
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "progressing", timeout=10)
    reports = await bus.nc.subscribe(bus.subjects.drift("chat"))
    blocks = await bus.nc.subscribe(bus.subjects.gate_decided("r2"))

    def output_psi(report: DriftReport) -> float:
        return next(f.psi for f in report.features if f.feature == "output_tokens")

    app = bus.subjects.inference("shop")  # what any application may publish on
    await bus.publish(app, _events(window, "stable", start=0))
    await bus.publish(app, _events(window, "stable", start=100, words=60))  # answers twelve times as long
    forged = _reports.decode((await reports.next_msg(timeout=15)).data)
    assert output_psi(forged) > 0.5 and not forged.served
    # The same drift in answers the router served: this one acts (reports are handled in order, so by then the
    # application's report was handled, and had it acted the canary would be aborted or blocked already). Both
    # act on a canary only on its window against stable's (the gatekeeper's policy judged the deployment's too,
    # before: a client moved it by what it asked and had a healthy canary BLOCKed); the application's events fill
    # no such window at all.
    served = bus.subjects.served("shop")
    await bus.publish(served, arms(_events(window, "canary", start=300, words=60), _events(window, "stable", start=300)))
    kind = "canary_vs_stable"
    acted = _reports.decode((await reports.next_msg(timeout=15)).data)
    while acted.comparison != kind:
        acted = _reports.decode((await reports.next_msg(timeout=15)).data)
    assert output_psi(acted) > 0.5 and acted.served
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "aborted", timeout=15)
    reason = router.rollouts.route("chat").reason
    if acts == "router":
        assert acted.id in reason and forged.id not in reason, reason
        return
    block = _decided.decode((await blocks.next_msg(timeout=15)).data)
    while block.decision != "BLOCK":
        block = _decided.decode((await blocks.next_msg(timeout=15)).data)
    assert block.id == decision_id(acted.id, signer.id_salt), "the BLOCK came from the application's report"


async def test_cached_answers_fill_no_drift_window(context: ServiceContext, bus: Bus, run_services: Any) -> None:
    # Replays of one answer (the router's response cache) would fill and dilute a canary's window.
    drift = (await run_services("drift"))["drift"].handlers
    served = bus.subjects.served("shop")
    hits = [msgspec.structs.replace(e, attributes={"cache": "hit"}) for e in _events(30, "canary", start=0)]
    await bus.publish(served, hits)
    await bus.publish(served, _events(5, "canary", start=100))
    await drift.events.wait_for(5, 15)  # in order on one consumer: the hits were handled first
    assert drift.events.count == 5 and drift.monitor.windows["chat"].ref.n == 5


async def test_failures_the_client_caused_fill_no_drift_window(
        context: ServiceContext, bus: Bus, run_services: Any) -> None:
    # A client may pick users that hash to the canary and hang up on them, or send bodies the upstream refuses:
    # counted, their error share would drift the canary against stable (and abort it) at the client's will.
    drift = (await run_services("drift"))["drift"].handlers
    served = bus.subjects.served("shop")
    theirs = [msgspec.structs.replace(e, status="error", error_type=kind, output_tokens=0)
              for e, kind in zip(_events(30, "canary", start=0), ["client_disconnected", "400"] * 15, strict=True)]
    await bus.publish(served, theirs)
    await bus.publish(served, [msgspec.structs.replace(e, status="error", error_type="503")
                               for e in _events(2, "canary", start=50)])  # the release's own: counted
    await bus.publish(served, _events(5, "canary", start=100))
    await drift.events.wait_for(7, 15)  # in order on one consumer: the client's were handled first
    assert drift.events.count == 7 and drift.monitor.windows["chat"].ref.n == 7


async def test_an_app_named_router_is_an_application_like_any_other(
        context: ServiceContext, bus: Bus, run_services: Any) -> None:
    # Found by a probe: `lg.inference.router` (the subject of an app named `router`, which any application may
    # publish on, and an API key of any tenant may be made for) ended in `.router` and counted as served: its
    # drifting events aborted another tenant's canary over NATS and over OTLP.
    services = await run_services("drift", "sink")
    drift, sink = services["drift"].handlers, services["sink"].handlers
    events = [msgspec.structs.replace(e, app="router") for e in _events(5, "canary", start=0)]
    await bus.publish(bus.subjects.inference("router"), events)
    await drift.events.wait_for(5, 15)
    await sink.events.wait_for(5, 15)
    assert set(drift.monitor.windows) == {"chat#router"} and "chat" not in drift.monitor.pairs
    assert context.store.rows("SELECT DISTINCT served FROM inference_events") == [{"served": False}]
