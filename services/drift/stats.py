"""Drift statistics: population stability index, the two-sample Kolmogorov-Smirnov test, and for
categorical features PSI over the categories with a chi-squared test of homogeneity; and the test chosen
per feature by sample size and type as Evidently chooses it (`drift_test`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.spatial import distance

# An empty bin counts as half an observation: finite ln(q/p) without the huge penalty a fixed
# 1e-4 gives small windows, where an empty decile is common by chance.
HALF_COUNT = 0.5


def quantile_cuts(reference: np.ndarray, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's deciles; ties collapse, so discrete data gets fewer bins."""
    qs = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    return np.unique(np.quantile(reference, qs))


def tied_cuts(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> np.ndarray:
    """Inner bin edges for windows with heavy ties: each value holding at least a bin's share (1/bins) of either
    window has a bin of its own, and the other values of both windows are cut at their pooled quantiles into the
    bins left (at least 2)."""
    tied = np.union1d(_common(reference, bins), _common(current, bins))
    # (just below v, v] holds v alone: `proportions` bins are closed on the right.
    edges = [tied, np.nextafter(tied, -np.inf)]
    rest = np.concatenate([reference, current])
    rest = rest[~np.isin(rest, tied)]
    if len(rest):
        k = max(2, bins - len(tied))
        edges.append(np.quantile(rest, np.linspace(0.0, 1.0, k + 1)[1:-1]))
    return np.unique(np.concatenate(edges))


def _common(values: np.ndarray, bins: int) -> np.ndarray:
    """The values holding at least 1/bins of `values`."""
    distinct, counts = np.unique(values, return_counts=True)
    return distinct[counts * bins >= len(values)]


def shift_cuts(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Edges around where the windows differ: the value at which their cumulative shares part furthest (the KS
    statistic's point), the first and last values at which they part at least half as far, and the nearest values
    either side at which they agree (or part the other way). The mass that moved lies between them, so it crosses a
    bin edge however few bins surround it, also where the shares part evenly across a flood's values."""
    grid = np.unique(np.concatenate([reference, current]))
    parted = (np.searchsorted(np.sort(reference), grid, side="right") / len(reference)
              - np.searchsorted(np.sort(current), grid, side="right") / len(current))
    peak = int(np.argmax(np.abs(parted)))
    apart = np.sign(parted[peak]) * parted
    agree = apart <= 0
    below, above = np.flatnonzero(agree[:peak]), peak + 1 + np.flatnonzero(agree[peak + 1:])
    half = np.flatnonzero(apart >= apart[peak] / 2)  # holds the peak
    return grid[[peak, half[0], half[-1], *below[-1:], *above[:1]]]


def cuts(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> np.ndarray:
    """The reference's deciles (`quantile_cuts`), or `tied_cuts` where ties collapse them; and `shift_cuts`.

    Collapsed deciles put the tied mass and whatever else falls beside it in one bin, so a shift of the other values
    went unseen: a client sending `max_tokens: 1` as nine requests in ten left two bins, each holding a tenth of both
    arms' rows whatever the real answers did, and PSI read 0 for a canary whose real answers were 15 times longer
    (probe p46 F2). Any bins cut from the windows' quantiles alone hold a tenth of the mass each, so a shift confined
    to a tenth can stay inside one: the same client drawing `max_tokens` from 40-69 kept the reference's deciles, both
    arms' real answers fell in the first, and PSI read ~0.09 for a canary whose real answers were three times longer
    (probe p49 F4). The cuts at the shift put the moved mass in bins of its own."""
    edges = quantile_cuts(reference, bins)
    edges = edges if len(edges) >= bins - 1 else tied_cuts(reference, current, bins)
    return np.union1d(edges, shift_cuts(reference, current))


def proportions(values: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Share of `values` in each bin (-inf, c0], (c0, c1], ..., (c_last, inf); empty bins smoothed."""
    idx = np.searchsorted(cuts, values, side="left")
    counts = np.bincount(idx, minlength=len(cuts) + 1).astype(np.float64)
    n = max(len(values), 1)
    return np.where(counts > 0, counts, HALF_COUNT) / n


def psi_from_proportions(p: np.ndarray, q: np.ndarray) -> float:
    """PSI = sum((q - p) * ln(q / p)); both must be free of zeros."""
    return float(np.sum((q - p) * np.log(q / p)))


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index of `current` against `reference` over the bins of `cuts`."""
    edges = cuts(reference, current, bins)
    return psi_from_proportions(proportions(reference, edges), proportions(current, edges))


def ks(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic and p-value (scipy)."""
    # The exact p-value costs O(n*m) and gives up on large windows anyway (with a warning);
    # past a few thousand pairs the asymptotic distribution is accurate.
    method = "exact" if len(reference) * len(current) <= 10_000 else "asymp"
    res = stats.ks_2samp(reference, current, method=method)
    return float(res.statistic), float(res.pvalue)


def categorical(reference: np.ndarray, current: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """Drift of a categorical feature (values are category codes): PSI over the categories seen in either
    window (empty cells smoothed as for bins), chi-squared statistic and p-value of the 2 x k table, and
    the category whose share moved most (on a tie, one whose share rose) with its share in the reference and in
    the current window."""
    cats, idx = np.unique(np.concatenate([reference, current]), return_inverse=True)
    k = len(cats)
    ref_counts = np.bincount(idx[:len(reference)], minlength=k).astype(np.float64)
    cur_counts = np.bincount(idx[len(reference):], minlength=k).astype(np.float64)
    n_ref, n_cur = max(len(reference), 1), max(len(current), 1)
    p = np.where(ref_counts > 0, ref_counts, HALF_COUNT) / n_ref
    q = np.where(cur_counts > 0, cur_counts, HALF_COUNT) / n_cur
    psi_value = psi_from_proportions(p, q) if k > 1 else 0.0
    if k > 1 and len(reference) and len(current):
        res = stats.chi2_contingency(np.vstack([ref_counts, cur_counts]), correction=False)
        chi2, pvalue = float(res.statistic), float(res.pvalue)
    else:
        chi2, pvalue = 0.0, 1.0
    shares_ref, shares_cur = ref_counts / n_ref, cur_counts / n_cur
    # Two categories often move alike (with two, always: errors 0 -> 0.42 is "(none)" 1 -> 0.58): the one that rose
    # is named, which says what appeared. Rounded first, so float noise in equal moves cannot pick either at random
    # (an error's report named "error_type:(none)" or "error_type:500" from run to run).
    moved = shares_cur - shares_ref
    top = int(np.argmax(np.round(np.abs(moved), 9) + 1e-12 * (moved > 0))) if k else 0
    code = float(cats[top]) if k else 0.0
    return psi_value, chi2, pvalue, code, float(shares_ref[top]) if k else 0.0, float(shares_cur[top]) if k else 0.0


# --- Test selection by sample size and type, as Evidently chooses its default stattests --------------------

SMALL = 1000  # up to this many reference rows a hypothesis test decides; above it, a distance does
ALPHA = 0.05  # p-value threshold of the hypothesis tests (KS, chi-squared, Z)
DISTANCE = 0.1  # threshold of the distances (Wasserstein normed by the reference's std, Jensen-Shannon)
FEW_VALUES = 5  # a numeric feature with at most this many distinct values is compared as categorical
CATEGORICAL_TESTS = frozenset({"chi_squared", "z", "jensen_shannon"})


@dataclass(frozen=True)
class StatTest:
    """One feature's drift test: which test, its statistic, p-value (tests) or distance, the threshold."""

    test: str  # "ks", "wasserstein", "chi_squared", "z", "jensen_shannon"
    statistic: float
    p_value: float | None  # None for a distance: the statistic is the distance
    threshold: float
    drifted: bool
    reference_n: int
    current_n: int


def wasserstein_norm(reference: np.ndarray, current: np.ndarray) -> float:
    """Wasserstein-1 distance in units of the reference's standard deviation (floored, so a constant
    reference gives a large, finite distance when the current window moved)."""
    norm = max(float(np.std(reference)), 1e-3)
    return float(stats.wasserstein_distance(reference, current)) / norm


def _counts(reference: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cats, idx = np.unique(np.concatenate([reference, current]), return_inverse=True)
    k = len(cats)
    return (np.bincount(idx[:len(reference)], minlength=k).astype(np.float64),
            np.bincount(idx[len(reference):], minlength=k).astype(np.float64))


def jensen_shannon(reference: np.ndarray, current: np.ndarray) -> float:
    """Jensen-Shannon distance (natural log, so within [0, sqrt(ln 2)]) between the category shares."""
    ref_counts, cur_counts = _counts(reference, current)
    if len(ref_counts) < 2:
        return 0.0
    return float(distance.jensenshannon(ref_counts / ref_counts.sum(), cur_counts / cur_counts.sum()))


def chi_squared(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Chi-squared test of homogeneity of the 2 x k table of category counts: statistic and p-value."""
    ref_counts, cur_counts = _counts(reference, current)
    if len(ref_counts) < 2:
        return 0.0, 1.0
    res = stats.chi2_contingency(np.vstack([ref_counts, cur_counts]), correction=False)
    return float(res.statistic), float(res.pvalue)


def z_test(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-proportion Z-test (two-sided) of a binary feature: statistic and p-value."""
    values = np.unique(np.concatenate([reference, current]))
    if len(values) < 2:
        return 0.0, 1.0
    one = values[-1]
    n1, n2 = len(reference), len(current)
    p1, p2 = float(np.mean(reference == one)), float(np.mean(current == one))
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (p2 - p1) / se
    return z, float(2 * stats.norm.sf(abs(z)))


def drift_test(reference: np.ndarray, current: np.ndarray, kind: str) -> StatTest:
    """The test Evidently would pick for this feature, run: `kind` is "num" or "cat".

    Up to SMALL reference rows: KS for numeric features, chi-squared for categorical ones (Z for binary),
    drift when p < ALPHA. Above: Wasserstein normed by the reference's std for numeric features,
    Jensen-Shannon for categorical ones, drift when the distance >= DISTANCE. A numeric feature with few
    distinct values (e.g. a 0/1 score) is categorical.
    """
    n_ref, n_cur = len(reference), len(current)
    n_values = len(np.unique(np.concatenate([reference, current])))
    if kind == "num" and n_values <= FEW_VALUES:
        kind = "cat"
    if n_ref <= SMALL:
        if kind == "num":
            stat, p = ks(reference, current)
            name = "ks"
        elif n_values <= 2:
            stat, p = z_test(reference, current)
            name = "z"
        else:
            stat, p = chi_squared(reference, current)
            name = "chi_squared"
        return StatTest(name, stat, p, ALPHA, p < ALPHA, n_ref, n_cur)
    if kind == "num":
        name, dist = "wasserstein", wasserstein_norm(reference, current)
    else:
        name, dist = "jensen_shannon", jensen_shannon(reference, current)
    return StatTest(name, dist, None, DISTANCE, dist >= DISTANCE, n_ref, n_cur)


# --- Users as the unit: a canary and its stable serve different users ------------------------------------------
# Sticky bucketing puts each user on one arm, and one user's requests are alike (the length of their answers, their
# topic): rows of a canary-versus-stable window are not independent draws, and a test counting rows reads the users'
# split as drift. These tests permute whole units (a user's rows, on one arm) between the arms instead, and weigh every
# unit alike in the statistic (`unit_weights`): the unit is what is drawn, so it is what is counted.

PERMUTATIONS = 200
SEED = 20240601  # fixed, so the same windows always get the same p-value (a redelivery, a replica)


def units_of(reference_units: np.ndarray, current_units: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The unit of each pooled row (reference rows first), numbered 0.. in order of first appearance, and how many
    units the reference and the current rows make. A unit is a user's rows on one arm (a user on both arms, moved
    there as the weight rose, is a unit on each); a row without a user (NaN) is a unit of its own."""
    n, m = len(reference_units), len(current_units)
    pooled = np.concatenate([reference_units, current_units])
    side = np.r_[np.zeros(n), np.ones(m)]
    alone = np.isnan(pooled)
    # A row without a user gets a key no user has: its own index, on a side of its own (2, 3) apart from users'.
    key = np.stack([np.where(alone, np.arange(n + m), pooled), side + 2 * alone], axis=1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    unit = rank[inverse.reshape(-1)]
    g_ref = len(np.unique(unit[:n]))
    return unit, g_ref, int(unit.max()) + 1 - g_ref


def clustered(reference_units: np.ndarray, current_units: np.ndarray) -> bool:
    """Whether some unit holds more than one row (with one row each the row-level tests already count units)."""
    unit, g_ref, g_cur = units_of(reference_units, current_units)
    return g_ref + g_cur < len(unit)


def unit_weights(unit: np.ndarray) -> np.ndarray:
    """Each row's weight in a units' statistic: 1 / its unit's rows, so every unit weighs one however many it sent.

    Weighed by their rows, a few units sending most of the rows decided every split: two users, one on each arm,
    sending four requests in five with `max_tokens: 1`, made the splits putting both on one side part the windows
    far more than a canary answering every other user three times as long did, and it was never DRIFT (probe p87
    F2). A user's rows are alike (why the user is the unit), so their hundredth says little their first did not;
    and a weight fixed by the unit's own rows moves with it in every split, so the test stays exact."""
    return 1.0 / np.bincount(unit)[unit]


def splits(units: int, first: int, permutations: int = PERMUTATIONS, seed: int = SEED) -> np.ndarray:
    """(permutations, units) 0/1: row k marks the `first` units random split k puts on the reference side."""
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((permutations, units)), axis=1)[:, :first]
    out = np.zeros((permutations, units))
    np.put_along_axis(out, order, 1.0, axis=1)
    return out


def _numeric_stats(x: np.ndarray, ref: np.ndarray, w: np.ndarray, test: str) -> np.ndarray:
    """Per split (rows of `ref`: the weight each pooled row of `x` puts on the reference side, of its weight `w`):
    KS statistic, or Wasserstein-1 normed by the reference side's std, from the two sides' weighted empirical CDFs on
    the pooled values."""
    order = np.argsort(x, kind="stable")
    xs, a = x[order], ref[:, order]
    last = np.r_[np.flatnonzero(np.diff(xs)), len(xs) - 1]  # each distinct value's last row
    n_ref = a.sum(axis=1, keepdims=True)
    cum_ref = np.cumsum(a, axis=1)[:, last]
    cum_all = np.cumsum(w[order])[last][None, :]
    gap = np.abs(cum_ref / n_ref - (cum_all - cum_ref) / (w.sum() - n_ref))
    if test == "ks":
        return gap.max(axis=1)
    widths = np.diff(xs[last])
    mean = (ref @ x) / n_ref[:, 0]
    std = np.sqrt(np.maximum((ref @ (x * x)) / n_ref[:, 0] - mean * mean, 0.0))
    return (gap[:, :-1] @ widths) / np.maximum(std, 1e-3)


def _categorical_stats(x: np.ndarray, ref: np.ndarray, w: np.ndarray, test: str) -> np.ndarray:
    """Per split (`ref` and `w` as for `_numeric_stats`): the chi-squared statistic of the 2 x k table of weights (Z's
    square for two categories), or the Jensen-Shannon distance of the two sides' shares."""
    _, idx = np.unique(x, return_inverse=True)
    onehot = np.zeros((len(x), int(idx.max()) + 1))
    onehot[np.arange(len(x)), idx.reshape(-1)] = 1.0
    r = ref @ onehot
    c = (w @ onehot)[None, :] - r
    if test == "jensen_shannon":
        p, q = r / r.sum(axis=1, keepdims=True), c / c.sum(axis=1, keepdims=True)
        mid = (p + q) / 2
        kl = np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / np.where(mid > 0, mid, 1)), 0.0)
        kl2 = np.where(q > 0, q * np.log(np.where(q > 0, q, 1) / np.where(mid > 0, mid, 1)), 0.0)
        return np.sqrt(np.maximum((kl.sum(axis=1) + kl2.sum(axis=1)) / 2, 0.0))
    table = np.stack([r, c], axis=1)  # (splits, 2, k)
    expected = table.sum(axis=2, keepdims=True) * table.sum(axis=1, keepdims=True) / w.sum()
    return np.sum(np.where(expected > 0, (table - expected) ** 2 / np.where(expected > 0, expected, 1), 0.0),
                  axis=(1, 2))


def unit_pvalue(reference: np.ndarray, current: np.ndarray, reference_units: np.ndarray,
                current_units: np.ndarray, test: str, *, permutations: int = PERMUTATIONS, seed: int = SEED) -> float:
    """The share of random splits of the units (`units_of`) between the arms whose `test` statistic (drift_test's:
    KS or Wasserstein for a number, chi-squared, Z or Jensen-Shannon for a category), each unit weighing one
    (`unit_weights`), is at least the observed one: how often the users' split alone parts the windows as far.
    Cheap: a window is at most a few thousand rows."""
    unit, g_ref, g_cur = units_of(reference_units, current_units)
    x = np.concatenate([reference, current])
    w = unit_weights(unit)
    observed = np.r_[np.ones(len(reference)), np.zeros(len(current))][None, :]
    split = np.vstack([observed, splits(g_ref + g_cur, g_ref, permutations, seed)[:, unit]]) * w
    values = (_categorical_stats if test in CATEGORICAL_TESTS else _numeric_stats)(x, split, w, test)
    at_least = int(np.sum(values[1:] >= values[0] - 1e-12))
    return (1 + at_least) / (1 + permutations)
