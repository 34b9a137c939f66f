"""Click parameter types the command modules share, so a bad value is a usage error (exit 2) naming its option."""

from __future__ import annotations

import math
from typing import Any

import click


class FiniteFloat(click.FloatRange):
    """A float in a range that is also finite: click's FloatRange compares, and `nan` compares false with every
    bound, so `nan` and (unbounded) `inf` passed it and failed later as a refusal, a traceback or a wait of `nan s`."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


PERCENT = FiniteFloat(0, 100)  # a canary's share of traffic
WEEK_S = 7 * 86400.0
# Seconds to wait: above 0, and at most a week (a larger one overflows socket and timer arithmetic).
TIMEOUT = FiniteFloat(min=0, min_open=True, max=WEEK_S)
TIME = FiniteFloat()  # a Unix time (e.g. --started-at)
