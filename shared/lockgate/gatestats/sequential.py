"""Always-valid inference for repeated looks (a canary checked every interval), pure and closed-form.

Two tools, one per kind of statistic:
- `analyse`/`radius`: a confidence sequence for means, valid at every look at once;
- `look_alpha`: an alpha-spending schedule for tests that only exist at a fixed level (Wilson bounds
  on error rates, order-statistic bounds on p95): look k gets alpha / (k (k + 1)), and these sum to
  alpha over any number of looks, so the chance of a false verdict over the whole rollout stays
  at most alpha by the union bound. The rollout analysis of the router calls it at every look.

A fixed-sample 95% interval checked at 20 looks excludes the truth at some look far more often than 5%
of the time. The normal-mixture confidence sequence (Robbins; Howard, Ramdas, McAuliffe & Sekhon,
"Time-uniform, nonparametric, nonasymptotic confidence sequences", 2021) holds at every look at once:
with probability at least 1 - alpha the true mean lies in every interval of the sequence, however
many looks are taken and whenever the analysis stops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


def look_alpha(alpha: float, look: int, tests: int = 1) -> float:
    """One-sided level of one of `tests` simultaneous tests at look `look` (1-based): alpha / (k (k + 1)),
    shared equally by the tests (Bonferroni), so all looks and tests together spend at most alpha."""
    if not 0 < alpha < 1:
        raise ValueError(f"need 0 < alpha < 1, got {alpha}")
    k = max(1, look)
    return alpha / (k * (k + 1)) / max(1, tests)


def _rho(sd: float, planned_n: int, alpha: float) -> float:
    """Mixture variance that makes the sequence tightest around `planned_n` observations."""
    log_term = -2 * math.log(alpha)
    return sd * sd * planned_n / (log_term + math.log(log_term + 1))


def radius(n: int, sd: float, *, alpha: float = 0.05, planned_n: int = 500) -> float:
    """Half-width of the two-sided always-valid interval for a mean after n observations of spread sd."""
    if n < 1:
        return math.inf
    if not 0 < alpha < 1 or sd < 0 or planned_n < 1:
        raise ValueError(f"need 0 < alpha < 1, sd >= 0 and planned_n >= 1, got {alpha}, {sd}, {planned_n}")
    if sd == 0:
        return 0.0
    v = n * sd * sd
    rho = _rho(sd, planned_n, alpha)
    return math.sqrt((v + rho) * math.log((v + rho) / (rho * alpha * alpha))) / n


@dataclass(frozen=True)
class Look:
    """What one look saw so far (cumulative): observations, the mean (e.g. of canary-minus-baseline
    differences) and the per-observation standard deviation."""

    n: int
    mean: float
    sd: float


@dataclass(frozen=True)
class SequentialResult:
    """The verdict after the looks so far: `regressed` (abort), `safe` (within the margin), or `continue`."""

    verdict: Literal["regressed", "safe", "continue"]
    look: int  # index of the look that decided (the last look for `continue`)
    low: float
    high: float


def analyse(looks: Sequence[Look], *, margin: float = 0.0, better: Literal["higher", "lower"] = "higher",
            alpha: float = 0.05, planned_n: int = 500) -> SequentialResult:
    """Walk the looks in order and stop at the first whose always-valid interval settles the question.

    `regressed`: the whole interval is worse than -margin (higher is better) or +margin (lower is better);
    `safe`: the whole interval is better than that limit. The chance of a false `regressed` over any number
    of looks is at most alpha.
    """
    if not looks:
        raise ValueError("no looks to analyse")
    sign = 1.0 if better == "higher" else -1.0
    low = high = math.nan
    for i, look in enumerate(looks):
        r = radius(look.n, look.sd, alpha=alpha, planned_n=planned_n)
        low, high = look.mean - r, look.mean + r
        worst, best = sorted((sign * low, sign * high))
        if best < -margin:
            return SequentialResult("regressed", i, low, high)
        if worst > -margin:
            return SequentialResult("safe", i, low, high)
    return SequentialResult("continue", len(looks) - 1, low, high)
