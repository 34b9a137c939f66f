"""PSI under heavy ties (probe p46 F2): a client flooding a deployment with `max_tokens: 1` requests puts one value
in most of both arms' windows; the canary's real answers must still be measured."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from lockgate.contracts import DriftReport, FeatureDrift, InferenceEvent
from lockgate.services.drift import stats
from lockgate.services.drift.domain import DriftMonitor
from lockgate.services.router.drifts import harmful

pytestmark = pytest.mark.timeout(60)
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _flooded(canary_tokens: float, flood: int, seed: int = 1) -> list[DriftReport]:
    """Canary-versus-stable reports at the production window sizes (500/500, PSI 0.2) of 1,500 real requests per arm
    (stable answers ~20 tokens) with `flood` one-token answers to random users (either arm) after each."""
    rnd = random.Random(seed)
    events: list[InferenceEvent] = []

    def event(variant: str, tokens: int) -> InferenceEvent:
        return InferenceEvent(time=T0 + timedelta(milliseconds=10 * len(events)), tenant="acme", app="shop",
                              deployment="chat", variant=variant, release="c1" if variant == "canary" else "s1",
                              source="router", latency_ms=100.0 + rnd.random(), input_tokens=10,
                              output_tokens=tokens, finish_reason="stop" if tokens > 1 else "length")

    for _ in range(1500):
        for variant in ("stable", "canary"):
            events.append(event(variant, max(2, int(rnd.gauss(canary_tokens if variant == "canary" else 20, 5)))))
            events += [event(rnd.choice(("stable", "canary")), 1) for _ in range(flood)]
    monitor = DriftMonitor(500, 500, 0.2)
    reports = [r for i in range(0, len(events), 100) for r in monitor.observe_events(events[i:i + 100])]
    return [r for r in reports if r.comparison == "canary_vs_stable"]


def _output(report: DriftReport) -> FeatureDrift:
    return next(f for f in report.features if f.feature == "output_tokens")


def test_a_flood_of_one_token_answers_does_not_hide_a_canary_whose_real_answers_are_15_times_longer() -> None:
    reports = _flooded(300, flood=9)
    assert len(reports) > 20
    for r in reports:  # every report, the first ones too: nine in ten rows of either window are the flood's
        out = _output(r)
        assert out.drifted and out.psi >= 0.45, (out.psi, out.reference_mean, out.current_mean)
        assert r.drifted and [f.feature for f in harmful(r)] == ["output_tokens"]


def test_the_same_flood_with_a_canary_answering_as_stable_is_no_drift() -> None:
    reports = _flooded(20, flood=9)
    assert len(reports) > 20
    assert not any(r.drifted for r in reports)
    assert max(_output(r).psi for r in reports) < 0.2


def test_tied_values_get_a_bin_of_their_own_and_the_rest_is_cut_from_both_windows() -> None:
    rng = np.random.default_rng(3)
    ref = np.concatenate([np.ones(900), rng.normal(20, 5, 100)])
    cur = np.concatenate([np.ones(900), rng.normal(300, 5, 100)])
    edges = stats.cuts(ref, cur)
    assert np.isin(1.0, edges) and np.nextafter(1.0, 0.0) in edges  # (just below 1, 1] holds the ones alone
    assert len(edges[edges > 1.0]) == 8  # the other values, both windows' together, in the 9 bins left
    assert stats.psi(ref, cur) > 0.5
    assert stats.psi(ref, ref) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_data_without_heavy_ties_keeps_the_reference_deciles(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref, cur = rng.normal(100, 15, 500), rng.normal(110, 15, 500)
    assert np.array_equal(stats.cuts(ref, cur), stats.quantile_cuts(ref))
