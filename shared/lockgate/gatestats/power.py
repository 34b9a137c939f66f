"""One power computation for the evaluator's sample-size warning and the gate's hints, so they agree.

A test at level alpha with power `power` detects a true difference of (z_alpha + z_power) * sd / sqrt(n)
(normal approximation; two-sided by default). Both sides estimate sd the same way: from the paired
differences (evaluator) or back from the interval the evaluator reported (gate), with one floor for
scores in [0, 1] that showed no spread.
"""

from __future__ import annotations

import math

from scipy import special

ALPHA = 0.05
POWER = 0.8


def z_sum(alpha: float = ALPHA, power: float = POWER, two_sided: bool = True) -> float:
    """z_(1-alpha/2) + z_power (or z_(1-alpha) one-sided)."""
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must be between 0 and 1, got {alpha} and {power}")
    z_alpha = special.ndtri(1 - alpha / 2) if two_sided else special.ndtri(1 - alpha)
    return float(z_alpha + special.ndtri(power))


def min_detectable_effect(n: int, sd: float, *, alpha: float = ALPHA, power: float = POWER,
                          two_sided: bool = True) -> float:
    """Smallest true difference n cases detect with this alpha and power (inf for n < 1)."""
    if n < 1:
        return math.inf
    return z_sum(alpha, power, two_sided) * sd / math.sqrt(n)


def required_n(margin: float, sd: float, *, alpha: float = ALPHA, power: float = POWER,
               two_sided: bool = True) -> int:
    """Cases needed to detect a true difference of `margin` (at least 2)."""
    if margin <= 0:
        raise ValueError(f"the margin must be positive, got {margin}")
    return max(2, math.ceil(round((z_sum(alpha, power, two_sided) * sd / margin) ** 2, 6)))


def bounded_sd(sd: float, n: int) -> float:
    """For scores in [0, 1]: no disagreement seen in n cases still leaves a rate up to 3/n plausible (rule of
    three), so a zero observed spread must not make a small sample look sensitive."""
    return max(sd, math.sqrt(min(1.0, 3.0 / max(n, 1))))


def sd_from_interval(low: float, high: float, n: int, confidence: float = 1 - ALPHA) -> float:
    """The per-case standard deviation a normal-approximation interval of a mean over n cases implies."""
    z = float(special.ndtri(1 - (1 - confidence) / 2))
    return (high - low) / (2 * z) * math.sqrt(max(n, 1))
