"""The analysis' `drift` metric: the drift monitor's report covering the canary counted against `max`, the
evidence that keeps the latest report, the router's direct abort deferring to it, and its signed record. Pure."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from lockgate import analysisruns
from lockgate.contracts import AnalysisRun, DriftReport, FeatureDrift
from lockgate.services.router import analysis, domain, progress, runs
from lockgate.services.router.analysis import AnalysisSpec, MetricSpec, VariantSample
from lockgate.services.router.domain import CanaryRequest, Route, Target
from lockgate.services.router.evidence import Evidence
from lockgate.services.router.strategy import Strategy
from lockgate.signing import Keyring, Signer

pytestmark = pytest.mark.timeout(30)

DRIFT = AnalysisSpec(metrics=[MetricSpec(name="drift", max=0)], min_sample=10)
SAMPLE = VariantSample(n=50, latency_ms=[10.0] * 50)


def _f(feature: str, ref: float, cur: float, *, drifted: bool = True, psi: float = 0.9) -> FeatureDrift:
    return FeatureDrift(feature=feature, psi=psi, ks_stat=0.6, ks_pvalue=1e-6, reference_mean=ref, current_mean=cur,
                        drifted=drifted, test="ks", statistic=0.6, p_value=1e-6, threshold=0.05, test_drifted=drifted)


def _report(*features: FeatureDrift, comparison: str = "canary_vs_stable", release: str = "r2",
            end: float = 200.0) -> DriftReport:
    t = datetime.fromtimestamp(end, UTC)
    return DriftReport(served=True, deployment="d", window_start=t, window_end=t, reference_n=50, current_n=50,
                       features=list(features), drifted=any(f.drifted for f in features),
                       comparison=comparison,  # type: ignore[arg-type]
                       release=release if comparison == "canary_vs_stable" else "",
                       reference_release="r1" if comparison == "canary_vs_stable" else "")


def _deployment_report(start: float, end: float) -> DriftReport:
    """A now-versus-reference report of the deployment whose window spans `start` to `end` (unix seconds)."""
    return msgspec.structs.replace(_report(comparison="now_vs_reference", end=end),
                                   window_start=datetime.fromtimestamp(start, UTC))


def test_evidence_takes_no_report_of_events_no_router_served() -> None:
    ev = Evidence(lambda e: None)
    ev.add_drift(msgspec.structs.replace(_report(_f("output_tokens", 12, 36)), served=False))
    ev.add_drift(msgspec.structs.replace(_report(_f("output_tokens", 12, 36), comparison="now_vs_reference"),
                                         served=False))
    assert ev.drift("d", "r2", since=0.0) is None


def _measure(spec: AnalysisSpec, report: DriftReport | None) -> analysis.MetricResult:
    return analysis.measure(spec, SAMPLE, SAMPLE, look=1, drift=report).metrics[0]


def test_drift_metric_needs_max_and_nothing_relative() -> None:
    for bad in ({"name": "drift"}, {"name": "drift", "max": 0, "max_ratio": 2.0},
                {"name": "drift", "max": 0, "min": 1.0}, {"name": "drift", "max": 0, "scorer": "length"}):
        with pytest.raises(msgspec.ValidationError, match="metric drift: give max"):
            msgspec.convert(bad, MetricSpec)
    with pytest.raises(msgspec.ValidationError, match="features and min_psi are for drift metrics"):
        msgspec.convert({"name": "error_rate", "max": 0.1, "features": ["output_tokens"]}, MetricSpec)
    spec = msgspec.convert({"name": "drift", "max": 0, "features": ["output_tokens"]}, MetricSpec)
    assert runs.condition(spec) == "<= 0 drifted features among output_tokens in the canary_vs_stable report"
    assert runs.condition(spec, "now_vs_reference") == (
        "<= 0 drifted features among output_tokens in the now_vs_reference report")  # at 100%, after a promotion


def test_no_report_covering_the_canary_never_passes() -> None:
    r = _measure(DRIFT, None)
    assert r.verdict == "WAITING" and "waiting for a drift report covering the canary" in r.why
    m = analysis.measure(DRIFT, SAMPLE, SAMPLE, look=1, drift=None)
    assert m.verdict == "WAITING"  # holds the step: no data is never a pass


def test_a_harmful_drift_fails_naming_the_feature() -> None:
    r = _measure(DRIFT, _report(_f("output_tokens", 12, 36), _f("latency_ms", 5, 5, drifted=False, psi=0.01)))
    assert (r.verdict, r.canary, r.threshold, r.features) == ("FAILED", 1.0, 0.0, ["output_tokens"])
    assert (r.canary_n, r.stable_n) == (50, 50)
    text = analysis.describe(r)
    assert text.startswith("drift 1 drifted features > max 0: DRIFT in output_tokens (PSI 0.9, mean 12 -> 36)")
    assert "canary_vs_stable report" in text and "of r2 vs r1" in text


def test_improvements_and_the_canarys_own_model_never_count() -> None:
    report = _report(_f("latency_ms", 50, 20), _f("model:m2", 0.0, 1.0), _f("status:ok", 0.9, 1.0))
    r = _measure(DRIFT, report)
    assert r.verdict == "SUCCESSFUL" and r.canary == 0.0 and r.features == []
    assert "no harmful drift in 3 features, largest PSI 0.9" in r.why


def test_features_restrict_the_count_and_a_report_without_them_waits() -> None:
    report = _report(_f("latency_ms", 20, 50), _f("finish_reason:length", 0.0, 0.4))
    only_tokens = AnalysisSpec(metrics=[MetricSpec(name="drift", max=0, features=["output_tokens"])], min_sample=10)
    assert _measure(only_tokens, report).verdict == "WAITING"  # the report measures none of them
    finish = AnalysisSpec(metrics=[MetricSpec(name="drift", max=0, features=["finish_reason"])], min_sample=10)
    r = _measure(finish, report)
    assert r.verdict == "FAILED" and r.features == ["finish_reason:length"]
    lenient = AnalysisSpec(metrics=[MetricSpec(name="drift", max=1)], min_sample=10)
    assert _measure(lenient, report).verdict == "FAILED"  # two harmful features, one allowed
    both = AnalysisSpec(metrics=[MetricSpec(name="drift", max=2)], min_sample=10)
    assert _measure(both, report).verdict == "SUCCESSFUL"


def test_min_psi_counts_on_the_test_and_its_own_psi() -> None:
    quiet = _f("output_tokens", 12, 14, drifted=False, psi=0.15)  # significant, under the monitor's PSI alarm
    quiet = msgspec.structs.replace(quiet, test_drifted=True)
    assert _measure(DRIFT, _report(quiet)).verdict == "SUCCESSFUL"
    strict = AnalysisSpec(metrics=[MetricSpec(name="drift", max=0, min_psi=0.1)], min_sample=10)
    assert _measure(strict, _report(quiet)).verdict == "FAILED"


def test_dry_run_drift_is_shown_and_never_decides() -> None:
    spec = AnalysisSpec(metrics=[MetricSpec(name="drift", max=0, dry_run=True),
                                 MetricSpec(name="error_rate", max=0.5)], min_sample=10)
    m = analysis.measure(spec, SAMPLE, SAMPLE, look=1, drift=_report(_f("output_tokens", 12, 36)))
    assert m.metrics[0].verdict == "FAILED" and m.metrics[0].dry_run and m.verdict == "SUCCESSFUL"


def test_evidence_keeps_the_newest_report_of_each_kind_and_never_one_for_the_other() -> None:
    ev = Evidence(lambda e: None)
    assert ev.drift("d", "r2", since=100.0) is None
    now_vs_ref = _report(_f("output_tokens", 12, 36), comparison="now_vs_reference", end=150.0)
    ev.add_drift(now_vs_ref)
    # Before, the deployment's report stood in for the canary's while none of its own existed: a probe's client
    # drifted it by what it asked and aborted a healthy canary, or promoted a bad one on ~95% stable traffic.
    assert ev.drift("d", "r2", since=100.0) is None
    assert ev.drift("d", "r2", since=100.0, comparison="now_vs_reference") == now_vs_ref
    assert ev.drift("d", "", since=160.0, comparison="now_vs_reference") is None  # older than the window asked for
    older, newer = _report(end=170.0), _report(end=180.0)
    ev.add_drift(newer)
    ev.add_drift(older)  # a late redelivery never replaces a newer report
    ev.add_drift(_report(end=190.0, release=""))  # a canary-versus-stable report about no release: about none
    assert ev.drift("d", "r2", since=100.0) == newer
    assert ev.drift("d", "r2", since=100.0, comparison="now_vs_reference") == now_vs_ref
    assert ev.drift("d", "r3", since=100.0) is None  # another canary release's report is not this one's
    ev.forget("d", keep={"r1", "r3"})
    assert ev.drift("d", "r2", since=100.0) is None


def _live(spec: AnalysisSpec) -> Route:
    r = domain.start_canary(domain.default_route("d"), CanaryRequest(stable_release="r1", canary_release="r2"),
                            stable=Target(release="r1"), canary=Target(release="r2"), first_step=50.0)
    return msgspec.structs.replace(r, phase="progressing", weight=50.0, step=1, admitted="dec-1", started_at=100.0,
                                   strategy=Strategy(steps=[50.0, 100.0], interval_s=1.0, analysis=spec))


def test_the_direct_abort_defers_to_an_analysis_with_a_drift_metric() -> None:
    report = _report(_f("output_tokens", 12, 36))
    errors = AnalysisSpec(metrics=[MetricSpec(name="error_rate", max=0.1)], min_sample=10)
    aborted = progress.on_drift(_live(errors), report)
    assert aborted is not None and aborted.phase == "aborted"
    assert progress.drift_judged(_live(DRIFT)) and progress.on_drift(_live(DRIFT), report) is None


def test_the_record_names_the_drifted_features_and_signs_them_only_when_set() -> None:
    route = _live(DRIFT)
    m = analysis.measure(DRIFT, SAMPLE, SAMPLE, look=1, drift=_report(_f("output_tokens", 12, 36)))
    after = progress.on_measurement(route, m, (50.0, 100.0), 1.0, now=102.0)
    run = runs.record(route, after, m, DRIFT)
    assert run is not None and (run.phase, run.outcome, run.drifted_features) == ("Failed", "aborted", ["output_tokens"])
    (metric,) = run.metrics
    assert (metric.name, metric.condition, metric.canary, metric.threshold) == (
        "drift", "<= 0 drifted features in the canary_vs_stable report", 1.0, 0.0)
    assert "DRIFT in output_tokens" in metric.why
    signer = Signer.generate()
    ring = Keyring([signer.public])
    signed = analysisruns.sign(run, signer)
    assert analysisruns.verify(signed, ring) == signer.key_id
    with pytest.raises(Exception, match="signature"):
        analysisruns.verify(msgspec.structs.replace(signed, drifted_features=[]), ring)
    # A record made before the field existed signs the same bytes as before: it has no `drifted_features` key.
    plain = AnalysisRun(deployment="d", release="r2", phase="Successful")
    assert b"drifted_features" not in analysisruns.content(plain)


def _passed(route: Route, at: float) -> Route:
    calm = _f("output_tokens", 12, 12, drifted=False, psi=0.01)
    m = analysis.measure(DRIFT, SAMPLE, SAMPLE, look=1, drift=_report(calm, end=at - 1.0))
    assert m.verdict == "SUCCESSFUL"
    after = progress.on_measurement(route, m, (50.0, 100.0), 1.0, now=at)
    assert after is not None
    return after


def test_a_live_canary_is_judged_on_its_own_report_since_its_step_began_only() -> None:
    # Before, a probe's bad canary was promoted on one now-versus-reference report (~95% stable traffic) judged at
    # both looks: the one that advanced it to 100% and the one that promoted it.
    route = _live(DRIFT)
    assert progress.drift_evidence(route, since=100.0) == ("canary_vs_stable", "r2", 100.0, False)
    ev = Evidence(lambda e: None)
    ev.add_drift(_report(end=99.0))
    assert ev.drift("d", "r2", 100.0, "canary_vs_stable") is None
    fresh = _report(end=101.0)
    ev.add_drift(fresh)
    assert ev.drift("d", "r2", 100.0, "canary_vs_stable") == fresh


def test_at_100_percent_the_deployments_report_of_the_step_alone_judges_the_canary() -> None:
    # Stable has no arm at 100%: no canary-versus-stable report can be made there (each pairs stable's rows of the
    # same time). Before, the promotion waited for one that came only if the step's first rows reached one as it
    # began; the report that passed step 1 must not pass it either.
    advanced = _passed(_live(DRIFT), at=150.0)
    assert (advanced.weight, advanced.analysis.step_at) == (100.0, 150.0)  # type: ignore[union-attr]
    kind, release, since, whole = progress.drift_evidence(advanced, since=100.0)
    assert (kind, release, since, whole) == ("now_vs_reference", "r2", 150.0, True)
    ev = Evidence(lambda e: None)
    ev.add_drift(_report(end=151.0))  # canary-versus-stable, from step 1's rows: another kind
    ev.add_drift(_deployment_report(start=149.0, end=160.0))  # partly step 1's traffic
    assert ev.drift("d", release, since, kind, whole) is None
    fresh = _deployment_report(start=151.0, end=170.0)
    ev.add_drift(fresh)
    assert ev.drift("d", release, since, kind, whole) == fresh


def test_a_step_after_a_pause_counts_reports_from_the_pause_s_end() -> None:
    program = msgspec.convert({"steps": [50, {"pause": {"duration_s": 10}}, 100], "interval_s": 1.0,
                               "analysis": msgspec.to_builtins(DRIFT)}, Strategy)
    route = msgspec.structs.replace(_live(DRIFT), strategy=program, cursor=1)
    paused = _passed(route, at=150.0)
    assert paused.paused and paused.step_pause and paused.analysis.step_at == 150.0  # type: ignore[union-attr]
    assert progress.on_time(paused, (50.0, 100.0), 1.0, now=161.0) is None  # its look ends it (probe p75 F2)
    over = _passed(paused, at=161.0)
    assert over.weight == 100.0 and not over.paused
    assert progress.drift_evidence(over, since=100.0)[2] == 161.0
    approved = progress.resume(msgspec.structs.replace(paused, resume_at=0.0), "ops", 1.0, now=170.0)
    assert approved.weight == 100.0 and progress.drift_evidence(approved, since=100.0)[2] == 170.0


def test_after_a_blue_green_promotion_the_deployments_report_is_the_evidence() -> None:
    promoted = msgspec.structs.replace(_live(DRIFT), phase="promoted", verifying=True, stable=Target(release="r2"),
                                       previous=Target(release="r1"), promoted_at=300.0)
    assert progress.drift_evidence(promoted, since=300.0) == ("now_vs_reference", "r2", 300.0, False)
