"""Multiple-comparison control over many slices, so more slices do not mean more false blocks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Correction = Literal["holm", "bh", "none"]


def holm(p_values: Sequence[float], alpha: float) -> list[bool]:
    """Holm's step-down: which hypotheses to reject with the family-wise error rate at most alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    m = len(p_values)
    reject = [False] * m
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (m - rank):
            break
        reject[i] = True
    return reject


def benjamini_hochberg(p_values: Sequence[float], alpha: float) -> list[bool]:
    """Benjamini-Hochberg step-up: rejections with the false discovery rate at most alpha (independent tests)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    m = len(p_values)
    cutoff = 0
    for rank, i in enumerate(order, start=1):
        if p_values[i] <= alpha * rank / m:
            cutoff = rank
    reject = [False] * m
    for i in order[:cutoff]:
        reject[i] = True
    return reject


def reject(p_values: Sequence[float], alpha: float, correction: Correction = "holm") -> list[bool]:
    """Which p-values are significant at alpha under the chosen correction."""
    if correction == "holm":
        return holm(p_values, alpha)
    if correction == "bh":
        return benjamini_hochberg(p_values, alpha)
    return [p <= alpha for p in p_values]
