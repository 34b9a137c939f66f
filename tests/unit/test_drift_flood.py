"""PSI under a flood (probes p46 F2, p49 F4): a client flooding a deployment with `max_tokens: 1` requests puts one
value in most of both arms' windows, or with `max_tokens` drawn from 40-69 spreads its answers over the reference's
deciles; the canary's real answers must still be measured."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from lockgate.contracts import DriftReport, FeatureDrift, InferenceEvent
from lockgate.driftharm import harmful
from lockgate.services.drift import stats
from lockgate.services.drift.domain import DriftMonitor

pytestmark = pytest.mark.timeout(60)
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _flooded(canary_tokens: float, flood: int, seed: int = 1, stable_tokens: float = 20,
             flood_tokens: Callable[[random.Random], int] = lambda rnd: 1) -> list[DriftReport]:
    """Canary-versus-stable reports at the production window sizes (500/500, PSI 0.2) of 1,500 real requests per arm
    (stable answers ~`stable_tokens`) with `flood` answers cut at `flood_tokens` (one token by default) to random
    users (either arm) after each."""
    rnd = random.Random(seed)
    events: list[InferenceEvent] = []

    def event(variant: str, tokens: int, finish: str = "stop") -> InferenceEvent:
        return InferenceEvent(time=T0 + timedelta(milliseconds=10 * len(events)), tenant="acme", app="shop",
                              deployment="chat", variant=variant, release="c1" if variant == "canary" else "s1",
                              source="router", latency_ms=100.0 + rnd.random(), input_tokens=10,
                              output_tokens=tokens, finish_reason=finish)

    for _ in range(1500):
        for variant in ("stable", "canary"):
            mean = canary_tokens if variant == "canary" else stable_tokens
            events.append(event(variant, max(2, int(rnd.gauss(mean, stable_tokens / 4)))))
            events += [event(rnd.choice(("stable", "canary")), flood_tokens(rnd), "length") for _ in range(flood)]
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
    edges = stats.tied_cuts(ref, cur)
    assert np.isin(1.0, edges) and np.nextafter(1.0, 0.0) in edges  # (just below 1, 1] holds the ones alone
    assert len(edges[edges > 1.0]) == 8  # the other values, both windows' together, in the 9 bins left
    assert np.isin(edges, stats.cuts(ref, cur)).all()
    assert stats.psi(ref, cur) > 0.5
    assert stats.psi(ref, ref) == pytest.approx(0.0, abs=1e-12)


def _spread(rnd: random.Random) -> int:
    """A flood spreading its answers: `max_tokens` drawn from 40-69, no value tied (probe p49 F4)."""
    return rnd.randint(40, 69)


def test_a_flood_spread_over_the_deciles_does_not_hide_a_canary_whose_real_answers_triple() -> None:
    # Nine in ten rows of either window are the flood's, above every real answer, so the reference's first decile holds
    # both arms' real answers (~10 and ~30 tokens).
    reports = _flooded(30, flood=9, stable_tokens=10, flood_tokens=_spread)
    assert len(reports) > 20
    for r in reports:
        out = _output(r)
        assert out.drifted and out.psi >= 0.45, (out.psi, out.reference_mean, out.current_mean)
        assert r.drifted and [f.feature for f in harmful(r)] == ["output_tokens"]


def test_the_spread_flood_with_a_canary_answering_as_stable_is_no_drift() -> None:
    reports = _flooded(10, flood=9, stable_tokens=10, flood_tokens=_spread)
    assert len(reports) > 20
    assert not any(r.drifted for r in reports)
    assert max(_output(r).psi for r in reports) < 0.2


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_data_without_heavy_ties_keeps_the_reference_deciles_and_cuts_at_the_shift(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref, cur = rng.normal(100, 15, 500), rng.normal(110, 15, 500)
    edges, deciles, shift = stats.cuts(ref, cur), stats.quantile_cuts(ref), stats.shift_cuts(ref, cur)
    assert np.array_equal(edges, np.union1d(deciles, shift)) and 1 <= len(shift) <= 5


def test_the_shift_cuts_bound_the_mass_that_moved() -> None:
    # Cumulative shares (reference - current) over 0..6: -.25, 0, .25, .5, .25, 0, 0: they part furthest at 3, at
    # least half as far from 2 to 4, and agree at 1 below it and at 5 above it.
    ref, cur = np.array([1.0, 2.0, 3.0, 6.0]), np.array([0.0, 4.0, 5.0, 6.0])
    assert sorted(stats.shift_cuts(ref, cur)) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert stats.psi(ref, ref) == 0.0  # identical windows: edges where both hold the same shares
