"""Exact (Clopper-Pearson) bounds for rare event rates: "leaks at most 0.1% with 95% confidence"."""

from __future__ import annotations

import math

from scipy import stats as sps


def _check(k: int, n: int, confidence: float) -> None:
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")


def upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided exact upper bound of a rate after k events in n trials (k=0: 1 - (1-c)^(1/n))."""
    _check(k, n, confidence)
    if k == n:
        return 1.0
    return float(sps.beta.ppf(confidence, k + 1, n - k))


def lower_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided exact lower bound of a rate after k events in n trials (0 when none were seen)."""
    _check(k, n, confidence)
    if k == 0:
        return 0.0
    return float(sps.beta.ppf(1 - confidence, k, n - k + 1))


def trials_for(rate: float, confidence: float = 0.95, observed_rate: float = 0.0) -> int | None:
    """Trials after which the upper bound is at most `rate` if events keep occurring at `observed_rate`.

    None when no sample can show it (the observed rate is not below the bound).
    """
    if not 0 < rate < 1:
        raise ValueError(f"rate must be between 0 and 1, got {rate}")
    if observed_rate >= rate:
        return None
    if observed_rate == 0:
        # Rule of three, exactly: (1 - rate)^n <= 1 - confidence.
        return math.ceil(math.log(1 - confidence) / math.log1p(-rate))
    lo, hi = 1, 2
    while upper_bound(math.floor(observed_rate * hi), hi, confidence) > rate:
        lo, hi = hi, hi * 2
        if hi > 10**12:
            return None
    while lo < hi:  # the bound is not monotone in n step by step, but nearly; bisection finds a good n
        mid = (lo + hi) // 2
        if upper_bound(math.floor(observed_rate * mid), mid, confidence) <= rate:
            hi = mid
        else:
            lo = mid + 1
    return hi
