"""Relative rules on every metric: latency percentiles and cost per case (bootstrap by case), point fallback."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lockgate.contracts import EvalCompleted
from lockgate.services.evaluator import domain as eval_domain
from lockgate.services.evaluator import stats, summary
from lockgate.services.evaluator.domain import CaseResult
from lockgate.services.gatekeeper import domain

pytestmark = pytest.mark.timeout(30)
SUITE = eval_domain.parse_suite({"name": "s", "prompt": {"template": "{input}"},
                                 "dataset": [{"input": "q", "expected": "a"}], "scorers": ["exact_match"]})
N = 300


def run(latency_scale: float = 1.0, tokens: int = 100, seed: int = 0) -> list[CaseResult]:
    # Per-case base latency (the case's difficulty) times noise: shared by both runs, as in a real comparison.
    base = np.random.default_rng(7).lognormal(5, 0.4, N)
    noise = np.random.default_rng(seed).lognormal(0, 0.1, N)
    # Answers vary in length from run to run: cases that all cost alike would leave no spread, so no interval.
    extra = np.random.default_rng(seed).integers(-5, 6, N)
    return [CaseResult(case_id=f"c{i}", repeat=0, input="q", expected="a", scores={"exact_match": 1.0,
                       "llm_judge_agreement": 0.9 if seed else 1.0},
                       latency_ms=float(base[i] * noise[i] * latency_scale), input_tokens=tokens,
                       output_tokens=tokens + int(extra[i]))
            for i in range(N)]


def price(r: CaseResult) -> float:
    return (r.input_tokens + r.output_tokens) * 1e-6


def completed(candidate: list[CaseResult], baseline: list[CaseResult]) -> EvalCompleted:
    costs = [price(r) for r in candidate]
    comps, warnings = summary.compare(SUITE, candidate, baseline, price)
    return EvalCompleted(run_id="run-1", release="r", suite="sha256:" + "0" * 64, n_cases=len(candidate),
                         metrics=eval_domain.aggregate(SUITE, candidate, costs),
                         ratios=summary.ratios(candidate, baseline, price),
                         intervals=summary.intervals(SUITE, candidate, costs), comparisons=comps, warnings=warnings,
                         baseline="base")


def policy(metric: str, **relative: object) -> domain.Policy:
    return domain.parse_policy({"name": "p", "rules": [
        {"metric": metric, "relative": {"max_regression": 0.1, "mode": "relative", "better": "lower", **relative}}]})


@pytest.mark.parametrize(("scale", "decision"), [(1.0, "PASS"), (1.5, "BLOCK")])
def test_relative_p95_latency_rule_is_judged_against_the_baseline(scale: float, decision: str) -> None:
    # Why: a relative rule on p95 latency came out NO_DATA ("run the eval with a baseline") although one was given.
    done = completed(run(scale, seed=1), run(seed=2))
    comp = done.comparisons["latency_p95_ms"]
    assert comp.test == "paired-cluster-bootstrap" and comp.n_pairs == N
    ratio = done.ratios["latency_p95_ms"]
    assert ratio.low < ratio.estimate < ratio.high and ratio.estimate == pytest.approx(comp.diff / comp.baseline)
    out = domain.decide_eval(policy("latency_p95_ms"), "", done)
    assert out.decision == decision, out.reason
    assert out.rules[0].verdict != "NO_DATA"


@pytest.mark.parametrize(("tokens", "decision"), [(100, "PASS"), (150, "BLOCK")])
def test_relative_cost_per_case_rule(tokens: int, decision: str) -> None:
    done = completed(run(tokens=tokens, seed=1), run(seed=2))
    assert done.comparisons["cost_usd_per_case"].diff == pytest.approx((tokens - 100) * 2e-6, abs=1e-6)
    assert domain.decide_eval(policy("cost_usd_per_case"), "", done).decision == decision


def test_a_cost_change_with_no_spread_is_inconclusive_not_judged_by_its_point() -> None:
    # Why: every case moved by the same amount, so the bootstrap's interval was [diff, diff] and the rule PASSed.
    flat = [dataclasses.replace(r, output_tokens=100) for r in run(seed=1)]
    done = completed(flat, [dataclasses.replace(r, output_tokens=100) for r in run(seed=2)])
    comp = done.comparisons["cost_usd_per_case"]
    assert comp.diff == 0.0 and comp.diff_low is None and comp.diff_high is None
    r = domain.decide_eval(policy("cost_usd_per_case"), "", done).rules[0]
    assert r.verdict == "INCONCLUSIVE" and "all moved alike, so the change has no interval" in r.hint


def test_metrics_without_a_paired_test_fall_back_to_the_two_runs_values() -> None:
    done = completed(run(seed=1), run(seed=0))  # agreement 0.9 vs 1.0
    comp = done.comparisons["llm_judge_agreement"]
    assert (comp.test, comp.diff_low, comp.diff) == ("point-values", None, pytest.approx(-0.1))
    out = domain.decide_eval(policy("llm_judge_agreement", better="higher"), "", done)
    assert out.rules[0].verdict == "PASS" and "point estimate used" in out.rules[0].explanation
    assert not any("point-values" in w or "no paired interval" in w for w in done.warnings)


def test_a_metric_missing_from_a_given_baseline_comparison_does_not_ask_for_a_baseline() -> None:
    done = completed(run(seed=1), run(seed=2))
    r = domain.decide_eval(policy("latency_p99_ms"), "", done).rules[0]
    assert r.verdict == "NO_DATA" and "run the eval with a baseline" not in r.hint and "it compared" in r.hint


def test_the_ratio_interval_covers_the_true_ratio() -> None:
    rng = np.random.default_rng(5)
    base = [[float(x)] for x in rng.exponential(100, 400)]
    cand = [[v[0] * 1.2] for v in base]  # exactly 20% slower on every case
    d = stats.paired_cluster_difference(cand, base, 95)
    assert d.relative is not None and d.relative.low <= 0.2 + 1e-9 <= d.relative.high + 1e-9
    assert d.candidate == pytest.approx(1.2 * d.baseline)
