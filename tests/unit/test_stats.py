"""Statistics against scipy references and textbook examples, plus property tests."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from lockgate.errors import LockgateError
from lockgate.services.evaluator.stats import (
    UNIT,
    InsufficientData,
    Interval,
    bootstrap_mean,
    bounded_difference,
    bounded_mean,
    cohens_d_paired,
    cohens_h,
    latency_percentiles,
    mcnemar,
    mcnemar_counts,
    min_detectable_effect,
    paired_bootstrap,
    paired_cluster_difference,
    paired_power_warning,
    percentile_interval,
    power_warning,
    proportion_interval,
    required_n,
)

RNG = np.random.default_rng(20240601)
NORMAL = RNG.normal(0.7, 0.2, size=150)
SKEWED = RNG.exponential(1.0, size=120)
BINARY = (RNG.random(200) < 0.8).astype(float)


def _scipy_ci(x, method):
    res = sps.bootstrap(
        (x,), np.mean, n_resamples=20_000, method=method, confidence_level=0.95, random_state=1
    )
    return res.confidence_interval.low, res.confidence_interval.high


@pytest.mark.parametrize("sample", [NORMAL, SKEWED, BINARY], ids=["normal", "skewed", "binary"])
@pytest.mark.parametrize(("ours", "theirs"), [("bca", "BCa"), ("percentile", "percentile")])
def test_bootstrap_mean_matches_scipy(sample, ours, theirs):
    ci = bootstrap_mean(sample, n_resamples=20_000, method=ours, seed=7)
    low, high = _scipy_ci(sample, theirs)
    width = high - low
    # Different random streams: agree to a few percent of the interval width.
    assert ci.low == pytest.approx(low, abs=0.04 * width)
    assert ci.high == pytest.approx(high, abs=0.04 * width)
    assert ci.estimate == pytest.approx(sample.mean())
    assert ci.method == ours and ci.n == sample.size and ci.confidence == 0.95


def test_bootstrap_is_seeded_and_confidence_widens():
    a = bootstrap_mean(SKEWED, seed=3)
    assert a == bootstrap_mean(SKEWED, seed=3)
    assert a != bootstrap_mean(SKEWED, seed=4)
    wide = bootstrap_mean(SKEWED, seed=3, confidence=0.99)
    assert wide.low < a.low < a.high < wide.high


def test_bootstrap_large_sample_is_chunked_and_correct():
    x = np.random.default_rng(0).normal(size=50_000)
    ci = bootstrap_mean(x, n_resamples=2_000, method="percentile")
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert ci.low == pytest.approx(x.mean() - 1.96 * se, abs=0.3 * se)
    assert ci.high == pytest.approx(x.mean() + 1.96 * se, abs=0.3 * se)


@pytest.mark.parametrize(
    "values", [[1.0] * 20, [0.0] * 20, [0.42], [1.0]], ids=["all-pass", "all-fail", "n1", "n1-pass"]
)
def test_bootstrap_of_a_sample_without_spread_and_without_a_range_has_no_bound(values):
    # Why: it was [est, est] ("degenerate"), which a gate read as certain: one case PASSed `>= 0.9`.
    ci = bootstrap_mean(values)
    assert ci.estimate == values[0] and (ci.low, ci.high) == (-math.inf, math.inf)
    assert ci.method == "degenerate"


@pytest.mark.parametrize(
    ("values", "below"), [([1.0] * 20, 0.84), ([1.0], 0.25), ([1.0, 1.0, 0.99], 0.5), ([1.0] * 19 + [0.9], 0.85)],
    ids=["20-of-20", "n1", "three-near-1", "19-and-0.9"])
def test_a_bounded_mean_at_a_small_n_is_never_narrower_than_unseen_cases_allow(values, below):
    # Why: the bootstrap never leaves the observed values: [1, 1, 0.99] gave [0.99, 1] and 19 ones and a 0.9 gave
    # [0.975, 1], so a `>= 0.98` rule PASSed on three cases.
    ci = bootstrap_mean(values, bounds=UNIT)
    assert ci.low < below and ci.high == 1.0 and ci.low <= ci.estimate <= ci.high
    assert ci.method in ("bounded", "bca+bounded")


def test_the_bounded_interval_of_pass_fail_values_is_agresti_coull_and_contains_wilson():
    for k, n in [(0, 1), (1, 1), (20, 20), (7, 10), (0, 30), (120, 200)]:
        ci = bounded_mean([1.0] * k + [0.0] * (n - k), UNIT)
        z = 1.959963984540054
        nt, pt = n + z * z, (k + z * z / 2) / (n + z * z)
        half = z * math.sqrt(pt * (1 - pt) / nt)
        assert (ci.low, ci.high) == pytest.approx((max(0.0, min(pt - half, k / n)), min(1.0, max(pt + half, k / n))))
        wilson = proportion_interval(k, n)
        assert ci.low <= wilson.low + 1e-12 and ci.high >= wilson.high - 1e-12


def test_a_bounded_sample_with_spread_keeps_the_bootstrap_once_the_sample_is_large():
    x = np.random.default_rng(4).beta(2, 2, 2000)
    boot, bounded = bootstrap_mean(x), bootstrap_mean(x, bounds=UNIT)
    assert bounded.high - bounded.low == pytest.approx(boot.high - boot.low, rel=0.1)


def test_bounded_intervals_cover_the_mean_where_the_bootstrap_does_not():
    # 95% intervals of a 0.95 pass rate from 10 cases: most samples are 10/10, whose bootstrap was [1, 1], so it
    # covered the rate about 40% of the time.
    rng = np.random.default_rng(9)
    samples = [(rng.random(10) < 0.95).astype(float) for _ in range(300)]
    covered = [bootstrap_mean(x, n_resamples=500, bounds=UNIT).contains(0.95) for x in samples]
    assert sum(covered) / 300 >= 0.95 and sum(x.all() for x in samples) / 300 > 0.5


def test_declared_bounds_are_checked():
    with pytest.raises(InsufficientData, match="outside the declared range"):
        bootstrap_mean([0.5, 1.2], bounds=UNIT)
    with pytest.raises(InsufficientData, match="outside the declared range"):
        paired_bootstrap([0.5, 1.0], [0.5, -0.1], 100, bounds=UNIT)


def test_bootstrap_bca_falls_back_when_undefined():
    # One failure in 200: many resamples tie the estimate exactly, BCa stays finite or falls back.
    ci = bootstrap_mean([1.0] * 199 + [0.0], seed=1)
    assert ci.low <= ci.estimate <= ci.high <= 1.0
    assert ci.method in ("bca", "percentile")


@pytest.mark.parametrize("bad", [[], [float("nan"), 1.0], [math.inf]])
def test_bootstrap_rejects_empty_and_nonfinite(bad):
    with pytest.raises(InsufficientData) as exc:
        bootstrap_mean(bad)
    assert isinstance(exc.value, LockgateError)


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(InsufficientData):
        bootstrap_mean([1.0, 2.0], confidence=1.0)
    with pytest.raises(InsufficientData):
        bootstrap_mean([1.0, 2.0], method="studentized")


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (7, 10), (1, 1), (80, 100), (3, 1000)])
def test_wilson_interval_matches_scipy(k, n):
    ci = proportion_interval(k, n)
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (ci.low, ci.high) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert ci.estimate == k / n


def test_wilson_all_pass_is_not_certain():
    ci = proportion_interval(5, 5)
    assert ci.high == 1.0 and ci.low < 0.6  # five passes do not prove a 100% pass rate


def test_paired_bootstrap_matches_scipy_on_differences():
    rng = np.random.default_rng(11)
    base = rng.normal(0.7, 0.15, size=300)
    cand = base - 0.03 + rng.normal(0, 0.05, size=300)
    res = paired_bootstrap(cand, base, 20_000, 0.95, 5)
    ref = sps.bootstrap(
        (cand, base), lambda c, b: np.mean(c - b), paired=True, n_resamples=20_000, random_state=2
    )
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert res.difference.estimate == pytest.approx(np.mean(cand - base))
    assert res.difference.low == pytest.approx(ref.confidence_interval.low, abs=0.04 * width)
    assert res.difference.high == pytest.approx(ref.confidence_interval.high, abs=0.04 * width)
    assert res.difference.high < 0
    assert res.p_value < 0.001
    d = cand - base
    assert res.effect_size == pytest.approx(d.mean() / d.std(ddof=1))


def test_paired_bootstrap_p_value_is_near_t_test_when_normal():
    rng = np.random.default_rng(12)
    base = rng.normal(size=400)
    cand = base + rng.normal(0.08, 1.0, size=400)
    res = paired_bootstrap(cand, base, 20_000, 0.95, 1)
    ref = sps.ttest_rel(cand, base).pvalue
    assert res.p_value == pytest.approx(ref, abs=0.02)


def test_paired_bootstrap_rejects_mismatched_lengths():
    with pytest.raises(InsufficientData, match="differ in length"):
        paired_bootstrap([1.0, 0.0], [1.0], 100, 0.95, 0)


def test_paired_bootstrap_degenerate():
    same = paired_bootstrap([1.0] * 10, [1.0] * 10, 1000, 0.95, 0)
    assert same.difference.contains(0) and same.p_value == 1.0 and same.effect_size == 0.0
    # Without a range, differences with no spread have no bound (before: [0, 0], "no change" for certain).
    assert (same.difference.low, same.difference.high, same.difference.method) == (-math.inf, math.inf, "degenerate")
    shift = paired_bootstrap([0.0] * 10, [1.0] * 10, 1000, 0.95, 0)
    assert shift.p_value < 0.01 and shift.effect_size == -math.inf
    one = paired_bootstrap([0.0], [1.0], 1000, 0.95, 0)
    assert one.p_value == 1.0 and one.n == 1


def test_a_bounded_paired_difference_without_spread_is_an_interval_not_a_point():
    same = paired_bootstrap([1.0] * 20, [1.0] * 20, 1000, bounds=UNIT).difference
    # 20 concordant pairs still allow a few unseen discordant ones either way.
    assert same.method == "bounded" and same.low < -0.08 and same.high > 0.08 and same.contains(0.0)
    one = paired_bootstrap([1.0], [1.0], 1000, bounds=UNIT).difference
    assert one.low < -0.5 and one.high > 0.5
    shift = paired_bootstrap([0.0] * 10, [1.0] * 10, 1000, bounds=UNIT).difference
    assert shift.low == -1.0 and shift.estimate == -1.0 and -1.0 < shift.high < 0  # ten regressions: still a FAIL


@pytest.mark.parametrize(("regressions", "improvements", "n"), [(0, 0, 20), (3, 1, 20), (10, 0, 20), (7, 12, 200)])
def test_the_bounded_difference_of_pass_fail_pairs_is_agresti_min(regressions, improvements, n):
    d = [-1.0] * regressions + [1.0] * improvements + [0.0] * (n - regressions - improvements)
    ci = bounded_difference(d, 1.0)
    # Agresti & Min (2005): half a case added to each cell of the 2x2 table, then the Wald interval.
    m = n + 2
    p12, p21 = (regressions + 0.5) / m, (improvements + 0.5) / m
    half = 1.959963984540054 * math.sqrt((p12 + p21 - (p21 - p12) ** 2) / m)
    est = (improvements - regressions) / n
    assert (ci.low, ci.high) == pytest.approx((max(-1.0, min(p21 - p12 - half, est)), min(1.0, p21 - p12 + half)))


def test_a_bounded_paired_difference_agrees_with_mcnemar_on_rare_discordance():
    # 4 regressions and no improvement in 1,000 pairs: exact McNemar p = 0.125, not significant; the bootstrap
    # alone excluded 0 (it never resamples an improvement it has not seen).
    cand, base = [1.0] * 1000, [1.0] * 1000
    for i in range(4):
        cand[i] = 0.0
    assert mcnemar_counts(4, 0).p_value > 0.05
    assert paired_bootstrap(cand, base, 2000).difference.high < 0
    assert paired_bootstrap(cand, base, 2000, bounds=UNIT).difference.contains(0.0)


def test_a_clustered_difference_of_one_case_or_no_spread_has_no_bound():
    one = paired_cluster_difference([[1.0, 2.0]], [[1.0, 3.0]])
    assert (one.difference.low, one.difference.high, one.difference.method) == (-math.inf, math.inf, "degenerate")
    same = paired_cluster_difference([[2.0]] * 5, [[1.0]] * 5)
    assert same.difference.estimate == 1.0 and same.difference.low == -math.inf and same.relative is not None
    assert same.relative.low == -math.inf and same.relative.estimate == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=80),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["bca", "percentile"]),
)
def test_property_identical_samples_never_differ(values, seed, method):
    res = paired_bootstrap(values, list(values), 500, 0.95, seed, method=method)
    assert res.difference.contains(0.0)
    assert res.p_value == 1.0
    passes = [v >= 0.5 for v in values]
    assert mcnemar(passes, passes).p_value == 1.0


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.15, 0.4), st.integers(400, 1000))
def test_property_clear_regression_on_large_sample_is_below_zero(seed, drop, n):
    rng = np.random.default_rng(seed)
    base = (rng.random(n) < 0.85).astype(float)
    # The candidate keeps each baseline pass with probability 1 - drop: a clear regression.
    cand = base * (rng.random(n) >= drop)
    res = paired_bootstrap(cand, base, 2_000, 0.95, seed)
    assert res.difference.high < 0
    assert res.p_value < 0.01
    assert mcnemar(cand.astype(bool), base.astype(bool)).p_value < 0.01


# --- McNemar ---------------------------------------------------------------------------------


def test_mcnemar_textbook_example_chi_square():
    # Wikipedia/McNemar example: b=121, c=59 -> corrected chi2 = (|121-59|-1)^2/180 = 20.672
    res = mcnemar_counts(121, 59)
    assert res.method == "chi2-cc"
    assert res.statistic == pytest.approx(61**2 / 180)
    assert res.p_value == pytest.approx(sps.chi2.sf(61**2 / 180, 1))
    assert res.p_value == pytest.approx(5.45e-6, rel=1e-2)


@pytest.mark.parametrize(("b", "c"), [(0, 0), (1, 0), (3, 10), (7, 7), (0, 12), (12, 11)])
def test_mcnemar_exact_matches_binomtest(b, c):
    res = mcnemar_counts(b, c)
    assert res.method == "exact"
    want = 1.0 if b + c == 0 else sps.binomtest(b, b + c, 0.5).pvalue
    assert res.p_value == pytest.approx(want, abs=1e-12)


def test_mcnemar_from_outcomes_counts_directions():
    cand = [True, False, False, True, True, False]
    base = [True, True, True, False, True, False]
    res = mcnemar(cand, base)
    assert (res.regressions, res.improvements) == (2, 1)


@pytest.mark.parametrize("outcome", [True, False], ids=["all-pass", "all-fail"])
def test_mcnemar_all_same(outcome):
    res = mcnemar([outcome] * 30, [outcome] * 30)
    assert res.p_value == 1.0 and res.statistic == 0.0


def test_mcnemar_forced_chi2_on_ties_and_errors():
    assert mcnemar_counts(30, 30, exact=False).p_value == 1.0
    assert mcnemar_counts(30, 30).p_value == 1.0
    with pytest.raises(InsufficientData):
        mcnemar([True], [True, False])
    with pytest.raises(InsufficientData):
        mcnemar([], [])


# --- Effect sizes and power ------------------------------------------------------------------


def test_cohens_h_reference_values():
    # Cohen (1988): h for 0.5 vs 0.25 is 0.5236 (phi = 2 asin sqrt p)
    assert cohens_h(0.5, 0.25) == pytest.approx(2 * math.asin(math.sqrt(0.5)) - 2 * math.asin(0.5))
    assert cohens_h(0.5, 0.25) == pytest.approx(0.5236, abs=1e-4)
    assert cohens_h(0.3, 0.3) == 0.0


def test_cohens_d_paired_hand_computed():
    # differences 1, 2, 3: mean 2, sd 1
    assert cohens_d_paired([2, 4, 6], [1, 2, 3]) == pytest.approx(2.0)
    assert cohens_d_paired([1], [1]) == 0.0


def test_power_matches_noncentral_t_reference():
    # At n = required_n, a one-sample t-test on the differences has power close to 0.8.
    sd, margin = 0.3, 0.05
    n = required_n(margin, sd)
    df = n - 1
    crit = sps.t.ppf(0.975, df)
    power = sps.nct.sf(crit, df, margin / sd * math.sqrt(n))
    assert power == pytest.approx(0.8, abs=0.01)
    assert min_detectable_effect(n, sd) <= margin < min_detectable_effect(n - 1, sd)


def test_power_warning_small_and_large_samples():
    warning = power_warning(20, margin=0.02, sd=0.3)
    assert warning is not None and "20 cases" in warning and "needed" in warning
    assert power_warning(10_000, margin=0.02, sd=0.3) is None
    assert power_warning(1, margin=10.0, sd=0.0) is not None  # one case is never enough
    assert min_detectable_effect(0, 1.0) == math.inf


def test_paired_power_warning_does_not_trust_zero_spread():
    assert paired_power_warning([1.0] * 8, [1.0] * 8, margin=0.05) is not None
    assert paired_power_warning([1.0] * 20_000, [1.0] * 20_000, margin=0.05) is None


# --- Percentiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("q", [50, 90, 95, 99])
@pytest.mark.parametrize("n", [20, 100, 1000])
def test_percentile_interval_matches_scipy_quantile_test(q, n):
    x = np.random.default_rng(n + q).lognormal(3, 0.5, size=n)
    ours = percentile_interval(x, q)
    ref = sps.quantile_test(x, p=q / 100).confidence_interval(0.95)
    assert ours.estimate == pytest.approx(np.percentile(x, q))
    for mine, theirs in ((ours.low, ref.low), (ours.high, ref.high)):
        if math.isnan(theirs):
            assert math.isinf(mine)  # scipy: not identifiable; ours: unbounded
        else:
            assert mine == pytest.approx(theirs)


def test_latency_percentiles_keys_and_ordering():
    x = np.random.default_rng(3).exponential(50, size=2000)
    out = latency_percentiles(x)
    assert list(out) == ["p50", "p95", "p99"]
    assert out["p50"].estimate < out["p95"].estimate < out["p99"].estimate
    assert all(iv.low <= iv.estimate <= iv.high for iv in out.values())
    small = latency_percentiles([12.0])
    assert small["p99"].high == math.inf and small["p50"].estimate == 12.0


def test_interval_round_trips_through_msgspec():
    iv = bootstrap_mean(NORMAL)
    assert msgspec.json.decode(msgspec.json.encode(iv), type=Interval) == iv
