"""Statistics for eval aggregates and paired candidate-vs-baseline comparisons.

Everything is pure and seeded: the same inputs and seed give the same intervals, so a gate
decision can be reproduced exactly from the stored per-case scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec
import numpy as np
from scipy import special
from scipy import stats as sps

from lockgate.errors import LockgateError
from lockgate.gatestats import power as gpower


class InsufficientData(LockgateError):
    """A statistic was asked of an empty sample or of mismatched paired samples."""


class Interval(msgspec.Struct, frozen=True):
    """A point estimate with a two-sided confidence interval and how it was computed."""

    estimate: float
    low: float
    high: float
    confidence: float
    method: str
    n: int

    def contains(self, value: float) -> bool:
        """True when value lies inside [low, high]."""
        return self.low <= value <= self.high


class PairedComparison(msgspec.Struct, frozen=True):
    """Candidate minus baseline on the same cases: mean difference, its CI and a p-value."""

    difference: Interval
    p_value: float
    effect_size: float  # Cohen's d_z of the per-case differences
    n: int


class McNemarResult(msgspec.Struct, frozen=True):
    """McNemar's test on paired pass/fail outcomes.

    regressions: cases the baseline passed and the candidate failed; improvements: the reverse.
    """

    regressions: int
    improvements: int
    statistic: float
    p_value: float
    method: str  # "exact" (binomial) or "chi2-cc" (chi-square with continuity correction)


Floats = Sequence[float] | np.ndarray

# Keep each resampling block near 4M index cells (32 MB of int64) however large the sample.
_BLOCK_CELLS = 4_000_000
_EXACT_MCNEMAR_BELOW = 25


def _as_array(values: Floats, what: str = "sample") -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise InsufficientData(f"the {what} is empty: no cases were scored, so there is nothing to aggregate")
    if not np.all(np.isfinite(x)):
        raise InsufficientData(f"the {what} contains NaN or infinite values; drop or fix those cases first")
    return x


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise InsufficientData(f"confidence must be between 0 and 1, got {confidence}")


def _bootstrap_means(x: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    n = x.size
    block = max(1, _BLOCK_CELLS // n)
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, block):
        stop = min(start + block, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = x[idx].mean(axis=1)
    return out


def _bca_levels(x: np.ndarray, boot: np.ndarray, alpha: float) -> tuple[float, float] | None:
    theta = x.mean()
    # Ties count half, as in scipy.stats.bootstrap, so discrete scores are not biased.
    frac = (np.count_nonzero(boot < theta) + np.count_nonzero(boot <= theta)) / (2 * boot.size)
    z0 = special.ndtri(frac)
    n = x.size
    jack = (x.sum() - x) / (n - 1)  # leave-one-out means, closed form
    dev = jack.mean() - jack
    denom = 6.0 * (np.sum(dev**2)) ** 1.5
    a = np.sum(dev**3) / denom if denom > 0 else 0.0
    levels = []
    for z_alpha in (special.ndtri(alpha / 2), special.ndtri(1 - alpha / 2)):
        shift = z0 + z_alpha
        levels.append(special.ndtr(z0 + shift / (1 - a * shift)))
    if not all(np.isfinite(levels)):
        return None
    return levels[0], levels[1]


def _mean_interval(x: np.ndarray, boot: np.ndarray, confidence: float, method: str) -> Interval:
    alpha = 1 - confidence
    est = float(x.mean())
    if method == "bca":
        levels = _bca_levels(x, boot, alpha)
        if levels is None:
            # All resamples on one side of the estimate: BCa is undefined, percentile is not.
            method, levels = "percentile", (alpha / 2, 1 - alpha / 2)
    elif method == "percentile":
        levels = (alpha / 2, 1 - alpha / 2)
    else:
        raise InsufficientData(f"unknown bootstrap method {method!r}; use 'bca' or 'percentile'")
    low, high = np.percentile(boot, [100 * levels[0], 100 * levels[1]])
    # Floating-point summation can put the bound a hair past the estimate when they coincide.
    return Interval(est, float(min(low, est)), float(max(high, est)), confidence, method, int(x.size))


UNIT = (0.0, 1.0)  # the range of every scorer's score (clamped in domain.score), pass/fail and error indicators


def _in_range(x: np.ndarray, bounds: tuple[float, float]) -> None:
    lo, hi = bounds
    if not lo < hi:
        raise InsufficientData(f"bounds must be increasing, got [{lo}, {hi}]")
    if x.min() < lo or x.max() > hi:
        raise InsufficientData(f"values [{x.min():g}, {x.max():g}] lie outside the declared range [{lo:g}, {hi:g}]")


def _padded(x: np.ndarray, bounds: tuple[float, float], ends: float, middle: float, confidence: float
            ) -> Interval:
    """A normal interval around the mean of the sample plus `ends` pseudo-cases at each end of the range and
    `middle` at its centre, clipped to the range; it always contains the sample's own mean."""
    _check_confidence(confidence)
    _in_range(x, bounds)
    lo, hi = bounds
    mid = (lo + hi) / 2
    z = float(special.ndtri(1 - (1 - confidence) / 2))
    size = x.size + 2 * ends + middle
    centre = (float(x.sum()) + ends * (lo + hi) + middle * mid) / size
    var = (float(np.sum((x - centre) ** 2)) + ends * ((lo - centre) ** 2 + (hi - centre) ** 2)
           + middle * (mid - centre) ** 2) / size
    half = z * math.sqrt(var / size)
    est = float(x.mean())
    # The padded centre leans to the middle of the range; the interval still contains the estimate.
    low, high = max(lo, min(centre - half, est)), min(hi, max(centre + half, est))
    return Interval(est, low, high, confidence, "bounded", int(x.size))


def bounded_mean(values: Floats, bounds: tuple[float, float], *, confidence: float = 0.95) -> Interval:
    """CI for the mean of values known to lie in [lo, hi]: the sample plus z²/2 pseudo-cases at each end of the
    range, and a normal interval around that padded mean, clipped to the range.

    For 0/1 values this is the Agresti-Coull interval of a proportion (which contains Wilson's). The pseudo-cases
    stand for outcomes a small sample has not seen yet: n cases that all scored alike cannot rule out the far end
    of the scale, so the interval stays wide at n = 1, at k/k and next to a bound, and narrows like the bootstrap
    once the sample is large.
    """
    z = float(special.ndtri(1 - (1 - confidence) / 2))
    return _padded(_as_array(values), bounds, z * z / 2, 0.0, confidence)


def bounded_difference(differences: Floats, span: float, *, confidence: float = 0.95) -> Interval:
    """CI for the mean of paired differences known to lie in [-span, span] (two scores of a range `span` wide):
    the sample plus half a pseudo-case at each end and one at 0, with a normal interval around that mean.

    For pass/fail pairs this is Agresti and Min's interval for matched proportions: half a case added to each
    cell of the 2x2 table (half a regression, half an improvement, one unchanged case).
    """
    return _padded(_as_array(differences), (-span, span), 0.5, 1.0, confidence)


def _no_spread(x: np.ndarray, confidence: float, bounded: Interval | None) -> Interval:
    """A sample of one value, or of equal values, has no spread to resample: the bootstrap would give [est, est],
    a certainty no such sample holds. Within a known range the bounded interval is the honest one; without one
    no bound exists (±inf, reported as none, so a gate reads it as too few cases)."""
    if bounded is not None:
        return bounded
    est = float(x.mean())
    return Interval(est, -math.inf, math.inf, confidence, "degenerate", int(x.size))


def _widened(boot: Interval, floor: Interval) -> Interval:
    """The wider of a bootstrap interval and the bounded one on each side: a bootstrap never leaves the observed
    values, so at a small n next to the edge of the range it is narrower than any bound that holds."""
    low, high = min(boot.low, floor.low), max(boot.high, floor.high)
    if (low, high) == (boot.low, boot.high):
        return boot
    method = floor.method if (low, high) == (floor.low, floor.high) else f"{boot.method}+{floor.method}"
    return Interval(boot.estimate, low, high, boot.confidence, method, boot.n)


def bootstrap_mean(
    values: Floats,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    method: str = "bca",
    seed: int = 0,
    bounds: tuple[float, float] | None = None,
) -> Interval:
    """Bootstrap CI for the mean (BCa by default, or percentile), seeded and vectorised.

    With `bounds` (the values' known range, e.g. UNIT for a score) the interval is never narrower than
    `bounded_mean`'s; without, a sample with no spread has no finite bound.
    """
    _check_confidence(confidence)
    x = _as_array(values)
    floor = None if bounds is None else bounded_mean(x, bounds, confidence=confidence)
    if x.size == 1 or np.all(x == x[0]):
        return _no_spread(x, confidence, floor)
    boot = _bootstrap_means(x, n_resamples, np.random.default_rng(seed))
    interval = _mean_interval(x, boot, confidence, method)
    return interval if floor is None else _widened(interval, floor)


def proportion_interval(successes: int, n: int, *, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a pass rate; unlike the bootstrap it stays wide at 0/n and n/n."""
    _check_confidence(confidence)
    if n <= 0:
        raise InsufficientData("the sample is empty: no pass/fail outcomes to aggregate")
    if not 0 <= successes <= n:
        raise InsufficientData(f"successes must be between 0 and n={n}, got {successes}")
    p = successes / n
    z = special.ndtri(1 - (1 - confidence) / 2)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), confidence, "wilson", n)


def _paired(candidate: Floats, baseline: Floats) -> np.ndarray:
    c = _as_array(candidate, "candidate sample")
    b = _as_array(baseline, "baseline sample")
    if c.size != b.size:
        raise InsufficientData(
            f"paired samples differ in length (candidate {c.size}, baseline {b.size}); "
            "compare only cases both runs scored"
        )
    return c - b


def cohens_d_paired(candidate: Floats, baseline: Floats) -> float:
    """Cohen's d_z: mean of per-case differences over their standard deviation."""
    d = _paired(candidate, baseline)
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    if sd == 0:
        # Every case moved by the same amount: no noise, so the effect is 0 or unbounded.
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / sd


def cohens_h(p_candidate: float, p_baseline: float) -> float:
    """Cohen's h for two proportions: 2·asin(√p1) − 2·asin(√p2)."""
    return 2 * math.asin(math.sqrt(p_candidate)) - 2 * math.asin(math.sqrt(p_baseline))


def paired_bootstrap(
    candidate: Floats,
    baseline: Floats,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    *,
    method: str = "bca",
    bounds: tuple[float, float] | None = None,
) -> PairedComparison:
    """Paired bootstrap of mean(candidate − baseline): CI and a two-sided bootstrap p-value.

    `bounds` is the range of both samples' values (e.g. UNIT); the differences then lie in [lo - hi, hi - lo] and
    their interval is never narrower than `bounded_difference`'s. Without bounds, differences with no spread have
    no finite bound.
    """
    _check_confidence(confidence)
    d = _paired(candidate, baseline)
    floor = None
    if bounds is not None:
        for sample in (candidate, baseline):
            _in_range(np.asarray(sample, dtype=float).ravel(), bounds)
        floor = bounded_difference(d, bounds[1] - bounds[0], confidence=confidence)
    n = int(d.size)
    effect = cohens_d_paired(candidate, baseline)
    est = float(d.mean())
    if n == 1 or np.all(d == d[0]):
        interval = _no_spread(d, confidence, floor)
        # A constant non-zero shift on several cases is as extreme as the bootstrap can show;
        # one case, or no shift at all, is no evidence of change.
        p_value = 1.0 if est == 0 or n == 1 else 1.0 / (n_resamples + 1)
        return PairedComparison(interval, p_value, effect, n)
    boot = _bootstrap_means(d, n_resamples, np.random.default_rng(seed))
    interval = _mean_interval(d, boot, confidence, method)
    if floor is not None:
        interval = _widened(interval, floor)
    # Null distribution by shifting the resampled means to centre on zero (Efron & Tibshirani
    # §16.4); +1 keeps the p-value away from an impossible exact 0.
    extreme = np.count_nonzero(np.abs(boot - est) >= abs(est) - 1e-12 * max(1.0, abs(est)))
    p_value = min(1.0, float(extreme + 1) / (n_resamples + 1))
    return PairedComparison(interval, p_value, effect, n)


def mcnemar_counts(regressions: int, improvements: int, *, exact: bool | None = None) -> McNemarResult:
    """McNemar's test from discordant counts; exact binomial below 25 discordant pairs by default."""
    b, c = int(regressions), int(improvements)
    if b < 0 or c < 0:
        raise InsufficientData("discordant counts must be non-negative")
    m = b + c
    use_exact = m < _EXACT_MCNEMAR_BELOW if exact is None else exact
    if m == 0:
        return McNemarResult(b, c, 0.0, 1.0, "exact" if use_exact else "chi2-cc")
    if use_exact:
        p = min(1.0, 2.0 * float(sps.binom.cdf(min(b, c), m, 0.5)))
        return McNemarResult(b, c, float(min(b, c)), p, "exact")
    stat = (abs(b - c) - 1) ** 2 / m if b != c else 0.0
    return McNemarResult(b, c, float(stat), float(sps.chi2.sf(stat, 1)), "chi2-cc")


def mcnemar(
    candidate_pass: Sequence[bool] | np.ndarray,
    baseline_pass: Sequence[bool] | np.ndarray,
    *,
    exact: bool | None = None,
) -> McNemarResult:
    """McNemar's test on per-case pass/fail of candidate and baseline over the same cases."""
    c = np.asarray(candidate_pass, dtype=bool).ravel()
    b = np.asarray(baseline_pass, dtype=bool).ravel()
    if c.size == 0 or c.size != b.size:
        raise InsufficientData(
            f"McNemar needs equal, non-empty paired samples (candidate {c.size}, baseline {b.size})"
        )
    return mcnemar_counts(int(np.sum(b & ~c)), int(np.sum(~b & c)), exact=exact)


def min_detectable_effect(
    n: int, sd: float, *, alpha: float = 0.05, power: float = 0.8, two_sided: bool = True
) -> float:
    """Smallest mean difference a paired test on n cases detects with this alpha and power."""
    _check_power(alpha, power)
    return gpower.min_detectable_effect(n, sd, alpha=alpha, power=power, two_sided=two_sided)


def required_n(
    margin: float, sd: float, *, alpha: float = 0.05, power: float = 0.8, two_sided: bool = True
) -> int:
    """Cases needed for a paired test to detect a mean difference of `margin`."""
    _check_power(alpha, power)
    if margin <= 0:
        raise InsufficientData(f"the margin must be positive, got {margin}")
    return gpower.required_n(margin, sd, alpha=alpha, power=power, two_sided=two_sided)


def _check_power(alpha: float, power: float) -> None:
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise InsufficientData(f"alpha and power must be between 0 and 1, got {alpha} and {power}")


def power_warning(
    n: int, margin: float, sd: float, *, alpha: float = 0.05, power: float = 0.8, two_sided: bool = True
) -> str | None:
    """A warning when n cases cannot detect `margin` at this alpha and power, else None."""
    mde = min_detectable_effect(n, sd, alpha=alpha, power=power, two_sided=two_sided)
    if n >= 2 and mde <= margin:
        return None
    need = required_n(margin, sd, alpha=alpha, power=power, two_sided=two_sided)
    return (
        f"sample too small: {n} cases detect a change of {mde:.4g} at alpha={alpha:g}, "
        f"power={power:g}, but the margin is {margin:.4g}; about {need} cases are needed"
    )


def paired_power_warning(
    candidate: Floats,
    baseline: Floats,
    margin: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    two_sided: bool = True,
) -> str | None:
    """power_warning with the spread estimated from the paired differences themselves."""
    d = _paired(candidate, baseline)
    n = int(d.size)
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    both = np.concatenate([np.asarray(candidate, float), np.asarray(baseline, float)])
    if both.min() >= 0 and both.max() <= 1:
        sd = gpower.bounded_sd(sd, n)  # the gate's hint applies the same floor
    return power_warning(n, margin, sd, alpha=alpha, power=power, two_sided=two_sided)


def percentile_interval(values: Floats, q: float, *, confidence: float = 0.95) -> Interval:
    """Distribution-free CI for the q-th percentile (0-100) from binomial order statistics.

    A bound the sample is too small to identify is ±inf (e.g. p99 from 50 cases).
    """
    _check_confidence(confidence)
    if not 0 <= q <= 100:
        raise InsufficientData(f"percentile must be between 0 and 100, got {q}")
    x = np.sort(_as_array(values))
    n = x.size
    est = float(np.percentile(x, q))
    dist = sps.binom(n, q / 100)
    tail = (1 - confidence) / 2
    lo_i = int(dist.ppf(tail)) - 1
    hi_i = int(dist.isf(tail))
    low = float(x[lo_i]) if lo_i >= 0 else -math.inf
    high = float(x[hi_i]) if hi_i < n else math.inf
    return Interval(est, min(low, est), max(high, est), confidence, "order-statistic", int(n))


def latency_percentiles(
    values: Floats, qs: Sequence[float] = (50, 95, 99), *, confidence: float = 0.95
) -> dict[str, Interval]:
    """p50/p95/p99 (or any qs) with order-statistic intervals, keyed "p50", "p95", ..."""
    return {f"p{q:g}": percentile_interval(values, q, confidence=confidence) for q in qs}


def _percentile_rows(t: np.ndarray, q: float) -> np.ndarray:
    # nanpercentile loops in Python over rows; clusters of equal size (the usual repeats) need no NaN padding.
    return np.nanpercentile(t, q, axis=1) if np.isnan(t).any() else np.percentile(t, q, axis=1)


def cluster_percentile_interval(groups: Sequence[Sequence[float]], q: float, *, confidence: float = 0.95,
                                n_resamples: int = 2000, seed: int = 0) -> Interval:
    """CI for the q-th percentile of all values when values come in clusters (a case's repeats).

    Resamples whole clusters (percentile bootstrap) so repeats of one case are never treated as independent.
    A sample too small to place a tail bound inside the data gives ±inf there, as `percentile_interval` does.
    """
    _check_confidence(confidence)
    if not groups or not all(len(g) for g in groups):
        raise InsufficientData("clustered percentile needs non-empty clusters")
    width = max(len(g) for g in groups)
    # Pad to a rectangle with NaN so one vectorised nanpercentile handles clusters of unequal size.
    table = np.full((len(groups), width), np.nan)
    for i, g in enumerate(groups):
        table[i, : len(g)] = _as_array(g)
    flat = table[~np.isnan(table)]
    est = float(np.percentile(flat, q))
    k = len(groups)
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_CELLS // (k * width))
    boot = np.empty(n_resamples)
    for start in range(0, n_resamples, block):
        stop = min(start + block, n_resamples)
        idx = rng.integers(0, k, size=(stop - start, k))
        boot[start:stop] = _percentile_rows(table[idx].reshape(stop - start, -1), q)
    tail = (1 - confidence) / 2
    low, high = np.percentile(boot, [100 * tail, 100 * (1 - tail)])
    # Clustering only widens intervals: where even independent rows cannot bound a tail, neither can clusters.
    rows = percentile_interval(flat, q, confidence=confidence)
    low = -math.inf if math.isinf(rows.low) else low
    high = math.inf if math.isinf(rows.high) else high
    return Interval(est, float(min(low, est)), float(max(high, est)), confidence, "cluster-bootstrap", k)


class ClusteredDifference(msgspec.Struct, frozen=True):
    """Candidate minus baseline of one statistic over shared cases, resampling cases; `relative` is c/b - 1."""

    candidate: float
    baseline: float
    difference: Interval
    relative: Interval | None  # None when the baseline statistic can be 0
    p_value: float


def _table(groups: Sequence[Sequence[float]]) -> np.ndarray:
    table = np.full((len(groups), max(len(g) for g in groups)), np.nan)
    for i, g in enumerate(groups):
        table[i, : len(g)] = _as_array(g)
    return table


def paired_cluster_difference(candidate: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]],
                              q: float | None = None, *, confidence: float = 0.95, n_resamples: int = 2000,
                              seed: int = 0) -> ClusteredDifference:
    """Difference of a statistic (the mean of all values, or their q-th percentile) between two runs of the
    same cases: one bootstrap resample of case indices serves both runs, so the comparison stays paired and
    clustered. Percentile-bootstrap CIs of the difference and of the ratio minus one."""
    _check_confidence(confidence)
    k = len(candidate)
    if k == 0 or k != len(baseline) or not all(len(g) for g in [*candidate, *baseline]):
        raise InsufficientData("a paired clustered comparison needs the same non-empty cases in both runs")
    ct, bt = _table(candidate), _table(baseline)

    def stat(t: np.ndarray) -> np.ndarray:
        return np.nanmean(t, axis=1) if q is None else _percentile_rows(t, q)

    c_est, b_est = (float(stat(t.reshape(1, -1))[0]) for t in (ct, bt))
    rng = np.random.default_rng(seed)
    cb, bb = np.empty(n_resamples), np.empty(n_resamples)
    block = max(1, _BLOCK_CELLS // (k * max(ct.shape[1], bt.shape[1])))
    for start in range(0, n_resamples, block):
        stop = min(start + block, n_resamples)
        idx = rng.integers(0, k, size=(stop - start, k))
        cb[start:stop] = stat(ct[idx].reshape(stop - start, -1))
        bb[start:stop] = stat(bt[idx].reshape(stop - start, -1))
    tail = 100 * (1 - confidence) / 2
    est = c_est - b_est
    boot = cb - bb
    if k == 1 or np.all(boot == boot[0]):
        # One case, or cases that all moved alike, leave nothing to resample: no finite bound on a latency or cost
        # change (unbounded metrics), rather than the bootstrap's [est, est].
        rel = Interval(c_est / b_est - 1, -math.inf, math.inf, confidence, "degenerate", k) if b_est > 0 else None
        p_value = 1.0 if est == 0 or k == 1 else 1.0 / (n_resamples + 1)
        return ClusteredDifference(c_est, b_est, Interval(est, -math.inf, math.inf, confidence, "degenerate", k),
                                   rel, p_value)
    low, high = np.percentile(boot, [tail, 100 - tail])
    diff = Interval(est, float(min(low, est)), float(max(high, est)), confidence, "paired-cluster-bootstrap", k)
    rel = None
    if b_est > 0 and np.all(bb > 0):
        r_est = c_est / b_est - 1
        rlow, rhigh = np.percentile(cb / bb - 1, [tail, 100 - tail])
        rel = Interval(r_est, float(min(rlow, r_est)), float(max(rhigh, r_est)), confidence,
                       "paired-cluster-bootstrap", k)
    extreme = np.count_nonzero(np.abs(boot - est) >= abs(est) - 1e-12 * max(1.0, abs(est)))
    p_value = min(1.0, float(extreme + 1) / (n_resamples + 1))
    return ClusteredDifference(c_est, b_est, diff, rel, p_value)
