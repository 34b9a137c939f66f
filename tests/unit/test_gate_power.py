"""One power computation: the evaluator's sample-size warning and the gate's hint and sensitivity agree."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lockgate.contracts import EvalCompleted
from lockgate.gatestats import power
from lockgate.services.evaluator import domain as eval_domain
from lockgate.services.evaluator import stats, summary
from lockgate.services.evaluator.domain import CaseResult
from lockgate.services.gatekeeper import domain

pytestmark = pytest.mark.timeout(30)


def suite(margin: float = 0.05) -> eval_domain.Suite:
    return eval_domain.parse_suite({"name": "s", "prompt": {"template": "{input}"}, "margin": margin,
                                    "dataset": [{"input": "q", "expected": "a"}],
                                    "scorers": [{"name": "token_f1", "threshold": 0.5}]})


def rows(scores: list[float]) -> list[CaseResult]:
    return [CaseResult(case_id=f"c{i}", repeat=0, input="q", expected="a", scores={"token_f1": float(s)},
                       latency_ms=10.0) for i, s in enumerate(scores)]


def advice(cand: list[float], base: list[float], metric: str, margin: float = 0.05
           ) -> tuple[tuple[float, int], tuple[float, int | None], domain.Outcome]:
    """(mde, n) from the evaluator's warning and from the gate's explanation and hint for one comparison."""
    s = suite(margin)
    comps, warnings = summary.compare(s, rows(cand), rows(base))
    done = EvalCompleted(run_id="r", release="r", suite="s", metrics=eval_domain.aggregate(s, rows(cand)),
                         comparisons=comps, warnings=warnings)
    policy = domain.parse_policy({"name": "p", "rules": [{"metric": metric, "relative": {"max_regression": margin}}]})
    out = domain.decide_eval(policy, "", done)
    warned = next(w for w in warnings if w.startswith(f"{metric}: "))
    ev = re.search(r"detect a change of ([\d.e-]+) .* about (\d+) cases", warned)
    gate_mde = re.search(r"detect a true change of ([\d.e-]+) at 80% power", out.rules[0].explanation)
    gate_n = re.search(r"about (\d+) cases", out.rules[0].hint)
    assert ev and gate_mde, (warned, out.rules[0].explanation)
    return ((float(ev.group(1)), int(ev.group(2))),
            (float(gate_mde.group(1)), int(gate_n.group(1)) if gate_n else None), out)


def test_warning_and_hint_agree_on_a_continuous_score() -> None:
    # Why: the warning and the hint differed by tens of percent for one comparison (the hint had no power term).
    rng = np.random.default_rng(3)
    base = np.clip(rng.normal(0.7, 0.2, 40), 0, 1)
    cand = np.clip(base + rng.normal(-0.01, 0.15, 40), 0, 1)
    (e_mde, e_n), (g_mde, g_n), out = advice(list(cand), list(base), "token_f1")
    assert out.rules[0].verdict == "INCONCLUSIVE"
    assert g_mde == pytest.approx(e_mde, rel=0.01) and g_n == pytest.approx(e_n, rel=0.01)


def test_warning_and_hint_agree_with_no_observed_spread() -> None:
    # Why: for identical pass/fail runs they differed by a factor of ten (only the warning floored the spread).
    same = [1.0] * 30 + [0.0] * 10
    (e_mde, _), (g_mde, _), out = advice(same, same, "token_f1_pass_rate")
    # The gate reads the spread back from the reported interval, here the bounded one (no spread observed): within
    # that interval's error of the warning's floor, never a factor of ten.
    assert g_mde == pytest.approx(e_mde, rel=0.1)
    assert "40 cases detect a true change of" in out.rules[0].explanation


def test_warning_and_hint_agree_on_pass_rates_within_the_interval_error() -> None:
    rng = np.random.default_rng(5)
    base = (rng.random(60) < 0.7).astype(float)
    cand = base.copy()
    flip = rng.choice(60, 12, replace=False)
    cand[flip] = 1 - cand[flip]
    (e_mde, e_n), (g_mde, g_n), _ = advice(list(cand), list(base), "token_f1_pass_rate")
    # The gate reads the spread back from the reported bootstrap interval: equal up to its Monte Carlo error.
    assert g_mde == pytest.approx(e_mde, rel=0.1)
    if g_n is not None:
        assert g_n == pytest.approx(e_n, rel=0.2)


def test_the_evaluator_and_the_gate_use_one_formula() -> None:
    assert stats.required_n(0.05, 0.3) == power.required_n(0.05, 0.3) == 283
    assert stats.min_detectable_effect(100, 0.3) == pytest.approx(power.z_sum() * 0.03)
    assert power.sd_from_interval(-0.0588, 0.0588, 100) == pytest.approx(0.3, rel=1e-3)


def test_every_interval_backed_rule_states_its_sensitivity() -> None:
    from lockgate.contracts import MetricInterval
    ev = domain.Evidence(metrics={"m": 0.9}, intervals={"m": MetricInterval(estimate=0.9, low=0.85, high=0.95, n=100)})
    for threshold in (0.8, 0.9, 0.99):  # PASS, INCONCLUSIVE, FAIL
        rule = domain.parse_policy({"name": "p", "rules": [{"metric": "m", "op": ">=", "threshold": threshold}]})
        assert "100 cases detect a true change of" in domain.evaluate_rule(rule.rules[0], ev).explanation
