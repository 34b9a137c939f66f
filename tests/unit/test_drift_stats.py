"""PSI and KS on hand-checked examples; the drift monitor's window arithmetic."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import msgspec
import numpy as np
import pytest

from lockgate.contracts import InferenceEvent
from lockgate.services.drift import stats
from lockgate.services.drift.domain import FEATURES, DriftMonitor

pytestmark = pytest.mark.timeout(30)


def test_psi_matches_a_hand_computed_example() -> None:
    ref = np.arange(100, dtype=float)  # deciles put exactly 10 values in each of 10 bins
    cur = np.repeat(np.arange(50, dtype=float), 2)  # bins 0-4 hold 20% each, bins 5-9 are empty
    # The shares part furthest at 49 and at least half as far from 24 to 74 (`stats.shift_cuts`): those cuts halve
    # the bins of 20-29 (both shares doubled, as before) and 70-79 (two empty bins of 5% each).
    assert sorted(stats.shift_cuts(ref, cur)) == [24.0, 49.0, 74.0, 99.0]
    eps = 0.5 / 100  # an empty bin counts as half an observation
    expected = (5 * (0.2 - 0.1) * math.log(0.2 / 0.1) + 4 * (eps - 0.1) * math.log(eps / 0.1)
                + 2 * (eps - 0.05) * math.log(eps / 0.05))
    assert stats.psi(ref, cur) == pytest.approx(expected, rel=1e-12)


def test_psi_from_proportions_formula() -> None:
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    expected = (0.25 - 0.5) * math.log(0.5) + (0.75 - 0.5) * math.log(1.5)
    assert stats.psi_from_proportions(p, q) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_identical_distributions_have_psi_near_zero(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = rng.normal(100, 15, 5000)
    assert stats.psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert stats.psi(ref, rng.normal(100, 15, 5000)) < 0.02


@pytest.mark.parametrize("shift", [15.0, 30.0])
def test_shifted_distribution_flags_drift(shift: float) -> None:
    rng = np.random.default_rng(7)
    ref, cur = rng.normal(100, 15, 2000), rng.normal(100 + shift, 15, 2000)
    assert stats.psi(ref, cur) > 0.2


def test_discrete_reference_collapses_bins_without_error() -> None:
    ref = np.array([1.0] * 90 + [2.0] * 10)
    assert stats.psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert stats.psi(ref, np.full(100, 5.0)) > 1.0


def test_ks_matches_the_empirical_cdf_distance() -> None:
    rng = np.random.default_rng(11)
    a, b = rng.normal(0, 1, 300), rng.normal(0.5, 1, 400)
    grid = np.sort(np.concatenate([a, b]))
    def ecdf(x: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.sort(x), grid, side="right") / len(x)

    stat, p = stats.ks(a, b)
    assert stat == pytest.approx(float(np.max(np.abs(ecdf(a) - ecdf(b)))))
    assert p < 1e-3


def _events(n: int, *, deployment: str = "d1", output: float = 100.0, start: int = 0) -> list[InferenceEvent]:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    rng = np.random.default_rng(start)
    outs = rng.normal(output, 10, n).clip(0)
    return [
        InferenceEvent(app="shop", deployment=deployment, output_tokens=int(o), input_tokens=50 + i % 7,
                       latency_ms=200.0 + i % 13, time=t0 + timedelta(seconds=start + i))
        for i, o in enumerate(outs)
    ]


def test_monitor_reports_every_window_after_the_reference() -> None:
    m = DriftMonitor(reference_size=500, window_size=250, psi_threshold=0.2)
    assert m.observe_events(_events(749)) == []
    [first] = m.observe_events(_events(1, start=749))
    assert (first.reference_n, first.current_n) == (500, 250)
    # every feature the events measure: no online scores (none were scored), no refusal (it is a score)
    assert [f.feature.split(":")[0] for f in first.features] == [
        f for f in FEATURES if not f.startswith("score.") and f != "refusal"]
    assert not first.drifted
    # One batch spanning two boundaries gives two reports.
    assert len(m.observe_events(_events(500, start=750))) == 2


def test_events_no_router_served_have_windows_of_their_own_and_reports_that_say_so() -> None:
    m = DriftMonitor(reference_size=100, window_size=50, psi_threshold=0.2)
    assert m.observe_events(_events(100), served=True) == []  # the served reference
    # An application's events of the same deployment, drifting: their own windows, their own reports.
    [own] = m.observe_events(_events(100, start=100) + _events(50, output=400.0, start=200), served=False)
    assert own.drifted and not own.served and own.deployment == "d1"
    # The served windows never saw them: the next served window is compared with the served reference.
    [served] = m.observe_events(_events(50, start=300), served=True)
    assert served.served and not served.drifted and served.reference_n == 100
    m.reset("d1")  # a promotion: both start again
    assert m.windows == {}


def test_monitor_flags_a_shift_and_resets_on_promotion() -> None:
    m = DriftMonitor(reference_size=100, window_size=50, psi_threshold=0.2)
    m.observe_events(_events(100))
    [report] = m.observe_events(_events(50, output=300.0, start=100))
    out = next(f for f in report.features if f.feature == "output_tokens")
    assert report.drifted and out.drifted and out.current_mean > out.reference_mean
    assert report.window_start == datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=100)
    assert report.window_end == datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=149)
    m.reset("d1")
    assert m.observe_events(_events(100, output=300.0, start=200)) == []
    [after] = m.observe_events(_events(50, output=300.0, start=300))
    assert after.reference_n == 100
    out_after = next(f for f in after.features if f.feature == "output_tokens")
    assert out_after.reference_mean == pytest.approx(out_after.current_mean, rel=0.05)


def test_deployments_have_separate_windows() -> None:
    m = DriftMonitor(reference_size=10, window_size=10, psi_threshold=0.2)
    mixed = _events(20, deployment="a") + _events(15, deployment="b")
    reports = m.observe_events(mixed)
    assert [r.deployment for r in reports] == ["a"]


def test_windows_survive_a_snapshot_round_trip_in_order() -> None:
    from lockgate.services.drift.domain import Snapshot, restore, snapshot

    rng = np.random.default_rng(3)
    values, times = rng.normal(100, 10, (130, len(FEATURES))), np.arange(130, dtype=np.float64)
    live = DriftMonitor(50, 40, 0.2)
    live.observe("web", values[:110], times[:110], app="shop")  # reference full, ring wrapped once
    saved = msgspec.json.decode(msgspec.json.encode(snapshot("web", live.windows["web"])), type=Snapshot)
    restarted = DriftMonitor(50, 40, 0.2)
    restarted.windows["web"] = restore(saved, 50, 40)
    # both see the same remaining events and produce the same next report
    (a,) = live.observe("web", values[110:], times[110:], app="shop")
    (b,) = restarted.observe("web", values[110:], times[110:], app="shop")
    assert [f.psi for f in a.features] == pytest.approx([f.psi for f in b.features])
    assert (a.window_start, a.window_end, a.reference_n) == (b.window_start, b.window_end, b.reference_n)


def _answers(n: int, finish: str, start: int = 0, error_type: str = "") -> list[InferenceEvent]:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    return [InferenceEvent(app="shop", deployment="d1", output_tokens=100, latency_ms=200.0, input_tokens=50,
                           finish_reason=finish if i % 10 else "stop", error_type=error_type, model="m",
                           time=t0 + timedelta(seconds=start + i)) for i in range(n)]


def test_categorical_drift_names_the_category_whose_share_moved() -> None:
    m = DriftMonitor(reference_size=200, window_size=100, psi_threshold=0.2)
    m.observe_events(_answers(200, "stop"))
    [report] = m.observe_events(_answers(100, "length", start=200))  # 90% of answers now truncated
    finish = next(f for f in report.features if f.feature.startswith("finish_reason:"))
    assert report.drifted and finish.drifted and finish.feature == "finish_reason:length"
    assert (finish.reference_mean, finish.current_mean) == (0.0, 0.9)  # the category's share before and now
    assert finish.ks_pvalue < 1e-6  # chi-squared test of the two windows
    steady = next(f for f in report.features if f.feature.startswith("model:"))
    assert not steady.drifted and steady.psi == 0.0 and steady.ks_pvalue == 1.0
    numeric = [f for f in report.features if ":" not in f.feature]
    assert numeric and not any(f.drifted for f in numeric)


def test_chi_squared_matches_scipy_on_a_hand_table() -> None:
    from scipy.stats import chi2_contingency

    ref = np.array([1.0] * 70 + [2.0] * 30)
    cur = np.array([1.0] * 50 + [2.0] * 40 + [3.0] * 10)
    psi, chi2, p, top, share_ref, share_cur = stats.categorical(ref, cur)
    expected = chi2_contingency(np.array([[70, 30, 0], [50, 40, 10]]), correction=False)
    assert (chi2, p) == pytest.approx((expected.statistic, expected.pvalue))
    assert (top, share_ref, share_cur) == (1.0, 0.7, 0.5) and psi > 0


def test_a_snapshot_from_before_the_categorical_features_starts_afresh() -> None:
    from lockgate.services.drift.domain import Snapshot, restore

    old = Snapshot(deployment="web", app="shop", tenant="t", reference=[[1.0, 2.0, 3.0]] * 5,
                   current=[[1.0, 2.0, 3.0]] * 2, current_times=[1.0, 2.0], since_report=2)
    w = restore(old, 50, 40)
    assert (w.ref.n, w.cur.n, w.app) == (0, 0, "shop")


def test_of_two_categories_that_moved_alike_the_one_that_rose_is_named() -> None:
    # With two categories their shares always move alike: errors appearing (0 -> 0.42) are "(none)" falling
    # (1 -> 0.58). Before, float noise picked either, so an abort's reason named one or the other from run to run.
    for none, error in ((0.0, 1.0), (1.0, 0.0)):  # whichever code the category drew
        reference = np.full(100, none)
        current = np.array([none] * 58 + [error] * 42)
        *_, code, share_ref, share_cur = stats.categorical(reference, current)
        assert (code, share_ref, share_cur) == (error, 0.0, 0.42)


def test_failed_requests_count_in_status_never_in_the_answers_shape() -> None:
    # Probe p78 F2: a failed call went in as an answer of 0 output tokens, no finish reason and its time to failure
    # as latency: a stable whose calls failed fast drifted in output_tokens from an identical canary.
    from lockgate.contracts.inference import ATTEMPT, SUPERSEDED
    from lockgate.services.drift.features import rows

    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    failed = [InferenceEvent(app="shop", deployment="d1", status="error", error_type="503", latency_ms=5.0,
                             model="m", prompt="hi", time=t0 + timedelta(seconds=300 + i)) for i in range(30)]
    row = rows(failed[:1])
    at = {f: i for i, f in enumerate(FEATURES)}
    assert all(math.isnan(row.values[0, at[f]]) for f in ("output_tokens", "latency_ms", "input_tokens",
                                                           "finish_reason", "refusal", "tool_call"))
    assert not any(math.isnan(row.values[0, at[f]]) for f in ("status", "error_type", "model"))
    assert (row.prompts, row.responses) == (["hi"], [None])  # what was asked, and no answer
    # A call a retry went past is in status too (a canary's calls fallen back from have no other trace in its
    # window); its prompt is its request's, counted once there.
    retried = rows([msgspec.structs.replace(failed[0], attributes={ATTEMPT: SUPERSEDED})])
    assert retried.prompts == [None] and not math.isnan(retried.values[0, at["status"]])
    m = DriftMonitor(reference_size=200, window_size=100, psi_threshold=0.2)
    m.observe_events(_answers(200, "stop"))
    [report] = m.observe_events(_answers(70, "stop", start=200) + failed)
    drifted = {f.feature for f in report.features if f.drifted}
    assert "status:error" in drifted and "error_type:503" in drifted  # the failures' share is judged
    assert not drifted & {"output_tokens", "latency_ms", "input_tokens"}
    assert not any(f.startswith(("finish_reason", "tool_call")) for f in drifted)
