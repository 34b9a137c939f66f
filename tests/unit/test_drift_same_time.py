"""A rollout's canary and stable windows hold rows of the same time, whatever the canary's weight: a change of what
every client sends moves both arms alike, and only a canary that really differs over the same time drifts. Pure.

Before, each arm's window was its own last `window_size` rows: at 10% weight the canary's spanned nine times the time
of stable's, so when every client began to send `max_tokens: 2` stable's window was all new traffic while the
canary's was mostly old, and a canary identical to stable was reported DRIFT (and aborted) within seconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from lockgate.contracts import DriftReport, InferenceEvent
from lockgate.services.drift.domain import DriftMonitor

pytestmark = pytest.mark.timeout(60)
T0 = datetime(2025, 1, 1, tzinfo=UTC)
WINDOW = 100


def _traffic(n: int, weight: float, *, shift_at: int | None = None, canary_output: float = 1.0,
             seed: int = 7, t0: datetime = T0) -> list[InferenceEvent]:
    """`n` served answers, 0.1 s apart, each on the canary with probability `weight`; from row `shift_at` on every
    client caps its answers at 2 tokens (both arms alike). The canary's answers are `canary_output` times as long."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        canary = bool(rng.random() < weight)
        shifted = shift_at is not None and i >= shift_at
        # Few distinct values and constant other features: no report drifts by chance (a test at 5% on ten
        # continuous features of 100 rows flags one now and then).
        tokens = 2 if shifted else int(rng.choice([90, 110]) * (canary_output if canary else 1.0))
        out.append(InferenceEvent(app="shop", deployment="d", variant="canary" if canary else "stable",
                                  release="r2" if canary else "r1", model="m", output_tokens=tokens,
                                  input_tokens=40, latency_ms=200.0,
                                  finish_reason="length" if shifted else "stop",
                                  time=t0 + timedelta(seconds=i / 10)))
    return out


def _pair_reports(m: DriftMonitor, events: list[InferenceEvent], batch: int = 60) -> list[DriftReport]:
    reports: list[DriftReport] = []
    for i in range(0, len(events), batch):  # as the router publishes them: a batch at a time, both arms mixed
        reports += [r for r in m.observe_events(events[i:i + batch]) if r.comparison == "canary_vs_stable"]
    return reports


def _monitor() -> DriftMonitor:
    return DriftMonitor(reference_size=100_000, window_size=WINDOW, psi_threshold=0.2)  # no now-vs-reference


@pytest.mark.parametrize("weight", [0.1, 0.5, 0.9])
def test_a_workload_change_of_every_client_is_no_drift_of_a_canary_identical_to_stable(weight: float) -> None:
    # Canary windows of 100 rows at 10% weight: some 1,000 rows each; the shift comes after the third.
    events = _traffic(8000, weight, shift_at=3000)
    reports = _pair_reports(_monitor(), events)
    assert len(reports) >= 6, "the arms are still compared, before, across and after the shift"
    drifted = [(r.window_start, [f.feature for f in r.features if f.drifted]) for r in reports if r.drifted]
    assert drifted == []
    for r in reports:  # both windows span the same time, and the report says so
        assert r.reference_window_start is not None and r.reference_window_end is not None
        overlap = min(r.window_end, r.reference_window_end) - max(r.window_start, r.reference_window_start)
        longest = max(r.window_end - r.window_start, r.reference_window_end - r.reference_window_start)
        assert overlap >= 0.8 * longest, (r.window_start, r.window_end, r.reference_window_start,
                                          r.reference_window_end)
        assert (r.reference_n, r.current_n) == (WINDOW, WINDOW)
    shift = T0 + timedelta(seconds=300)
    across = [r for r in reports if r.window_start < shift < r.window_end]
    assert across, "a report whose windows hold old and new traffic alike"


@pytest.mark.parametrize("weight", [0.1, 0.9])
def test_a_canary_that_differs_over_the_same_time_still_drifts(weight: float) -> None:
    reports = _pair_reports(_monitor(), _traffic(3000, weight, canary_output=3.0))
    assert reports and all(r.drifted for r in reports)
    out = next(f for f in reports[0].features if f.feature == "output_tokens")
    assert out.drifted and out.current_mean > 2.5 * out.reference_mean


def test_arms_that_took_turns_are_never_compared() -> None:
    # Stable's answers, then the canary's: no stable row shares the canary's time, whatever their difference.
    m = _monitor()
    stable = [e for e in _traffic(2000, 0.0, seed=1)]
    canary = [e for e in _traffic(4000, 1.0, canary_output=3.0, seed=2)[2000:]]
    assert _pair_reports(m, stable + canary) == []


def test_same_time_needs_the_spans_to_overlap_by_half_the_longer() -> None:
    from lockgate.services.drift.domain import same_time

    span = np.arange(0.0, 100.0)
    assert same_time(span, span) and same_time(span, span + 40)
    assert not same_time(span, span + 60) and not same_time(span, span + 200)
    assert not same_time(span[-10:], np.arange(0.0, 100.0, 0.1))  # stable's last 10 s of the canary's 100 s
    assert same_time(np.zeros(3), np.zeros(3))
