"""Drift monitor on real NATS and chDB: a shifted window is reported, stored and queryable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import msgspec
import numpy as np
import pytest

from lockgate.bus import Bus, Delivery
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import DeadLetter, DriftReport, InferenceEvent, InferenceScored, RolloutState
from lockgate.server.registry import ServiceSet
from lockgate.server.service import ServiceContext
from lockgate.services.drift import snapshots
from lockgate.services.drift.features import FEATURES
from lockgate.services.drift.handlers import DriftHandlers
from lockgate.services.drift.windows import Windows
from lockgate.services.query.drift import drift_reports
from lockgate.store import Store
from lockgate.subjects import Subjects, token
from lockgate.telemetry import Telemetry
from tests.helpers import sink_stored

_reports: Codec[DriftReport] = Codec(DriftReport)

pytestmark = pytest.mark.timeout(60)

report_codec: Codec[DriftReport] = Codec(DriftReport)


@asynccontextmanager
async def restarted(context: ServiceContext, settings: Settings) -> AsyncIterator[Bus]:
    """A new drift monitor on a bus of its own (a new process's), on the same NATS and store; stopped at exit."""
    bus2 = Bus(settings.nats_url, Subjects(settings.prefix), name="restarted")
    await bus2.connect()
    second = ServiceSet(ServiceContext(bus=bus2, store=context.store, telemetry=Telemetry(), settings=settings),
                        ["drift"])
    await second.start()
    try:
        yield bus2
    finally:
        await second.stop()
        await bus2.close()


def _events(n: int, output: float, seed: int, deployment: str = "checkout") -> list[InferenceEvent]:
    rng = np.random.default_rng(seed)
    return [
        InferenceEvent(app="shop", deployment=deployment, model="sim-good", output_tokens=int(o),
                       input_tokens=int(i), latency_ms=float(lat))
        for o, i, lat in zip(rng.normal(output, 10, n).clip(1), rng.normal(100, 10, n).clip(1),
                             rng.normal(300, 30, n).clip(1), strict=True)
    ]


async def test_shifted_window_is_reported_and_stored(run_services, bus: Bus, store: Store, settings) -> None:
    assert (settings.drift_reference_size, settings.drift_window_size) == (50, 50)
    sub = await bus.nc.subscribe(bus.subjects.drift("checkout"))
    svcs = await run_services("sink", "drift")
    subject = bus.subjects.inference("shop")
    await bus.publish(subject, _events(50, output=100, seed=1))  # one JSON array: the reference
    await bus.publish(subject, _events(50, output=400, seed=2))  # the current window, shifted
    msg = await sub.next_msg(timeout=15)
    report = report_codec.decode(msg.data)
    by_feature = {f.feature: f for f in report.features}
    assert report.deployment == "checkout" and report.app == "shop"
    assert (report.reference_n, report.current_n) == (50, 50)
    assert report.drifted and by_feature["output_tokens"].drifted
    assert by_feature["output_tokens"].psi > 1.0 and by_feature["output_tokens"].ks_pvalue < 1e-6
    assert by_feature["output_tokens"].current_mean > 300 > by_feature["output_tokens"].reference_mean

    # the sink stores the published report
    await sink_stored(svcs["sink"].handlers, drift_reports=1)
    stored = await asyncio.to_thread(drift_reports, store, "checkout")
    assert len(stored) == 1 and stored[0]["id"] == report.id and stored[0]["drifted"]
    # numeric features, and categorical ones named after the category whose share moved most
    # (no online scores were sampled, no answer had a refusal score: those features are left out)
    assert {f["feature"].split(":")[0] for f in stored[0]["features"]} == {
        "output_tokens", "latency_ms", "input_tokens", "finish_reason", "error_type", "model", "status", "tool_call"}
    assert store.scalar("SELECT count() FROM drift_reports") == 8
    # each feature's test, statistic, threshold and sample sizes are stored with it (KS: 50 rows <= 1,000)
    out = store.rows("SELECT test, p_value, threshold, test_drifted, reference_size, current_size, comparison "
                     "FROM drift_reports WHERE feature = 'output_tokens'")[0]
    assert (out["test"], out["threshold"], out["test_drifted"], out["reference_size"], out["current_size"],
            out["comparison"]) == ("ks", 0.05, True, 50, 50, "now_vs_reference")
    assert out["p_value"] < 1e-6
    # the query returns them per feature, not as the report's
    feature = next(f for f in stored[0]["features"] if f["feature"] == "output_tokens")
    assert (feature["test"], feature["reference_size"]) == ("ks", 50) and "test" not in stored[0]
    assert await asyncio.to_thread(drift_reports, store, "elsewhere") == []


async def test_promotion_resets_the_reference(run_services, bus: Bus, store: Store) -> None:
    sub = await bus.nc.subscribe(bus.subjects.drift("checkout"))
    svcs = await run_services("drift")
    handlers = svcs["drift"].handlers
    subject = bus.subjects.inference("shop")
    await bus.publish(subject, _events(50, output=100, seed=1))
    await handlers.events.wait_for(50)
    await bus.publish(bus.subjects.rollout("checkout"),
                      RolloutState(deployment="checkout", stable_release="rel-2", phase="promoted"))
    await handlers.resets.wait_for(1)
    # The promoted release's traffic is the new reference, so the same shift is no longer drift.
    await bus.publish(subject, _events(50, output=400, seed=3))
    await bus.publish(subject, _events(50, output=400, seed=4))
    report = report_codec.decode((await sub.next_msg(timeout=15)).data)
    out = next(f for f in report.features if f.feature == "output_tokens")
    assert out.reference_mean > 300 and out.current_mean > 300
    assert handlers.events.count == 150


async def test_malformed_message_is_skipped_and_next_is_processed(run_services, bus: Bus) -> None:
    # The sink letters it (once); drift goes on after a failed decode, writing no copy of its own.
    letters = await bus.nc.subscribe(bus.subjects.dlq_all)
    svcs = await run_services("sink", "drift")
    await bus.publish(bus.subjects.inference("shop"), b'[{"type":"lockgate.inference"}]', msg_id="bad-1")
    await bus.publish(bus.subjects.inference("shop"), _events(3, output=100, seed=5))
    letter = Codec(DeadLetter).decode((await letters.next_msg(timeout=15)).data)
    assert letter.origin == "sink" and letter.payload == b'[{"type":"lockgate.inference"}]'
    await svcs["drift"].handlers.events.wait_for(3)
    await svcs["sink"].handlers.dead_letters.wait_for(1)
    # Letters the DLQ ever took (it keeps one only until the sink has stored it: interest retention).
    assert (await bus.js.stream_info(bus.subjects.streams["dlq"].name)).state.last_seq == 1


async def test_redelivered_message_is_observed_once(context: ServiceContext) -> None:
    handlers = DriftHandlers(context)
    reference = _events(50, output=100, seed=1)
    for attempt in (1, 2):
        await handlers.on_inference(reference, Delivery(subject="s", msg_id="b-ref", headers={},
                                                        deliveries=attempt, stream_seq=1))
    assert handlers.events.count == 50
    # Had the redelivery been counted, these 50 would have completed a second window already.
    await handlers.on_inference(_events(49, output=100, seed=2), Delivery(subject="s", msg_id="b-2", headers={},
                                                                          deliveries=1, stream_seq=2))
    assert handlers.reports.count == 0
    await handlers.on_inference(_events(1, output=100, seed=3), Delivery(subject="s", msg_id="b-3", headers={},
                                                                         deliveries=1, stream_seq=3))
    assert handlers.reports.count == 1
    # one report published (the stream holds it for the sink), none for the redelivery
    info = await context.bus.js.stream_info(context.bus.subjects.streams["events"].name)
    assert info.state.messages == 1


async def test_a_restart_keeps_the_reference_window(context: ServiceContext, bus: Bus, settings) -> None:
    sub = await bus.nc.subscribe(bus.subjects.drift("checkout"))
    subject = bus.subjects.inference("shop")
    first = ServiceSet(context, ["drift"])
    await first.start()
    await bus.publish(subject, _events(50, output=100, seed=1))  # the reference, then the process stops
    await first["drift"].handlers.events.wait_for(50)
    await first.stop()
    await bus.stop_consumers()

    async with restarted(context, settings) as bus2:
        await bus2.publish(subject, _events(50, output=400, seed=2))  # only the shifted window after restart
        report = report_codec.decode((await sub.next_msg(timeout=15)).data)
        by_feature = {f.feature: f for f in report.features}
        assert report.reference_n == 50 and report.drifted
        assert by_feature["output_tokens"].reference_mean < 150 < by_feature["output_tokens"].current_mean


async def test_online_scores_are_drift_features(run_services, bus: Bus) -> None:
    """The evaluator's scores of sampled live traffic (InferenceScored): a PII leak in them is drift."""
    sub = await bus.nc.subscribe(bus.subjects.drift("checkout"))
    await run_services("drift")

    def scored(n: int, leaks: int, start: int) -> list[InferenceScored]:
        return [InferenceScored(event_id=f"e{start + i}", app="shop", deployment="checkout",
                                scores={"pii_free": 0.0 if i < leaks else 1.0, "length": 100.0 + i % 9})
                for i in range(n)]

    for i, s in enumerate(scored(50, 0, 0) + scored(50, 20, 50)):  # 40% of the current window leaks PII
        await bus.publish(bus.subjects.eval_scores("checkout"), s, msg_id=f"scored-{i}")
    report = report_codec.decode((await sub.next_msg(timeout=15)).data)
    by = {f.feature: f for f in report.features}
    assert set(by) == {"score.pii_free", "score.length"}  # no inference event measured anything else
    pii = by["score.pii_free"]
    assert pii.drifted and pii.test == "z" and (pii.reference_mean, pii.current_mean) == (1.0, 0.6)
    assert not by["score.length"].drifted
    await sub.unsubscribe()


async def test_scores_near_the_float_limit_give_a_report_that_decodes_and_is_stored(
        run_services, bus: Bus, store: Store) -> None:
    # Before: a score of 1e308 (valid JSON and a valid event) overflowed the window's mean to inf or NaN,
    # which JSON writes as null: every report of the deployment was undecodable (the sink dead-lettered it).
    sub = await bus.nc.subscribe(bus.subjects.drift("huge"))
    svcs = await run_services("sink", "drift")
    events = [InferenceEvent(app="shop", deployment="huge", model="m", output_tokens=10,
                             scores={"length": 1e308 if i % 3 else 1.0}) for i in range(100)]
    await bus.publish(bus.subjects.inference("shop"), events)
    report = report_codec.decode((await sub.next_msg(timeout=15)).data)
    length = next(f for f in report.features if f.feature == "score.length")
    assert length.reference_mean == pytest.approx(length.current_mean) and 6e307 < length.reference_mean < 7e307
    assert not report.drifted  # the same distribution in both windows
    await sink_stored(svcs["sink"].handlers, drift_reports=1)
    assert await asyncio.to_thread(drift_reports, store, "huge")
    await sub.unsubscribe()


async def test_reports_due_when_two_consumers_emit_at_once_are_each_published_once(
        context: ServiceContext, bus: Bus) -> None:
    # Found by a probe: the inference and the scores consumers emitted the same pending reports concurrently; one
    # report was published twice, the next popped unpublished, then "pop from empty list" dead-lettered a score.
    handlers = DriftHandlers(context)
    sub = await bus.nc.subscribe(bus.subjects.drift("chat"))
    now = datetime.now(UTC)
    due = [DriftReport(deployment="chat", window_start=now, window_end=now, reference_n=50, current_n=50,
                       features=[], drifted=False) for _ in range(2)]
    handlers._pending = list(due)

    def delivery(n: int) -> Delivery:
        return Delivery(subject=bus.subjects.served("shop"), msg_id=f"m{n}", headers={}, deliveries=1, stream_seq=n)

    await asyncio.gather(handlers._observe([], delivery(1), served=True), handlers._observe([], delivery(2), served=True))
    got = [_reports.decode((await sub.next_msg(timeout=5)).data).id for _ in range(2)]
    assert sorted(got) == sorted(r.id for r in due) and handlers._pending == []
    await bus.nc.flush()  # the server has sent this connection everything published before the flush
    assert sub.pending_msgs == 0  # and nothing more


async def test_each_tenants_windows_survive_a_restart_and_windows_saved_mixed_refill(
        context: ServiceContext, bus: Bus, settings) -> None:
    sub = await bus.nc.subscribe(bus.subjects.drift("checkout"))
    # Saved before windows were kept per tenant: the deployment's key held whoever's events came, and its snapshot
    # named the tenant of the last one (here acme's reference, as a key now meaning the default tenant's).
    mixed = Windows(50, 50, tenant="acme")
    mixed.ref.fill(np.full((50, len(FEATURES)), 5.0), np.zeros(50), None)
    kv = await bus.kv(bus.subjects.kv_drift)
    await kv.put(token("checkout"), msgspec.json.encode(snapshots.snapshot("checkout", mixed)))

    first = ServiceSet(context, ["drift"])
    await first.start()
    acme = [msgspec.structs.replace(e, tenant="acme") for e in _events(50, output=100, seed=1)]
    await bus.publish(bus.subjects.inference("shop", "acme"), acme)  # acme's reference, then the process stops
    # The default tenant's served answers: a reference of their own, no report (had the mixed windows been taken as
    # the default tenant's, these would be their current window: a report, the first the subscription gets).
    await bus.publish(bus.subjects.served("shop"), _events(50, output=100, seed=3))
    handlers = first["drift"].handlers
    await handlers.events.wait_for(100)
    assert set(handlers.monitor.windows) == {"checkout", "checkout~acme#shop"}
    await first.stop()
    await bus.stop_consumers()

    async with restarted(context, settings) as bus2:
        shifted = [msgspec.structs.replace(e, tenant="acme") for e in _events(50, output=400, seed=2)]
        await bus2.publish(bus.subjects.inference("shop", "acme"), shifted)
        report = report_codec.decode((await sub.next_msg(timeout=15)).data)
        assert (report.tenant, report.reference_n, report.drifted) == ("acme", 50, True)
        out = next(f for f in report.features if f.feature == "output_tokens")
        assert out.reference_mean < 150 < out.current_mean


def _served(n: int, output: float, seed: int, release: str, at: float) -> list[InferenceEvent]:
    """Answers a router served of `release`, observed at `at` (unix seconds)."""
    when = datetime.fromtimestamp(at, UTC)
    return [msgspec.structs.replace(e, variant="stable", release=release, time=when)
            for e in _events(n, output=output, seed=seed)]


def _promoted(release: str, promoted_at: float, reason: str = "") -> RolloutState:
    return RolloutState(deployment="checkout", stable_release=release, canary_release=release, phase="promoted",
                        promoted_at=promoted_at, reason=reason)


async def test_a_promotion_announced_again_keeps_the_promoted_releases_reference(
        context: ServiceContext, bus: Bus, settings: Settings) -> None:
    # Probe p69 F1: while a blue-green release is under post-promotion analysis the router announces its promoted
    # route again on other changes: a BLOCK of an old known-good release not serving, the analysis's progress
    # deadline passing. Each restarted the windows, whose reference refilled from the now degraded traffic: the
    # release was never rolled back for drift. Only the promotion itself restarts them.
    sub = await bus.nc.subscribe(bus.subjects.drift("checkout"))
    first = ServiceSet(context, ["drift"])
    await first.start()
    handlers = first["drift"].handlers
    subject, now = bus.subjects.served("shop"), time.time()
    await bus.publish(bus.subjects.rollout("checkout"), _promoted("rel-2", now - 60))
    await handlers.rollouts.wait_for(1)
    assert handlers.resets.count == 1
    await bus.publish(subject, _served(50, 100, 1, "rel-2", now - 50))  # the promoted release's reference
    await bus.publish(subject, _served(20, 400, 2, "rel-2", now - 40))  # then it degrades
    await handlers.events.wait_for(70)
    for reason in ("gate BLOCK of known-good rel-1", "score:pii_free: past the progress deadline (7 s)"):
        await bus.publish(bus.subjects.rollout("checkout"), _promoted("rel-2", now - 60, reason))
    await handlers.rollouts.wait_for(3)
    await bus.publish(subject, _served(30, 400, 3, "rel-2", now - 30))
    report = report_codec.decode((await sub.next_msg(timeout=15)).data)
    out = next(f for f in report.features if f.feature == "output_tokens")
    assert report.drifted and out.drifted and out.reference_mean < 150 < 300 < out.current_mean
    assert report.reference_window_start == datetime.fromtimestamp(now - 50, UTC)
    assert handlers.resets.count == 1
    # A monitor started anew agrees (the promotion its windows restarted for is kept beside them).
    await first.stop()  # saves the windows
    await bus.stop_consumers()
    async with restarted(context, settings) as bus2:
        await bus2.publish(bus2.subjects.rollout("checkout"), _promoted("rel-2", now - 60, "again"))
        await bus2.publish(subject, _served(50, 400, 4, "rel-2", now - 20))
        report = report_codec.decode((await sub.next_msg(timeout=15)).data)
        assert report.drifted and report.reference_window_start == datetime.fromtimestamp(now - 50, UTC)


async def test_after_a_promotion_the_windows_take_only_the_promoted_releases_answers(run_services, bus: Bus) -> None:
    # Probe p69 F2: the monitor reads answers and route changes on two consumers: the old release's answers it read
    # after the promotion (and those in flight at it) filled the promoted release's new reference, and a steady
    # release drifted against its predecessor and was rolled back within seconds of its promotion.
    sub = await bus.nc.subscribe(bus.subjects.drift("checkout"))
    handlers = (await run_services("drift"))["drift"].handlers
    subject, now = bus.subjects.served("shop"), time.time()
    await bus.publish(bus.subjects.rollout("checkout"), _promoted("rel-2", now - 60))
    await handlers.rollouts.wait_for(1)
    await bus.publish(subject, _served(30, 100, 1, "rel-1", now - 61))  # served before the promotion, read after
    await bus.publish(subject, _served(30, 100, 2, "rel-1", now - 59))  # the old release's, answered after it
    await bus.publish(subject, _served(100, 400, 3, "rel-2", now - 50))  # the promoted release's: its reference
    report = report_codec.decode((await sub.next_msg(timeout=15)).data)
    out = next(f for f in report.features if f.feature == "output_tokens")
    assert not report.drifted and out.reference_mean > 300 and (report.reference_n, report.current_n) == (50, 50)
    assert report.reference_window_start == datetime.fromtimestamp(now - 50, UTC)
    # A rollback puts the earlier release back: its answers are the reference again, the failed one's are not.
    await bus.publish(bus.subjects.rollout("checkout"), RolloutState(
        deployment="checkout", stable_release="rel-1", canary_release="rel-2", phase="aborted"))
    await handlers.rollouts.wait_for(2)
    assert handlers.resets.count == 2
    await bus.publish(subject, _served(50, 400, 4, "rel-2", now + 1))
    await bus.publish(subject, _served(100, 100, 5, "rel-1", now + 1))
    report = report_codec.decode((await sub.next_msg(timeout=15)).data)
    out = next(f for f in report.features if f.feature == "output_tokens")
    assert not report.drifted and out.reference_mean < 150 and out.current_mean < 150
