"""Calibration of the gate's decisions by simulation (pure, seeded, a few seconds).

A/A: candidate and baseline drawn from one distribution, so every FAIL is false; its rate must be at most
alpha. Power: a known regression must be found about as often as the normal theory says. Sequential: over
20 looks the always-valid sequence keeps false aborts under alpha where a fixed interval does not.
The figures print with `pytest -s` and are recorded as test properties.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special
from scipy import stats as sps

from lockgate.contracts import BaselineComparison, MetricInterval
from lockgate.gatestats import power, rates, sequential
from lockgate.services.evaluator import stats
from lockgate.services.gatekeeper import domain
from lockgate.services.gatekeeper.rules import Evidence

pytestmark = pytest.mark.timeout(120)
SIMS = 1000
ALPHA = 0.05
RESAMPLES = 1000  # Monte Carlo error of each bootstrap bound stays far below the binomial error of 1,000 sims
# Tolerance for empirical vs theoretical rates: 3.5 binomial standard errors at p = 0.5 over 1,000 runs (0.055)
# plus the bootstrap interval's small-sample coverage error (about 0.01 at n = 100).
TOLERANCE = 0.065


def rule(**raw: object) -> domain.Rule:
    return domain.parse_policy({"name": "p", "rules": [{"name": "r", "metric": "m", **raw}]}).rules[0]


def report(record_property: object, name: str, value: float) -> None:
    print(f"calibration {name}: {value:.4f}")
    record_property(name, round(value, 4))  # type: ignore[operator]


def paired_comparison(c: np.ndarray, b: np.ndarray, seed: int) -> Evidence:
    """What the evaluator would report for these per-case scores: a paired bootstrap by case."""
    result = stats.paired_bootstrap(c, b, n_resamples=RESAMPLES, seed=seed)
    comp = BaselineComparison(metric="m", candidate=float(c.mean()), baseline=float(b.mean()),
                              diff=result.difference.estimate, diff_low=result.difference.low,
                              diff_high=result.difference.high, effect_size=result.effect_size,
                              test="paired-bootstrap", n_pairs=result.n)
    return Evidence(metrics={"m": float(c.mean())}, comparisons={"m": comp})


def scores(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Baseline and candidate per-case scores sharing each case's difficulty (as a paired eval does)."""
    difficulty = rng.normal(0.7, 0.15, n)
    base = difficulty + rng.normal(0, 0.25, n)
    cand = difficulty + shift + rng.normal(0, 0.25, n)
    return cand, base


def test_aa_relative_rule_false_fail_rate_is_at_most_alpha(record_property: object) -> None:
    rng = np.random.default_rng(12)
    r = rule(relative={"max_regression": 0.0})
    fails = sum(domain.evaluate_rule(r, paired_comparison(*scores(rng, 50), seed=i)).verdict == "FAIL"
                for i in range(SIMS))
    rate = fails / SIMS
    report(record_property, "aa_relative_false_fail_rate", rate)
    assert rate <= ALPHA


def test_aa_absolute_rule_false_fail_rate_is_at_most_alpha(record_property: object) -> None:
    rng = np.random.default_rng(13)
    r = rule(op=">=", threshold=0.7)  # exactly the true mean: any FAIL is false
    fails = 0
    for i in range(SIMS):
        x = rng.normal(0.7, 0.2, 50)
        iv = stats.bootstrap_mean(x, n_resamples=RESAMPLES, seed=i)
        ev = Evidence(metrics={"m": iv.estimate}, intervals={"m": MetricInterval(
            estimate=iv.estimate, low=iv.low, high=iv.high, n=iv.n, method=iv.method)})
        fails += domain.evaluate_rule(r, ev).verdict == "FAIL"
    rate = fails / SIMS
    report(record_property, "aa_absolute_false_fail_rate", rate)
    assert rate <= ALPHA


@pytest.mark.parametrize("correction", ["holm", "bh"])
def test_aa_slices_corrected_keep_the_false_fail_rate_at_most_alpha(record_property: object, correction: str) -> None:
    # Under the global null (no slice changed) the false discovery rate BH controls is the family-wise rate.
    rng = np.random.default_rng(14)
    r = rule(slices={"max_regression": 0.0, "min_cases": 20, "correction": correction})
    slices, n = 10, 40
    fails = naive = 0
    for _ in range(SIMS):
        diffs = rng.normal(0, 0.35, (slices, n))  # no slice changed
        means, se = diffs.mean(axis=1), diffs.std(axis=1, ddof=1) / math.sqrt(n)
        comps = {f"m[s={k}]": BaselineComparison(metric=f"m[s={k}]", candidate=0.7 + means[k], baseline=0.7,
                                                 diff=float(means[k]), diff_low=float(means[k] - 1.96 * se[k]),
                                                 diff_high=float(means[k] + 1.96 * se[k]), n_pairs=n)
                 for k in range(slices)}
        fails += domain.evaluate_rule(r, Evidence(comparisons=comps)).verdict == "FAIL"
        naive += bool(np.any(means + 1.96 * se < 0))  # what an uncorrected per-slice interval would block
    report(record_property, f"aa_slices_{correction}_false_fail_rate", fails / SIMS)
    report(record_property, "aa_slices_uncorrected_false_fail_rate", naive / SIMS)
    assert fails / SIMS <= ALPHA < naive / SIMS


def test_aa_max_rate_false_fail_rate_is_at_most_one_minus_confidence(record_property: object) -> None:
    rng = np.random.default_rng(15)
    r = rule(max_rate=0.01, confidence=0.95)
    leaks = rng.binomial(1000, 0.01, SIMS)  # the true rate is exactly the bound
    fails = sum(domain.evaluate_rule(r, {"m_failures": float(k), "n_cases": 1000.0}).verdict == "FAIL" for k in leaks)
    report(record_property, "aa_max_rate_false_fail_rate", fails / SIMS)
    assert fails / SIMS <= ALPHA
    # ...and a clean run at three times the rule-of-three size passes it almost always.
    clean = rng.binomial(rates.trials_for(0.01) * 3, 0.001, SIMS)
    passed = sum(rates.upper_bound(int(k), rates.trials_for(0.01) * 3) <= 0.01 for k in clean) / SIMS
    report(record_property, "max_rate_pass_rate_at_a_tenth_of_the_bound", passed)
    assert passed >= 0.9


def test_power_on_a_known_regression_matches_theory(record_property: object) -> None:
    rng = np.random.default_rng(16)
    n, sd_diff = 100, 0.25 * math.sqrt(2)  # per-case differences: two independent noises of sd 0.25
    delta = power.min_detectable_effect(n, sd_diff, alpha=ALPHA, power=0.8)  # theory: detected 80% of the time
    r = rule(relative={"max_regression": 0.0})
    found = sum(domain.evaluate_rule(r, paired_comparison(*scores(rng, n, -delta), seed=i)).verdict == "FAIL"
                for i in range(SIMS))
    # FAIL needs the whole two-sided interval below 0: power = Phi(delta sqrt(n) / sd - z_(1-alpha/2)).
    theory = float(special.ndtr(delta * math.sqrt(n) / sd_diff - special.ndtri(1 - ALPHA / 2)))
    report(record_property, "power_theory", theory)
    report(record_property, "power_empirical", found / SIMS)
    assert theory == pytest.approx(0.8, abs=1e-9)
    assert abs(found / SIMS - theory) <= TOLERANCE


def _streams(rng: np.random.Generator, effect: float, looks: int = 20, per_look: int = 25
             ) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative means after each look for SIMS streams of unit-variance observations."""
    x = rng.normal(effect, 1.0, (SIMS, looks * per_look))
    ns = np.arange(1, looks + 1) * per_look
    return np.cumsum(x, axis=1)[:, ns - 1] / ns, ns


def test_sequential_aa_over_20_looks_keeps_false_aborts_under_alpha(record_property: object) -> None:
    means, ns = _streams(np.random.default_rng(17), 0.0)
    aborted = naive = 0
    for row in means:
        looks = [sequential.Look(int(n), float(m), 1.0) for n, m in zip(ns, row, strict=True)]
        aborted += sequential.analyse(looks, alpha=ALPHA).verdict == "regressed"
        naive += bool(np.any(row + 1.959964 / np.sqrt(ns) < 0))  # a fixed 95% interval at every look
    report(record_property, "sequential_aa_false_abort_rate", aborted / SIMS)
    report(record_property, "fixed_interval_aa_false_abort_rate_20_looks", naive / SIMS)
    assert aborted / SIMS <= ALPHA < naive / SIMS


def test_sequential_power_over_20_looks_matches_theory(record_property: object) -> None:
    effect, looks, per_look = -0.2, 20, 25
    means, ns = _streams(np.random.default_rng(18), effect, looks, per_look)
    found, stops = 0, []
    for row in means:
        out = sequential.analyse([sequential.Look(int(n), float(m), 1.0) for n, m in zip(ns, row, strict=True)])
        if out.verdict == "regressed":
            found += 1
            stops.append(out.look + 1)
    # Theory, bracketing the crossing probability: at least the chance of crossing at the last look alone,
    # at most the chance a fixed one-sided interval at the last look would see it (the sequence is wider).
    n_max = looks * per_look
    r = sequential.radius(n_max, 1.0)
    lower = float(sps.norm.cdf((-effect - r) * math.sqrt(n_max)))
    upper = float(sps.norm.cdf(-effect * math.sqrt(n_max) - 1.644854))
    report(record_property, "sequential_power_lower_bound", lower)
    report(record_property, "sequential_power_empirical", found / SIMS)
    report(record_property, "sequential_power_fixed_sample_upper_bound", upper)
    report(record_property, "sequential_mean_stopping_look", float(np.mean(stops)))
    assert lower - TOLERANCE <= found / SIMS <= upper + TOLERANCE
