"""Calibration of confidences against correctness: ECE, Brier score, confidence from logprobs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import msgspec
import numpy as np

from .stats import InsufficientData, Interval

# Keep each resampling block near 4M cells however many cases there are.
_BLOCK_CELLS = 4_000_000


class CalibrationBin(msgspec.Struct, frozen=True):
    """One equal-width confidence bin (lower, upper] of a reliability diagram."""

    lower: float
    upper: float
    count: int
    accuracy: float
    confidence: float


def _pairs(confidences: Sequence[float], correct: Sequence[bool | float]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(confidences, dtype=float).ravel()
    y = np.asarray(correct, dtype=float).ravel()
    if p.size == 0 or p.size != y.size:
        raise InsufficientData(
            f"calibration needs equal, non-empty confidences and outcomes (got {p.size} and {y.size})"
        )
    if not np.all((p >= 0) & (p <= 1)):
        raise InsufficientData("confidences must be probabilities in [0, 1]")
    if not np.all((y == 0) | (y == 1)):
        raise InsufficientData("outcomes must be correct/incorrect (1/0 or true/false)")
    return p, y


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    # Round first: 0.7 * 10 is 7.000000000000001 in floating point and must stay in (0.6, 0.7].
    return np.clip(np.ceil(np.round(p * n_bins, 9)).astype(int) - 1, 0, n_bins - 1)


def reliability_bins(
    confidences: Sequence[float], correct: Sequence[bool | float], n_bins: int = 10
) -> list[CalibrationBin]:
    """Non-empty equal-width bins; confidence 0 falls in the first bin (Guo et al. 2017)."""
    if n_bins < 1:
        raise InsufficientData(f"n_bins must be at least 1, got {n_bins}")
    p, y = _pairs(confidences, correct)
    idx = _bin_index(p, n_bins)
    bins = []
    for b in range(n_bins):
        mask = idx == b
        if mask.any():
            bins.append(
                CalibrationBin(
                    b / n_bins,
                    (b + 1) / n_bins,
                    int(mask.sum()),
                    float(y[mask].mean()),
                    float(p[mask].mean()),
                )
            )
    return bins


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool | float], n_bins: int = 10
) -> float:
    """ECE: bin-size-weighted mean |accuracy − confidence| over equal-width bins."""
    bins = reliability_bins(confidences, correct, n_bins)
    n = sum(b.count for b in bins)
    return float(sum(b.count / n * abs(b.accuracy - b.confidence) for b in bins))


def ece_interval(
    confidences: Sequence[float], correct: Sequence[bool | float], groups: Sequence[str], n_bins: int = 10,
    *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
) -> Interval:
    """Percentile-bootstrap CI of the ECE, resampling groups (cases) so repeats of a case move together.

    With fewer than two groups the bounds are NaN: there is nothing to resample.
    """
    if not 0 < confidence < 1:
        raise InsufficientData(f"confidence must be between 0 and 1, got {confidence}")
    p, y = _pairs(confidences, correct)
    if len(groups) != p.size:
        raise InsufficientData(f"ece_interval needs one group per confidence (got {len(groups)} and {p.size})")
    est = expected_calibration_error(p, y, n_bins)
    _, g = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    k = int(g.max()) + 1
    if k < 2:
        return Interval(est, math.nan, math.nan, confidence, "percentile", int(p.size))
    # ECE = sum over bins of |sum(y) - sum(p)| / n, so per-group bin sums are all a resample needs.
    diff = np.zeros((k, n_bins))
    np.add.at(diff, (g, _bin_index(p, n_bins)), y - p)
    rows = np.bincount(g, minlength=k).astype(float)
    rng = np.random.default_rng(seed)
    boot = np.empty(n_resamples)
    block = max(1, _BLOCK_CELLS // k)
    for start in range(0, n_resamples, block):
        r = min(block, n_resamples - start)
        draws = rng.integers(0, k, size=(r, k)) + (np.arange(r) * k)[:, None]
        times = np.bincount(draws.ravel(), minlength=r * k).reshape(r, k).astype(float)
        boot[start : start + r] = np.abs(times @ diff).sum(axis=1) / (times @ rows)
    alpha = 1 - confidence
    low, high = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    # ECE is biased upward, so resamples can sit above the estimate; the interval still contains it.
    return Interval(est, float(min(low, est)), float(max(high, est)), confidence, "percentile", int(p.size))


def brier_score(confidences: Sequence[float], correct: Sequence[bool | float]) -> float:
    """Mean squared error of the confidences against 0/1 outcomes (0 is perfect)."""
    p, y = _pairs(confidences, correct)
    return float(np.mean((p - y) ** 2))


def confidence_from_logprobs(
    token_logprobs: Sequence[float], how: Literal["mean", "product", "min"] = "mean"
) -> float:
    """Answer confidence from token logprobs: geometric-mean token probability by default.

    "product" is the whole sequence's probability (punishes long answers); "min" is the
    weakest token's probability.
    """
    lp = np.asarray(token_logprobs, dtype=float).ravel()
    if lp.size == 0:
        raise InsufficientData("no token logprobs: the endpoint did not return logprobs")
    if np.any(lp > 1e-9) or not np.all(np.isfinite(lp) | (lp == -np.inf)):
        raise InsufficientData("logprobs must be natural-log probabilities (<= 0)")
    if how == "mean":
        value = float(np.exp(lp.mean()))
    elif how == "product":
        value = float(np.exp(lp.sum()))
    elif how == "min":
        value = float(np.exp(lp.min()))
    else:
        raise InsufficientData(f"unknown logprob aggregation {how!r}; use mean, product or min")
    return min(1.0, value)


def choice_confidence(top_logprobs: Mapping[str, float], answer: str) -> float:
    """Probability of `answer` renormalised over the returned alternatives (e.g. A/B/C/D)."""
    if not top_logprobs:
        raise InsufficientData("no top logprobs to take a confidence from")
    # Tokenisers emit " A" and "A" as different tokens for the same choice.
    merged: dict[str, float] = {}
    for token, lp in top_logprobs.items():
        key = token.strip().casefold()
        merged[key] = merged.get(key, 0.0) + math.exp(lp)
    total = sum(merged.values())
    return merged.get(answer.strip().casefold(), 0.0) / total if total > 0 else 0.0
