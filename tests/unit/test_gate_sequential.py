"""Always-valid confidence sequences for repeated looks (the rollout analysis calls `sequential.analyse`)."""

from __future__ import annotations

import math

import pytest

from lockgate.gatestats import sequential
from lockgate.gatestats.sequential import Look

pytestmark = pytest.mark.timeout(10)


def test_radius_is_the_normal_mixture_boundary() -> None:
    n, sd, alpha, planned = 400, 2.0, 0.05, 500
    rho = sd * sd * planned / (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1))
    v = n * sd * sd
    assert sequential.radius(n, sd, alpha=alpha, planned_n=planned) == pytest.approx(
        math.sqrt((v + rho) * math.log((v + rho) / (rho * alpha**2))) / n)


def test_the_sequence_is_wider_than_a_fixed_interval_and_shrinks() -> None:
    fixed = 1.959964 * 1.0 / math.sqrt(500)
    assert sequential.radius(500, 1.0) > fixed  # the price of looking any number of times
    widths = [sequential.radius(n, 1.0) for n in (25, 100, 400, 1600, 6400)]
    assert widths == sorted(widths, reverse=True) and sequential.radius(0, 1.0) == math.inf


def test_analyse_stops_at_the_first_decisive_look() -> None:
    looks = [Look(25, -0.1, 1.0), Look(100, -0.3, 1.0), Look(400, -0.3, 1.0), Look(800, -0.3, 1.0)]
    out = sequential.analyse(looks)
    assert out.verdict == "regressed" and out.look == 2 and out.high < 0
    assert sequential.analyse(looks[:1]).verdict == "continue"
    good = sequential.analyse([Look(2000, 0.2, 1.0)], margin=0.05)
    assert good.verdict == "safe" and good.low > -0.05
    lower = sequential.analyse([Look(400, 0.4, 1.0)], better="lower")  # latency rose: a regression
    assert lower.verdict == "regressed"


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        sequential.analyse([])
    with pytest.raises(ValueError):
        sequential.radius(10, 1.0, alpha=1.5)
