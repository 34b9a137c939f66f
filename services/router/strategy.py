"""A deployment's own rollout strategy (steps, interval, analysis) and its analysis status. Pure, no I/O."""

from __future__ import annotations

from typing import Annotated

import msgspec

from lockgate.services.router.analysis import AnalysisSpec, Measurement

Percent = Annotated[float, msgspec.Meta(gt=0, le=100)]


class Strategy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Canary steps for one deployment; without it the router's configured steps and interval apply.

    With `analysis`, a step advances only after its analysis succeeds (`count` times); a failing
    analysis aborts the canary, and too many inconclusive ones pause it for an operator.
    """

    steps: Annotated[list[Percent], msgspec.Meta(min_length=1, max_length=20)] | None = None
    interval_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] | None = None  # between steps / analysis looks
    analysis: AnalysisSpec | None = None


class AnalysisStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Where a rollout's analysis stands; kept in the route so every replica counts the same looks."""

    look: int = 0  # looks with enough data in this rollout (sets each look's confidence level)
    successes: int = 0  # successful measurements in the current step
    failures: int = 0
    inconclusives: int = 0
    last: Measurement | None = None
    at: float = 0.0
