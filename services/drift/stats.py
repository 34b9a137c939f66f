"""Drift statistics: population stability index, the two-sample Kolmogorov-Smirnov test, and for
categorical features PSI over the categories with a chi-squared test of homogeneity."""

from __future__ import annotations

import numpy as np
from scipy import stats

# An empty bin counts as half an observation: finite ln(q/p) without the huge penalty a fixed
# 1e-4 gives small windows, where an empty decile is common by chance.
HALF_COUNT = 0.5


def quantile_cuts(reference: np.ndarray, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's deciles; ties collapse, so discrete data gets fewer bins."""
    qs = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    return np.unique(np.quantile(reference, qs))


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
    """Population stability index of `current` against bins cut from `reference`."""
    cuts = quantile_cuts(reference, bins)
    return psi_from_proportions(proportions(reference, cuts), proportions(current, cuts))


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
    the category whose share moved most with its share in the reference and in the current window."""
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
    top = int(np.argmax(np.abs(shares_cur - shares_ref))) if k else 0
    code = float(cats[top]) if k else 0.0
    return psi_value, chi2, pvalue, code, float(shares_ref[top]) if k else 0.0, float(shares_cur[top]) if k else 0.0
