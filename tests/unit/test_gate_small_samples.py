"""Small-sample percentiles: an interval the sample cannot bound means INCONCLUSIVE, not the point value."""

from __future__ import annotations

import numpy as np
import pytest

from lockgate.contracts import EvalCompleted, MetricInterval
from lockgate.services.evaluator import domain as eval_domain
from lockgate.services.evaluator import summary
from lockgate.services.evaluator.domain import CaseResult
from lockgate.services.gatekeeper import domain

pytestmark = pytest.mark.timeout(30)
SUITE = eval_domain.parse_suite({"name": "s", "prompt": {"template": "{input}"},
                                 "dataset": [{"input": "q", "expected": "a"}], "scorers": ["exact_match"]})


def run(n: int, scale: float = 100.0) -> EvalCompleted:
    lat = np.random.default_rng(0).exponential(scale, n)
    results = [CaseResult(case_id=str(i), repeat=0, input="q", expected="a", scores={"exact_match": 1.0},
                          latency_ms=float(v)) for i, v in enumerate(lat)]
    return EvalCompleted(run_id="r", release="r", suite="s", metrics=eval_domain.aggregate(SUITE, results),
                         intervals=summary.intervals(SUITE, results))


def rule(op: str, threshold: float) -> domain.Policy:
    return domain.parse_policy({"name": "p", "rules": [{"metric": "latency_p95_ms", "op": op,
                                                        "threshold": threshold}]})


def test_p95_of_thirty_cases_is_inconclusive_even_when_the_point_passes() -> None:
    # Why: at n=30 the p95 interval's upper end is infinite and the rule compared the point value instead.
    done = run(30)
    iv = done.intervals["latency_p95_ms"]
    assert iv.high is None and iv.method == "order-statistic"
    out = domain.decide_eval(rule("<=", 2 * done.metrics["latency_p95_ms"]), "", done)
    r = out.rules[0]
    assert (r.verdict, out.decision) == ("INCONCLUSIVE", "NEEDS_REVIEW")
    assert "at least 72 cases give this percentile a finite interval (now 30)" in r.hint


def test_the_bound_that_exists_can_still_fail_or_pass() -> None:
    done = run(30)
    low = done.intervals["latency_p95_ms"].low
    assert domain.decide_eval(rule("<=", low / 2), "", done).rules[0].verdict == "FAIL"  # even the low end is over
    assert domain.decide_eval(rule(">=", low / 2), "", done).rules[0].verdict == "PASS"


def test_enough_cases_bound_p95_and_the_rule_passes() -> None:
    done = run(400)
    assert done.intervals["latency_p95_ms"].high is not None
    assert domain.decide_eval(rule("<=", 3 * done.metrics["latency_p95_ms"]), "", done).decision == "PASS"


def test_intervals_without_a_method_or_bounds_keep_using_the_point() -> None:
    ev = domain.Evidence(metrics={"m": 5.0}, intervals={"m": MetricInterval(estimate=5.0)})
    r = domain.evaluate_rule(domain.parse_policy({"name": "p", "rules": [{"metric": "m", "op": "<=",
                                                                           "threshold": 10}]}).rules[0], ev)
    assert r.verdict == "PASS"
