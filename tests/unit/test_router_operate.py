"""Retry, merge-patch and signed analysis records: the pure parts. Through the admin API and CLI in
tests/integration/test_rollout_operate.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from lockgate import analysisruns
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.errors import SignatureError
from lockgate.server.service import ServiceContext
from lockgate.services.router import domain, patch, progress, runs
from lockgate.services.router.analysis import Measurement, MetricResult
from lockgate.services.router.endpoints import Endpoints
from lockgate.services.router.rollouts import Rollouts
from lockgate.signing import Keyring, Signer
from lockgate.telemetry import Telemetry
from tests.unit.test_router_progress import SPEC, STEPS, _live, _m

pytestmark = pytest.mark.timeout(30)


def test_merge_patch_follows_rfc_7396() -> None:
    target = {"a": "b", "c": {"d": "e", "f": "g"}}
    assert patch.merge(target, {"a": "z", "c": {"f": None}}) == {"a": "z", "c": {"d": "e"}}
    assert patch.merge({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}  # arrays replace, never merge
    assert patch.merge({"a": "b"}, {"b": {"c": None}}) == {"a": "b", "b": {}}
    assert patch.merge(target, {}) == target


def test_a_weight_patch_keeps_the_canary_and_the_rollout_position() -> None:
    route = msgspec.structs.replace(_live(weight=25.0, step=1), canary=domain.Target(release="r2", endpoint="canary"))
    doc = patch.apply(route, {"weight": 40})
    assert patch.changed(route, doc) == ["weight"]
    assert (doc.canary_release, doc.strategy) == ("r2", route.strategy)
    moved = progress.set_weight(route, doc.weight, "ops")
    assert (moved.weight, moved.canary, moved.step, moved.phase, moved.started_at) == (
        40.0, route.canary, 1, "progressing", route.started_at)


def test_a_strategy_patch_changes_only_the_named_field() -> None:
    route = _live()
    doc = patch.apply(route, {"strategy": {"interval_s": 30}})
    assert patch.changed(route, doc) == ["strategy"]
    assert doc.strategy is not None and route.strategy is not None
    assert (doc.strategy.interval_s, doc.strategy.steps, doc.strategy.analysis) == (30, route.strategy.steps, SPEC)
    dropped = patch.apply(route, {"strategy": {"analysis": None}})
    assert dropped.strategy is not None and dropped.strategy.analysis is None and dropped.strategy.steps


@pytest.mark.parametrize(("body", "why"), [
    ({"stable_release": "r9"}, "PUT starts a new rollout"),
    ({"canary_release": None}, "abort the rollout instead"),
    ({"weight": 150}, "invalid deployment after the patch"),
    ({"strategy": {"steps": "no"}}, "invalid deployment after the patch"),
    ({"colour": "blue"}, "invalid deployment after the patch"),
])
def test_a_patch_that_cannot_apply_says_why(body: dict[str, object], why: str) -> None:
    with pytest.raises(domain.InvalidRollout, match=why):
        patch.apply(_live(), body)


def test_a_patch_nested_deeper_than_python_can_recurse_is_refused_not_a_crash() -> None:
    with pytest.raises(domain.InvalidRollout, match="invalid merge patch: JSON is nested too deeply"):
        patch.decode(b'{"strategy": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    deep: dict[str, object] = {}
    for _ in range(5_000):  # deeper than merging can recurse through (built directly, as JSON it fails earlier)
        deep = {"x": deep}
    with pytest.raises(domain.InvalidRollout, match="invalid merge patch: JSON is nested too deeply"):
        patch.apply(_live(), {"strategy": deep})


def test_retry_restarts_an_aborted_rollout_from_step_zero_only() -> None:
    aborted = domain.abort(_live(weight=50.0, step=2), "analysis failed")
    again = progress.retry(aborted, "apikey:ops", now=500.0)
    assert (again.phase, again.weight, again.step, again.cursor, again.analysis, again.started_at) == (
        "idle", 0.0, 0, 0, None, 500.0)
    assert (again.canary, again.stable, again.strategy) == (aborted.canary, aborted.stable, aborted.strategy)
    assert "retry of r2 by apikey:ops" in again.reason
    with pytest.raises(domain.InvalidRollout, match="is progressing, not aborted"):
        progress.retry(_live(), "ops", now=500.0)


def _judged(verdict: str) -> Measurement:
    """`_m` with the client_error_rate and hang_up_rate results SPEC's error_rate brings along (AnalysisSpec.judged)."""
    m = _m(verdict)
    implied = [MetricResult(name=name, verdict="SUCCESSFUL", canary=0.0, stable=0.0, threshold=0.01)
               for name in ("client_error_rate", "hang_up_rate")]
    return msgspec.structs.replace(m, metrics=[*m.metrics, *implied])


def test_analysis_record_names_values_thresholds_and_outcome() -> None:
    before = _live()
    after = progress.on_measurement(before, _judged("FAILED"), STEPS, 1.0, now=102.0)
    run = runs.record(before, after, _judged("FAILED"), SPEC)
    assert run is not None
    assert (run.deployment, run.release, run.baseline, run.template, run.phase, run.outcome, run.failures) == (
        "d", "r2", "r1", "canary", "Failed", "aborted", 1)
    m, *implied = run.metrics
    assert (m.name, m.canary, m.threshold, m.condition, m.verdict) == (
        "error_rate", 0.05, 0.015, "<= stable + 0.01", "FAILED")
    assert [(i.name, i.condition, i.verdict) for i in implied] == [
        ("client_error_rate", "<= stable + 0.01", "SUCCESSFUL"), ("hang_up_rate", "<= stable + 0.01", "SUCCESSFUL")]
    assert runs.record(before, None, _judged("WAITING"), SPEC) is None  # no look taken: nothing to record


def test_a_changed_record_no_longer_verifies() -> None:
    signer = Signer.generate()
    ring = Keyring([signer.public])
    before = _live()
    run = runs.record(before, None, _judged("SUCCESSFUL"), SPEC)
    assert run is not None
    signed = analysisruns.sign(run, signer)
    assert analysisruns.verify(signed, ring) == signer.key_id
    stored = analysisruns.from_row(msgspec.to_builtins(signed))  # as read back from the store
    assert analysisruns.verify(stored, ring) == signer.key_id
    metric = msgspec.structs.replace(signed.metrics[0], canary=0.001)
    with pytest.raises(SignatureError, match="does not match"):
        analysisruns.verify(msgspec.structs.replace(signed, metrics=[metric]), ring)
    with pytest.raises(SignatureError, match="unknown key"):
        analysisruns.verify(analysisruns.sign(run, Signer.generate()), ring)


def test_a_due_look_follows_the_evidence_and_waits_one_interval_more_without_it(tmp_path: Path) -> None:
    """Looks stay at most one per interval (the same alpha per look), but one that is due is taken when its
    evidence arrives rather than at the next tick; without new evidence it is taken one interval later."""
    ctx = ServiceContext(bus=None, telemetry=Telemetry(), settings=Settings(home=str(tmp_path)))  # type: ignore[arg-type]
    rollouts = Rollouts(ctx, Endpoints(ctx.settings))
    route = _live(next_step_at=101.0)  # interval 1 s
    rollouts.routes["d"] = route
    assert rollouts._due(route) == 102.0  # nothing new since the last look
    rollouts.observe([InferenceEvent(app="d", deployment="d", release="r2", variant="canary")])
    assert rollouts._due(route) == 101.0  # new canary evidence: the look is due on time, taken on its arrival
    rollouts.observe([InferenceEvent(app="other", deployment="other", release="r2")])
    assert rollouts._due(_live(next_step_at=101.0, strategy=None)) == 101.0  # plain steps: the clock alone


def at(second: int) -> datetime:
    """An event time `second` seconds after the routes' start (`_live`: 100)."""
    return datetime.fromtimestamp(100 + second, UTC)


def test_requests_diverted_by_the_canarys_open_breaker_count_as_canary_failures(tmp_path: Path) -> None:
    """Served by stable without a call to the canary, they would leave the canary without evidence: it would
    wait for its minimum sample for ever. Once it has failed a call itself, each diversion is a failure."""
    ctx = ServiceContext(bus=None, telemetry=Telemetry(), settings=Settings(home=str(tmp_path)))  # type: ignore[arg-type]
    rollouts = Rollouts(ctx, Endpoints(ctx.settings))
    rollouts.routes["d"] = route = _live()
    clock = iter(range(1, 100))

    def diverted() -> InferenceEvent:
        return InferenceEvent(app="d", deployment="d", release="r1", variant="stable", time=at(next(clock)),
                              attributes={"lockgate.fallback_from_variant": "canary",
                                          "lockgate.fallback_from_release": "r2",
                                          "lockgate.fallback_reason": "breaker_open"})

    rollouts.observe([diverted() for _ in range(3)])  # a breaker some earlier release left open: not this canary's
    assert rollouts.evidence.sample("d", "r2", route.started_at).n == 0
    rollouts.observe([InferenceEvent(app="d", deployment="d", release="r2", variant="canary", status="error",
                                     error_type=why, time=at(next(clock))) for why in ("client_disconnected", "400")])
    rollouts.observe([diverted() for _ in range(3)])  # the canary's only failures were its clients': not its own
    assert rollouts.evidence.sample("d", "r2", route.started_at).n == 0
    rollouts.observe([InferenceEvent(app="d", deployment="d", release="r2", variant="canary", status="error",
                                     time=at(next(clock)))])
    rollouts.observe([diverted() for _ in range(3)])
    canary = rollouts.evidence.sample("d", "r2", route.started_at)
    assert (canary.n, canary.errors) == (4, 4)
    assert rollouts.evidence.sample("d", "r1", route.started_at).n == 9  # stable served them: its evidence too


def test_answers_from_the_response_cache_are_no_evidence(tmp_path: Path) -> None:
    """Found by a probe: an app repeating one request its canary answered well got 4,873 cache hits counted as
    the canary's traffic (no upstream call, its tokens and latency the cached answer's): a canary whose real
    answers failed analysis was promoted. A replay is no evidence of what the release does."""
    ctx = ServiceContext(bus=None, telemetry=Telemetry(), settings=Settings(home=str(tmp_path)))  # type: ignore[arg-type]
    rollouts = Rollouts(ctx, Endpoints(ctx.settings))
    rollouts.routes["d"] = route = _live()
    hit = InferenceEvent(app="d", deployment="d", release="r2", variant="canary", attributes={"cache": "hit"})
    rollouts.observe([hit] * 50)
    assert rollouts.evidence.sample("d", "r2", route.started_at).n == 0
    rollouts.observe([InferenceEvent(app="d", deployment="d", release="r2", variant="canary",
                                     attributes={"cache": "miss"})])
    assert rollouts.evidence.sample("d", "r2", route.started_at).n == 1


class _Entry(msgspec.Struct):
    key: str
    value: bytes
    revision: int
    operation: str | None = None


class _SlowKV:
    """A routes bucket whose read is answered (with what it held) only once the test lets it resume."""

    def __init__(self, entry: _Entry) -> None:
        self.entry, self.asked, self.answer = entry, asyncio.Event(), asyncio.Event()

    async def get(self, key: str) -> _Entry:
        self.asked.set()
        await self.answer.wait()
        return self.entry


async def test_a_route_read_answered_before_a_watched_write_does_not_undo_it(tmp_path: Path) -> None:
    """Found in CI under load: a replica reading its routes again after a bus restart took the 50% canary KV
    answered, resumed after its watch had applied another replica's abort written just after: the abort was undone
    on that replica until the next write. A read never puts back a route older than one the watch applied."""
    ctx = ServiceContext(bus=None, telemetry=Telemetry(), settings=Settings(home=str(tmp_path)))  # type: ignore[arg-type]
    rollouts = Rollouts(ctx, Endpoints(ctx.settings))
    live = _live(weight=50.0)
    rollouts.routes["d"], rollouts._revisions["d"] = live, 7
    rollouts._kv = kv = _SlowKV(_Entry(key="d", value=msgspec.json.encode(live), revision=7))
    reading = asyncio.create_task(rollouts._reload("d"))
    await kv.asked.wait()
    aborted = msgspec.structs.replace(live, phase="aborted", weight=0.0)
    rollouts._on_entry(_Entry(key="d", value=msgspec.json.encode(aborted), revision=8, operation="PUT"))
    kv.answer.set()
    await reading
    assert (rollouts.route("d").phase, rollouts._revisions["d"]) == ("aborted", 8)
