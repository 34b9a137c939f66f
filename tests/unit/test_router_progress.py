"""Closed-loop rollout transitions: analysis verdicts, drift, pause/resume/set-weight. Pure."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from lockgate import driftharm
from lockgate.contracts import DriftReport, FeatureDrift, GateDecided
from lockgate.services.router import analysis, bluegreen, domain, progress
from lockgate.services.router.analysis import AnalysisSpec, Measurement, MetricResult, MetricSpec
from lockgate.services.router.domain import CanaryRequest, InvalidRollout, NotAdmitted, Route, Target
from lockgate.services.router.strategy import AnalysisStatus, BlueGreen, Pause, Step, Strategy

pytestmark = pytest.mark.timeout(30)


def _ok(route: Route) -> dict[str, GateDecided | None]:
    """A PASS now for every known-good release of `route`: where a rollback may go (domain.last_good)."""
    return {t.release: GateDecided(release=t.release, decision="PASS", rules=[]) for t in route.good}

SPEC = AnalysisSpec(metrics=[MetricSpec(name="error_rate", max_increase=0.01)], min_sample=100, failure_limit=0,
                    inconclusive_limit=1)
STEPS = (25.0, 50.0, 100.0)


def _live(weight: float = 25.0, step: int = 1, **changes: object) -> Route:
    req = CanaryRequest(stable_release="r1", canary_release="r2")
    r = domain.start_canary(domain.default_route("d"), req, stable=Target(release="r1"),
                            canary=Target(release="r2"), first_step=STEPS[0])
    fields: dict[str, object] = {"phase": "progressing", "weight": weight, "step": step, "admitted": "dec-1",
                                 "strategy": Strategy(steps=list(STEPS), interval_s=1.0, analysis=SPEC),
                                 "started_at": 100.0, "next_step_at": 101.0}
    return msgspec.structs.replace(r, **(fields | changes))


def _m(verdict: str, **metric: object) -> Measurement:
    result = MetricResult(name="error_rate", verdict=verdict, canary=0.05, stable=0.005, threshold=0.015,
                          canary_n=400, stable_n=400, **metric)  # type: ignore[arg-type]
    return Measurement(verdict=verdict, look=1, metrics=[result], canary_n=400, stable_n=400)  # type: ignore[arg-type]


def test_failed_analysis_aborts_naming_metric_value_and_threshold() -> None:
    new = progress.on_measurement(_live(), _m("FAILED"), STEPS, 1.0, now=102.0)
    assert new is not None and (new.phase, new.weight, new.stable.release) == ("aborted", 0.0, "r1")
    assert "analysis failed at step 1 (25%): error_rate 0.05 > threshold 0.015 (stable 0.005" in new.reason
    assert new.analysis is not None and new.analysis.failures == 1 and new.analysis.look == 1


def test_failures_within_the_limit_only_count() -> None:
    route = _live(strategy=Strategy(steps=list(STEPS), analysis=msgspec.structs.replace(SPEC, failure_limit=1)))
    new = progress.on_measurement(route, _m("FAILED"), STEPS, 1.0, now=102.0)
    assert new is not None and new.phase == "progressing" and new.weight == 25.0 and new.next_step_at == 103.0


def test_success_advances_and_the_last_step_promotes() -> None:
    new = progress.on_measurement(_live(), _m("SUCCESSFUL"), STEPS, 1.0, now=102.0)
    assert new is not None and (new.weight, new.step, new.phase) == (50.0, 2, "progressing")
    last = progress.on_measurement(_live(100.0, 3), _m("SUCCESSFUL"), STEPS, 1.0, now=102.0)
    assert last is not None and (last.phase, last.stable.release) == ("promoted", "r2")


def test_waiting_never_advances_and_is_no_look() -> None:
    new = progress.on_measurement(_live(), _m("WAITING"), STEPS, 1.0, now=102.0)
    assert new is not None and (new.weight, new.phase) == (25.0, "progressing")
    assert new.analysis is not None and new.analysis.look == 0 and new.next_step_at == 103.0


def test_inconclusive_past_the_limit_pauses() -> None:
    once = progress.on_measurement(_live(), _m("INCONCLUSIVE"), STEPS, 1.0, now=102.0)
    assert once is not None and not once.paused
    twice = progress.on_measurement(once, _m("INCONCLUSIVE"), STEPS, 1.0, now=103.0)
    assert twice is not None and twice.paused and twice.weight == 25.0 and "inconclusive 2 times" in twice.reason


def test_looks_that_raise_past_the_consecutive_error_limit_abort_and_a_measured_look_resets_the_count() -> None:
    route = _live(strategy=Strategy(steps=list(STEPS), analysis=msgspec.structs.replace(SPEC, consecutive_error_limit=1)))
    once = progress.on_error(route, "KeyError('r2')", 1.0, now=102.0)
    assert once is not None and (once.phase, once.weight, once.next_step_at) == ("progressing", 25.0, 103.0)
    measured = progress.on_measurement(once, _m("WAITING"), STEPS, 1.0, now=103.0)
    assert measured is not None and measured.analysis is not None and measured.analysis.consecutive_errors == 0
    again = progress.on_error(measured, "KeyError('r2')", 1.0, now=104.0)
    assert again is not None and again.phase == "progressing"
    aborted = progress.on_error(again, "KeyError('r2')", 1.0, now=105.0)
    assert aborted is not None and (aborted.phase, aborted.weight) == ("aborted", 0.0)
    assert "could not be measured 2 times in a row at step 1 (25%): KeyError('r2')" in aborted.reason


def test_the_initial_delay_counts_from_the_canary_start_or_from_a_promotion_under_verification() -> None:
    spec = msgspec.structs.replace(SPEC, initial_delay_s=30.0)
    assert progress.analysis_starts(_live(), spec) == 130.0  # started_at 100
    assert progress.analysis_starts(_live(phase="promoted", promoted_at=500.0), spec) == 530.0
    assert progress.analysis_starts(_live(), SPEC) == 100.0  # no delay: the first due look is taken


def test_paused_canary_is_measured_but_never_advanced() -> None:
    paused = _live(paused=True)
    assert progress.due_at(paused) == 101.0  # still measured: a failing canary must still abort
    new = progress.on_measurement(paused, _m("SUCCESSFUL"), STEPS, 1.0, now=102.0)
    assert new is not None and (new.weight, new.paused) == (25.0, True)
    failed = progress.on_measurement(paused, _m("FAILED"), STEPS, 1.0, now=102.0)
    assert failed is not None and failed.phase == "aborted" and not failed.paused
    plain = msgspec.structs.replace(paused, strategy=None)
    assert progress.due_at(plain) is None  # without analysis a paused canary needs no timer at all


TRIPPED = progress.Tripped(since=101.5, diverted=7)  # 00:01:41 UTC
HELD = "held at step 1 (25%): canary's endpoint breaker open since 00:01:41, diverted 7 requests to stable"


def test_an_open_breaker_holds_a_passing_look_and_the_next_one_after_it_advances() -> None:
    held = progress.on_measurement(_live(), _m("SUCCESSFUL"), STEPS, 1.0, now=102.0, tripped=TRIPPED)
    assert held is not None and (held.weight, held.step, held.phase, held.next_step_at) == (25.0, 1, "progressing",
                                                                                           103.0)
    assert held.reason.endswith(HELD) and progress.breaker_held(held)
    assert held.analysis is not None and held.analysis.successes == 1  # kept: the step's passing looks still count
    again = progress.on_measurement(held, _m("SUCCESSFUL"), STEPS, 1.0, now=103.0, tripped=TRIPPED)
    assert again is not None and again.reason == held.reason  # one note, however many looks it holds
    closed = progress.on_measurement(again, _m("SUCCESSFUL"), STEPS, 1.0, now=104.0)
    assert closed is not None and (closed.weight, closed.step) == (50.0, 2) and not progress.breaker_held(closed)
    last = progress.on_measurement(_live(100.0, 3), _m("SUCCESSFUL"), STEPS, 1.0, now=102.0, tripped=TRIPPED)
    assert last is not None and last.phase == "progressing" and last.stable.release == "r1"  # no promotion


def test_an_open_breaker_never_keeps_a_failing_canary_from_its_abort() -> None:
    failed = progress.on_measurement(_live(), _m("FAILED"), STEPS, 1.0, now=102.0, tripped=TRIPPED)
    assert failed is not None and failed.phase == "aborted"


def test_a_look_that_waits_under_an_open_breaker_says_both_and_the_next_look_takes_both_off() -> None:
    route = _live(analysis=AnalysisStatus(waiting_since=90.0))
    waiting = progress.on_measurement(route, _m("WAITING"), STEPS, 1.0, now=102.0, tripped=TRIPPED)
    assert waiting is not None and waiting.analysis is not None and waiting.analysis.wait_note
    assert waiting.reason.endswith(HELD + waiting.analysis.wait_note)
    passed = progress.on_measurement(waiting, _m("SUCCESSFUL"), STEPS, 1.0, now=103.0)
    assert passed is not None and passed.weight == 50.0 and "breaker" not in passed.reason
    assert "waiting" not in passed.reason


@pytest.mark.parametrize("kind", ["plain", "pause", "blue_green"])
def test_an_open_breaker_holds_what_the_clock_alone_moves(kind: str) -> None:
    if kind == "plain":  # a step falls due
        route = _live(strategy=Strategy(steps=list(STEPS), interval_s=1.0))
        field = "next_step_at"
    elif kind == "pause":  # a timed pause step ends
        route = _live(strategy=Strategy(steps=list(STEPS), interval_s=1.0), paused=True, step_pause=True,
                      resume_at=101.0)
        field = "resume_at"
    else:  # a blue-green preview promotes itself
        route = _live(weight=0.0, step=0, promote_at=101.0,
                      strategy=Strategy(blue_green=BlueGreen(auto_promotion_s=1.0)))
        field = "promote_at"
    assert progress.on_time(route, STEPS, 1.0, now=102.0) is not None  # without it, the clock moves the route
    held = progress.on_time(route, STEPS, 1.0, now=102.0, tripped=TRIPPED)
    assert held is not None and (held.phase, held.weight, held.stable.release) == ("progressing", route.weight, "r1")
    assert getattr(held, field) == 103.0 and progress.breaker_held(held)  # looked at again an interval later
    assert progress.due_at(held) == 103.0
    again = progress.on_time(msgspec.structs.replace(held, **{field: 102.5}), STEPS, 1.0, now=103.0, tripped=TRIPPED)
    assert again is not None and again.reason.count("breaker open") == 1


# The canary's window against stable's: the only kind of report that acts on a live canary.
_ARMS: dict[str, str] = {"comparison": "canary_vs_stable", "release": "r2", "reference_release": "r1"}


def _report(drifted: bool = True, end: float = 200.0, reference_start: float | None = None) -> DriftReport:
    when = datetime.fromtimestamp(end, UTC)
    ref = datetime.fromtimestamp(end if reference_start is None else reference_start, UTC)
    return DriftReport(served=True, deployment="d", window_start=when, window_end=when, reference_n=50, current_n=50, **_ARMS,
                       reference_window_start=ref, reference_window_end=ref,
                       drifted=drifted, features=[
                           FeatureDrift(feature="output_tokens", psi=0.9, ks_stat=0.5, ks_pvalue=0.001,
                                        reference_mean=10, current_mean=30, drifted=drifted),
                           FeatureDrift(feature="latency_ms", psi=0.01, ks_stat=0.1, ks_pvalue=0.5,
                                        reference_mean=5, current_mean=5, drifted=False)])


def test_drift_during_a_live_canary_aborts_it_naming_the_feature() -> None:
    new = progress.on_drift(_live(), _report())
    assert new is not None and new.phase == "aborted" and new.weight == 0.0
    assert "DRIFT in output_tokens (PSI 0.9" in new.reason and "latency_ms" not in new.reason


@pytest.mark.parametrize("case", ["no drift", "not served", "before the canary", "no weight", "promoted"])
def test_drift_that_does_not_concern_a_live_canary_is_ignored(case: str) -> None:
    route, report = _live(), _report()
    if case == "no drift":
        report = _report(drifted=False)
    elif case == "not served":  # an application's own events: it may send whatever it likes
        report = msgspec.structs.replace(report, served=False)
    elif case == "before the canary":
        report = _report(end=50.0)
    elif case == "no weight":
        route = msgspec.structs.replace(route, weight=0.0, phase="idle")
    else:
        route = msgspec.structs.replace(route, phase="promoted")
    assert progress.on_drift(route, report) is None


@pytest.mark.parametrize(("ref", "cur", "aborts"), [(30.0, 20.0, False), (20.0, 60.0, True), (20.0, 30.0, False)])
def test_latency_that_drifted_down_is_an_improvement_and_never_aborts(ref: float, cur: float, aborts: bool) -> None:
    when = datetime.fromtimestamp(200.0, UTC)
    report = DriftReport(served=True, deployment="d", window_start=when, window_end=when, reference_n=50, current_n=50, **_ARMS,
                         drifted=True, features=[FeatureDrift(feature="latency_ms", psi=0.45, ks_stat=0.5,
                                                              ks_pvalue=0.001, reference_mean=ref, current_mean=cur,
                                                              drifted=True)])
    new = progress.on_drift(_live(), report)
    assert (new is not None and new.phase == "aborted") is aborts


@pytest.mark.parametrize(("feature", "ref", "cur", "aborts"), [
    ("status:error", 0.05, 0.01, False), ("status:error", 0.01, 0.05, True),
    ("status:ok", 0.95, 0.99, False), ("status:ok", 0.99, 0.95, True),
    ("refusal:yes", 0.2, 0.05, False), ("refusal:no", 0.8, 0.95, False), ("refusal:yes", 0.05, 0.2, True),
    ("score.pii_free", 0.9, 0.99, False), ("score.pii_free", 0.99, 0.9, True),
])
def test_a_canary_that_got_better_is_never_aborted_for_drift(feature: str, ref: float, cur: float,
                                                             aborts: bool) -> None:
    when = datetime.fromtimestamp(200.0, UTC)
    report = DriftReport(served=True, deployment="d", window_start=when, window_end=when, reference_n=50, current_n=50, **_ARMS,
                         drifted=True, features=[FeatureDrift(feature=feature, psi=0.45, ks_stat=0.5, ks_pvalue=0.001,
                                                              reference_mean=ref, current_mean=cur, drifted=True)])
    new = progress.on_drift(_live(), report)
    assert (new is not None and new.phase == "aborted") is aborts


def test_pause_and_resume_record_the_actor() -> None:
    paused = progress.pause(_live(), "apikey:k1(operator@a/b)", "looking at traces")
    assert paused.paused and paused.weight == 25.0
    assert paused.reason == "paused at step 1 (25%) by apikey:k1(operator@a/b): looking at traces"
    with pytest.raises(InvalidRollout, match="already paused"):
        progress.pause(paused, "x")
    resumed = progress.resume(paused, "apikey:k2(admin@a/b)", 1.0, now=500.0)
    assert not resumed.paused and resumed.next_step_at == 501.0 and "resumed at step 1 (25%) by apikey:k2" in resumed.reason
    with pytest.raises(InvalidRollout, match="not paused"):
        progress.resume(resumed, "x", 1.0, 0.0)


def test_set_weight_changes_only_the_weight() -> None:
    route = _live(paused=True)
    new = progress.set_weight(route, 40.0, "apikey:k1(operator@a/b)")
    changed = {f for f in route.__struct_fields__ if getattr(route, f) != getattr(new, f)}
    assert changed == {"weight", "reason", "version"}
    assert new.weight == 40.0 and "weight set to 40% (was 25%) by apikey:k1" in new.reason


def test_set_weight_keeps_admission() -> None:
    unadmitted = _live(admitted="")
    with pytest.raises(NotAdmitted, match="cannot get weight"):
        progress.set_weight(unadmitted, 10.0, "x")
    assert progress.set_weight(unadmitted, 0.0, "x").weight == 0.0  # taking weight away is always allowed
    with pytest.raises(InvalidRollout, match="already aborted"):
        progress.set_weight(msgspec.structs.replace(unadmitted, phase="aborted"), 0.0, "x")


def test_per_deployment_steps_and_interval() -> None:
    route = _live()
    assert progress.steps_of(route, (10.0, 100.0)) == STEPS and progress.interval_of(route, 5.0) == 1.0
    plain = msgspec.structs.replace(route, strategy=None)
    assert progress.steps_of(plain, (10.0, 100.0)) == (10.0, 100.0) and progress.interval_of(plain, 5.0) == 5.0


def _categorical(feature: str, ref: float, cur: float) -> DriftReport:
    when = datetime.fromtimestamp(200.0, UTC)
    return DriftReport(served=True, deployment="d", window_start=when, window_end=when, reference_n=50, current_n=50, **_ARMS,
                       drifted=True, features=[FeatureDrift(feature=feature, psi=1.2, ks_stat=80.0, ks_pvalue=1e-9,
                                                            reference_mean=ref, current_mean=cur, drifted=True)])


@pytest.mark.parametrize(("feature", "ref", "cur", "aborts"), [
    ("finish_reason:length", 0.02, 0.6, True),  # truncated answers
    ("finish_reason:stop", 0.98, 0.4, True),
    ("finish_reason:stop", 0.4, 0.98, False),  # more answers end normally
    ("error_type:502", 0.0, 0.2, True),
    ("error_type:(none)", 0.99, 0.8, True),
    ("error_type:(none)", 0.8, 0.99, False),  # fewer errors
    ("model:m2", 0.0, 0.5, False),  # the canary's own model: the rollout itself
])
def test_categorical_drift_aborts_for_harm_naming_the_category(feature: str, ref: float, cur: float,
                                                               aborts: bool) -> None:
    new = progress.on_drift(_live(), _categorical(feature, ref, cur))
    assert (new is not None and new.phase == "aborted") is aborts
    if aborts:
        assert new is not None and f"DRIFT in {feature} (PSI 1.2, share {ref:.4g} -> {cur:.4g})" in new.reason


def test_drift_during_post_promotion_analysis_rolls_back() -> None:
    promoted = msgspec.structs.replace(domain.promote(_live(), "by operator"), verifying=True, promoted_at=150.0)
    back = progress.on_drift(promoted, _report(), decisions=_ok(promoted))
    assert back is not None and back.stable.release == "r1" and back.phase == "aborted"
    assert back.reason.startswith("rolled back r2: drift report ") and "during post-promotion analysis" in back.reason
    assert progress.on_drift(msgspec.structs.replace(promoted, promoted_at=250.0), _report()) is None  # older window
    # A reference begun before the promotion holds the previous release's traffic: a steady release drifted against
    # it and was rolled back seconds after its promotion (probe p69 F2). So does one naming no reference.
    assert progress.on_drift(promoted, _report(reference_start=140.0), decisions=_ok(promoted)) is None
    unnamed = msgspec.structs.replace(_report(), reference_window_start=None)
    assert progress.on_drift(promoted, unnamed, decisions=_ok(promoted)) is None


@pytest.mark.parametrize(("case", "since"), [
    ("live", 100.0), ("paused", 100.0), ("no weight", None), ("aborted", None), ("promoted", None),
    ("verifying", 150.0), ("drift metric", None), ("no canary", None)])
def test_a_drift_moves_a_live_canary_from_its_start_and_a_release_under_verification_from_its_promotion(
        case: str, since: float | None) -> None:
    """What the router's periodic read of drift reports reads them for (Rollouts._hold_drifts), as `on_drift` acts."""
    route = _live()
    if case == "paused":
        route = msgspec.structs.replace(route, paused=True)
    elif case == "no weight":
        route = msgspec.structs.replace(route, weight=0.0, phase="idle")
    elif case == "aborted":
        route = domain.abort(route, "by operator")
    elif case in ("promoted", "verifying"):
        route = msgspec.structs.replace(domain.promote(route, "by operator"), verifying=case == "verifying",
                                        promoted_at=150.0)
    elif case == "drift metric":  # the analysis judges drift itself: a report is its evidence only
        route = msgspec.structs.replace(route, strategy=Strategy(steps=list(STEPS), interval_s=1.0, analysis=AnalysisSpec(
            metrics=[MetricSpec(name="drift", max=0)])))
    elif case == "no canary":
        route = domain.default_route("d")
    assert progress.drift_moves(route) == since
    assert (progress.on_drift(route, _report(), decisions=_ok(route)) is not None) == (since is not None)


def test_drift_reports_are_replayed_per_deployment_under_analysis_from_its_rollout_start_within_a_bound() -> None:
    other = msgspec.structs.replace(_live(), deployment="e", started_at=40.0)
    idle = msgspec.structs.replace(_live(), deployment="f", strategy=None, started_at=10.0)  # no analysis: no evidence
    assert progress.drift_replay([_live(), other, idle], now=200.0) == {"d": 100.0, "e": 40.0}
    later = 100.0 + 2 * progress.DRIFT_REPLAY_MAX_S
    assert progress.drift_replay([_live()], now=later) == {"d": later - progress.DRIFT_REPLAY_MAX_S}
    assert progress.drift_replay([idle], now=200.0) == {}


def _moved(feature: str, comparison: str = "canary_vs_stable", ref: float = 6.8, cur: float = 132.9) -> DriftReport:
    when = datetime.fromtimestamp(200.0, UTC)
    arms = _ARMS if comparison == "canary_vs_stable" else {"comparison": comparison}
    return DriftReport(served=True, deployment="d", window_start=when, window_end=when, reference_n=50, current_n=50,
                       drifted=True, reference_window_start=when, reference_window_end=when, **arms,  # type: ignore[arg-type]
                       features=[FeatureDrift(feature=feature, psi=3.4, ks_stat=0.9, ks_pvalue=1e-9,
                                              reference_mean=ref, current_mean=cur, drifted=True, test_drifted=True)])


@pytest.mark.parametrize("feature", ["input_tokens", "prompt_text"])
def test_what_clients_send_never_aborts_a_canary_nor_rolls_a_release_back(feature: str) -> None:
    # Before: a client sending ~200-word prompts moved input_tokens in the deployment's report and aborted a
    # good canary within seconds. What clients send is no release's doing: reported, never acted on.
    assert driftharm.harmless(_moved(feature).features[0]) and not driftharm.harmful(_moved(feature))
    assert progress.on_drift(_live(), _moved(feature)) is None
    promoted = msgspec.structs.replace(domain.promote(_live(), "by operator"), verifying=True, promoted_at=150.0)
    assert progress.on_drift(promoted, _moved(feature, "now_vs_reference")) is None


def test_only_the_canarys_window_against_stables_acts_on_a_live_canary() -> None:
    # The deployment against its past moves with load and with what clients send, on both arms at once: a report
    # of the deployment as a whole (or of another canary release) never aborts this canary.
    slower = _moved("latency_ms", "now_vs_reference", ref=5.0, cur=50.0)
    assert progress.on_drift(_live(), slower) is None
    other = msgspec.structs.replace(_moved("latency_ms", ref=5.0, cur=50.0), release="r0")
    assert progress.on_drift(_live(), other) is None
    new = progress.on_drift(_live(), _moved("latency_ms", ref=5.0, cur=50.0))
    assert new is not None and new.phase == "aborted" and "(canary r2 vs stable r1)" in new.reason
    # After a promotion there is no stable arm: the promoted release's own window against its reference acts.
    promoted = msgspec.structs.replace(domain.promote(_live(), "by operator"), verifying=True, promoted_at=150.0)
    back = progress.on_drift(promoted, slower, decisions=_ok(promoted))
    assert back is not None and back.phase == "aborted" and "during post-promotion analysis" in back.reason


def test_served_events_are_replayed_from_the_earliest_rollout_under_analysis_within_a_bound() -> None:
    other = msgspec.structs.replace(_live(), deployment="e", started_at=40.0)
    idle = msgspec.structs.replace(_live(), deployment="f", strategy=None, started_at=10.0)  # no analysis
    assert progress.served_replay([_live(), other, idle], now=200.0) == 40.0
    assert progress.served_replay([idle], now=200.0) is None
    later = 100.0 + 2 * progress.SERVED_REPLAY_MAX_S
    assert progress.served_replay([_live()], now=later) == later - progress.SERVED_REPLAY_MAX_S
    # Under post-promotion analysis the baseline is the old release's traffic before the promotion.
    bg = Strategy(blue_green=BlueGreen(post_promotion_analysis=SPEC))
    verifying = msgspec.structs.replace(domain.promote(_live(strategy=bg), "by operator"), verifying=True,
                                        promoted_at=5000.0)
    assert progress.served_replay([verifying], now=later) == 5000.0 - progress.SERVED_REPLAY_MAX_S
    # Back on the bus after a loss, a replica reads what it missed (from `after`), never before a rollout's start.
    assert progress.served_replay([_live(), other], now=200.0, after=150.0) == 150.0
    assert progress.served_replay([_live(), other], now=200.0, after=20.0) == 40.0
    assert progress.served_replay([idle], now=200.0, after=150.0) is None


def test_a_latency_that_rose_by_less_than_anyone_notices_never_aborts() -> None:
    # Found by the suite on a busy machine: a healthy canary's arm was 1.2 ms slower than stable's (mean 1.3 -> 2.5
    # ms, PSI 0.6, a distribution test sees milliseconds) and the canary was aborted.
    noise = _moved("latency_ms", ref=1.3, cur=2.5)
    assert all(driftharm.harmless(f) for f in noise.features)
    assert progress.on_drift(_live(), noise) is None
    slow = _moved("latency_ms", ref=5.0, cur=5.0 + driftharm.MATERIAL_LATENCY_MS + 1)
    assert not any(driftharm.harmless(f) for f in slow.features)


def test_a_look_on_part_of_the_evidence_holds_the_step_and_is_not_counted() -> None:
    held = analysis.incomplete(_m("SUCCESSFUL"), "served evidence before the restart not yet read back")
    new = progress.on_measurement(_live(), held, STEPS, 1.0, now=102.0)
    assert new is not None and (new.phase, new.weight, new.next_step_at) == ("progressing", 25.0, 103.0)
    assert new.analysis is not None and (new.analysis.look, new.analysis.successes) == (0, 0)
    assert new.analysis.last is not None and new.analysis.last.verdict == "WAITING"
    # A failure seen meanwhile still aborts.
    new = progress.on_measurement(_live(), analysis.incomplete(_m("FAILED"), "not read back"), STEPS, 1.0, now=102.0)
    assert new is not None and new.phase == "aborted"


def _waiting(why: str = "waiting for 30 scores per variant (is online evaluation on?)") -> Measurement:
    result = MetricResult(name="score:pii_free", verdict="WAITING", why=why)
    return Measurement(verdict="WAITING", look=1, metrics=[result], canary_n=400, stable_n=400)


def _looks(route: Route, times: list[float], interval_s: float = 1.0) -> list[Route]:
    """The route after a WAITING look at each time."""
    seen = []
    for t in times:
        new = progress.on_measurement(route, _waiting(), STEPS, interval_s, now=t)
        assert new is not None
        seen.append(route := new)
    return seen


def test_a_step_that_waits_past_its_progress_deadline_counts_inconclusive_and_pauses() -> None:
    # Probe p15 F3: a look without evidence was WAITING for ever, never toward inconclusive_limit, so a canary whose
    # evidence never came (a score metric with online evaluation off) held its weight for ever, saying nothing.
    spec = msgspec.structs.replace(SPEC, progress_deadline_s=3.0, inconclusive_limit=1)
    route = _live(strategy=Strategy(steps=list(STEPS), interval_s=1.0, analysis=spec))
    first, second, third, fourth, fifth = _looks(route, [101.0, 102.0, 103.0, 104.0, 105.0])
    assert first.reason == route.reason and first.analysis is not None and first.analysis.waiting_since == 101.0
    assert not progress.overdue_now(first)
    # Past its interval the reason says the step waits, and for what; its first words stay.
    assert second.reason.startswith(route.reason) and not progress.overdue_now(second)
    assert second.reason.endswith("; waiting 1 s at step 1 (25%) for evidence: score:pii_free: waiting for 30 "
                                  "scores per variant (is online evaluation on?)")
    assert third.reason.count("; waiting ") == 1 and "waiting 2 s" in third.reason  # replaced, never piled up
    assert [r.analysis.inconclusives for r in (first, second, third) if r.analysis] == [0, 0, 0]
    assert not third.paused and third.analysis is not None and third.analysis.look == 0
    # From the deadline on each look counts as INCONCLUSIVE, and past the limit the canary pauses.
    assert fourth.analysis is not None and fourth.analysis.inconclusives == 1 and not fourth.paused
    assert fourth.analysis.last is not None and fourth.analysis.last.verdict == "INCONCLUSIVE"
    assert fourth.analysis.last.metrics[0].why.startswith("no evidence for 3 s, past the progress deadline (3 s): "
                                                          "waiting for 30 scores")
    assert progress.overdue_now(fourth) and fourth.analysis.look == 1
    assert fifth.paused and (fifth.weight, fifth.phase) == (25.0, "progressing")
    assert fifth.reason.startswith("paused at step 1 (25%): analysis inconclusive 2 times (score:pii_free: no "
                                   "evidence for 4 s, past the progress deadline (3 s): waiting for 30 scores")


def test_a_look_that_does_not_wait_ends_the_wait_and_the_reason_says_so() -> None:
    route = _live(strategy=Strategy(steps=list(STEPS), interval_s=1.0,
                                    analysis=msgspec.structs.replace(SPEC, progress_deadline_s=3.0, count=2)))
    waited = _looks(route, [101.0, 102.0, 103.0])[-1]
    judged = progress.on_measurement(waited, _m("SUCCESSFUL"), STEPS, 1.0, now=104.0)
    assert judged is not None and judged.reason == route.reason and judged.analysis is not None
    assert judged.analysis.waiting_since == 0.0 and not progress.overdue_now(judged)
    # The wait starts again: a look right after the deadline of the old wait still only waits.
    again = _looks(judged, [105.0, 106.0, 107.0])[-1]
    assert again.analysis is not None and again.analysis.inconclusives == 0


def test_a_paused_canary_never_waits_toward_its_deadline_and_a_resume_starts_the_wait_again() -> None:
    route = _live(strategy=Strategy(steps=list(STEPS), interval_s=1.0,
                                    analysis=msgspec.structs.replace(SPEC, progress_deadline_s=3.0)))
    paused = progress.pause(_looks(route, [101.0, 102.0])[-1], "apikey:ops")
    held = _looks(paused, [103.0, 110.0, 120.0])[-1]
    assert held.analysis is not None and held.analysis.inconclusives == 0 and held.reason == paused.reason
    resumed = progress.resume(held, "apikey:ops", 1.0, now=121.0)
    after = _looks(resumed, [122.0, 123.0])[-1]
    assert after.analysis is not None and after.analysis.inconclusives == 0 and after.analysis.waiting_since == 122.0


def test_the_default_progress_deadline_is_ten_intervals_and_at_least_ten_minutes() -> None:
    assert progress.deadline_of(SPEC, 60.0) == 600.0  # Argo Rollouts' progressDeadlineSeconds default
    assert progress.deadline_of(SPEC, 1.0) == 600.0
    assert progress.deadline_of(SPEC, 120.0) == 1200.0
    assert progress.deadline_of(msgspec.structs.replace(SPEC, progress_deadline_s=5.0), 60.0) == 5.0
    route = _live()  # interval 1 s: the deadline is ten minutes
    assert _looks(route, [101.0, 700.0])[-1].analysis.inconclusives == 0  # type: ignore[union-attr]
    assert _looks(route, [101.0, 701.0])[-1].analysis.inconclusives == 1  # type: ignore[union-attr]


def test_a_release_under_post_promotion_analysis_without_evidence_is_rolled_back_past_its_deadline() -> None:
    # README: an unverified release does not keep all the traffic for ever. Its own sample never filling (clients
    # hanging up on it, probe p15 F1c) left every look WAITING, and the release verifying for ever.
    spec = msgspec.structs.replace(SPEC, progress_deadline_s=2.0, inconclusive_limit=1)
    bg = Strategy(blue_green=BlueGreen(post_promotion_analysis=spec))
    promoted = msgspec.structs.replace(domain.promote(_live(strategy=bg), "by operator"), verifying=True,
                                       promoted_at=150.0, reason="promoted r2; post-promotion analysis running")
    seen = []
    for t in (151.0, 152.0, 153.0, 154.0):
        new = progress.on_measurement(promoted, _waiting("waiting for 100 events per variant (canary 0, stable 400)"),
                                      STEPS, 1.0, now=t, decisions=_ok(promoted))
        assert new is not None
        seen.append(promoted := new)
    assert [r.phase for r in seen] == ["promoted", "promoted", "promoted", "aborted"]
    assert seen[1].reason.endswith("; waiting 1 s after the promotion for evidence: score:pii_free: waiting for 100 "
                                   "events per variant (canary 0, stable 400)")
    assert seen[3].stable.release == "r1"
    assert seen[3].reason.startswith("rolled back r2: post-promotion analysis inconclusive 2 times: score:pii_free: "
                                     "no evidence for 3 s, past the progress deadline (2 s)")
    # A verification that passes after waiting says so, without the wait's note.
    passed = progress.on_measurement(seen[1], _m("SUCCESSFUL"), STEPS, 1.0, now=152.5)
    assert passed is not None and passed.reason == "promoted r2; post-promotion analysis passed"


def _preview(auto: float | None, **changes: object) -> Route:
    """A blue-green preview of r2 live since 200 (promoting itself `auto` s later, if set)."""
    route = _live(weight=0.0, step=0, strategy=Strategy(interval_s=10.0, blue_green=BlueGreen(auto_promotion_s=auto)))
    return msgspec.structs.replace(bluegreen.live(route, 200.0, 10.0, "gate PASS"), **changes)


@pytest.mark.parametrize(("route", "clocks"), [
    (_live(100.0, 3, strategy=Strategy(steps=list(STEPS), interval_s=10.0), next_step_at=205.0),
     {"next_step_at": 310.0}),
    (_live(25.0, 2, strategy=Strategy(steps=[Step(set_weight=25.0), Step(pause=Pause(duration_s=60.0)),
                                             Step(set_weight=100.0)], interval_s=10.0),
           cursor=2, paused=True, step_pause=True, step_paused_at=190.0, resume_at=250.0, next_step_at=205.0),
     {"next_step_at": 310.0, "resume_at": 360.0, "step_paused_at": 300.0}),
    (_preview(20.0), {"live_at": 300.0, "promote_at": 320.0, "next_step_at": 310.0}),
])
def test_a_canary_swapped_into_a_live_rollout_is_timed_from_the_swap(route: Route, clocks: dict[str, float]) -> None:
    passed = GateDecided(release="r3", decision="PASS", rules=[])
    new = progress.replace_canary(route, Target(release="r3"), passed, 300.0, 10.0)
    assert {k: getattr(new, k) for k in clocks} == clocks and new.started_at == 300.0
    waiting = progress.replace_canary(route, Target(release="r3"), None, 300.0, 10.0)  # no decision: no clock
    assert (waiting.phase, waiting.next_step_at, waiting.resume_at, waiting.promote_at) == ("idle", 0.0, 0.0, 0.0)


def test_a_patched_strategy_times_the_step_and_the_promotion_under_way() -> None:
    stepping = _live(strategy=Strategy(steps=list(STEPS), interval_s=10.0), next_step_at=205.0)
    longer = progress.replace_strategy(stepping, Strategy(steps=list(STEPS), interval_s=60.0), 5.0, 300.0)
    assert longer.next_step_at == 255.0  # the step began at 195
    default = progress.replace_strategy(stepping, Strategy(steps=list(STEPS)), 5.0, 300.0)
    assert default.next_step_at == 200.0  # the router's interval
    by_hand = progress.replace_strategy(_preview(20.0, promote_at=400.0), Strategy(interval_s=10.0,
                                                                              blue_green=BlueGreen()), 5.0, 300.0)
    assert by_hand.promote_at == 0.0 and by_hand.reason == "preview r2: promote by hand (lockgate rollout promote)"
    timed = progress.replace_strategy(_preview(None), Strategy(interval_s=10.0, blue_green=BlueGreen(
        auto_promotion_s=50.0)), 5.0, 300.0)
    assert (timed.live_at, timed.promote_at) == (200.0, 250.0) and "promotes itself at" in timed.reason
    same = _preview(20.0, promote_at=400.0)  # held by a breaker, say: an unchanged delay keeps the route's time
    assert progress.replace_strategy(same, same.strategy, 5.0, 300.0).promote_at == 400.0


def _at_pause(pause: dict[str, float]) -> Route:
    """A canary of [10, pause, 50, 100] (interval 10 s) whose pause step began at 210, as the program runs it."""
    live = progress.on_decision(_live(0.0, 0, phase="idle", admitted="", strategy=_steps(pause)),
                                GateDecided(release="r2", decision="PASS", rules=[]), STEPS, 10.0, 200.0)
    assert live is not None and (live.weight, live.step) == (10.0, 1), live
    held = progress.on_time(live, STEPS, 10.0, 210.0)
    assert held is not None and (held.step, held.step_pause, held.step_paused_at) == (2, True, 210.0), held
    return held


def _steps(pause: dict[str, float], *, at: object = None) -> Strategy:
    """[10, pause, 50, 100] at 10 s a step, or with `at` in the pause's place."""
    return msgspec.convert({"steps": [10, at if at is not None else {"pause": pause}, 50, 100], "interval_s": 10},
                           Strategy)


@pytest.mark.parametrize(("was", "now", "resume_at", "says"), [
    ({"duration_s": 30.0}, {}, 0.0, "step 2/4: paused until approved (lockgate rollout approve) at 10%"),
    ({"duration_s": 30.0}, {"duration_s": 60.0}, 270.0, "step 2/4: paused 60 s at 10%"),
    ({"duration_s": 30.0}, {"duration_s": 5.0}, 215.0, "step 2/4: paused 5 s at 10%"),  # over: at the next tick
    ({}, {"duration_s": 30.0}, 240.0, "step 2/4: paused 30 s at 10%"),
])
def test_a_patched_pause_at_the_step_held_at_ends_as_the_new_step_says(
        was: dict[str, float], now: dict[str, float], resume_at: float, says: str) -> None:
    # Before (probe p58 F1), the route kept the old pause's end: a pause patched to wait for approval ended by itself
    # at the old time, and the canary went on to 100% unapproved; a changed duration still waited the old time.
    held = _at_pause(was)
    new = progress.replace_strategy(held, _steps(now), 5.0, 220.0)
    assert (new.weight, new.step, new.paused, new.step_pause) == (10.0, 2, True, True), new
    assert (new.step_paused_at, new.resume_at) == (210.0, resume_at) and new.reason == says, new
    if resume_at:  # the new end, not the old one (240), moves it on
        assert progress.due_at(new) == resume_at and progress.on_time(new, STEPS, 10.0, resume_at - 1) is None
        later = progress.on_time(new, STEPS, 10.0, resume_at)
        assert later is not None and (later.weight, later.step, later.paused) == (50.0, 3, False), later
    else:  # only an approval of step 2 ends it
        assert progress.on_time(new, STEPS, 10.0, 10_000.0) is None and progress.due_at(new) is None
        assert progress.waits_for_approval(new)
        approved = progress.approve(new, 2, "r2", None, "op", 10.0, 260.0)
        assert (approved.weight, approved.step, approved.paused) == (50.0, 3, False), approved


@pytest.mark.parametrize("instead", [{"set_weight": 30}, {"set_header_route": {"header": "x-t", "value": "1"}}, None])
def test_a_pause_patched_away_from_the_step_held_at_waits_for_approval(instead: object) -> None:
    # The step now at the pause's place (or none: a shorter list) says nothing of when the rollout goes on, so
    # no clock moves it: the PATCH keeps its weight and position, and an approval of the step moves it.
    held = _at_pause({"duration_s": 30.0})
    strategy = _steps({}, at=instead) if instead is not None else Strategy(steps=[10.0], interval_s=10.0)
    new = progress.replace_strategy(held, strategy, 5.0, 220.0)
    assert (new.weight, new.step, new.paused, new.step_pause, new.resume_at) == (10.0, 2, True, True, 0.0), new
    assert new.reason.endswith("is no pause now: held at 10% until approved (lockgate rollout approve)"), new
    assert progress.on_time(new, STEPS, 10.0, 10_000.0) is None and progress.waits_for_approval(new)
    again = progress.replace_strategy(new, msgspec.structs.replace(strategy, interval_s=20.0), 5.0, 230.0)
    assert (again.resume_at, again.reason) == (0.0, new.reason), again  # still held by a PATCH that leaves it
    back = progress.replace_strategy(new, _steps({"duration_s": 30.0}), 5.0, 230.0)  # a pause put back: as begun
    assert (back.resume_at, back.reason) == (240.0, "step 2/4: paused 30 s at 10%"), back


def test_a_patch_that_leaves_the_pause_keeps_its_end() -> None:
    # An open breaker of the canary put the pause's end off (to 250, say): a PATCH of something else keeps it.
    held = msgspec.structs.replace(_at_pause({"duration_s": 30.0}), resume_at=250.0, reason="held")
    new = progress.replace_strategy(held, msgspec.structs.replace(_steps({"duration_s": 30.0}), analysis=SPEC),
                                    5.0, 220.0)
    assert (new.resume_at, new.reason) == (250.0, "held"), new
