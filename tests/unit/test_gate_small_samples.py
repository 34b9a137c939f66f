"""Small-sample percentiles: an interval the sample cannot bound means INCONCLUSIVE, not the point value."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from lockgate.contracts import BaselineComparison, EvalCompleted, MetricInterval
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


# A sample with no spread (one case, or every case alike) is no certainty (probe p12, F2): before, the bootstrap
# reported [est, est] ("degenerate") and the gate read it as an interval of width 0.

def scored(values: list[float], scorer: str = "exact_match") -> EvalCompleted:
    s = eval_domain.parse_suite({"name": "s", "prompt": {"template": "{input}"},
                                 "dataset": [{"input": "q", "expected": "a"}], "scorers": [scorer]})
    results = [CaseResult(case_id=str(i), repeat=0, input="q", expected="a", scores={scorer: v}, latency_ms=10.0)
               for i, v in enumerate(values)]
    return EvalCompleted(run_id="r", release="r", suite="s", metrics=eval_domain.aggregate(s, results),
                         intervals=summary.intervals(s, results))


def absolute(metric: str, op: str, threshold: float) -> domain.Policy:
    return domain.parse_policy({"name": "p", "rules": [{"metric": metric, "op": op, "threshold": threshold}]})


def test_one_correct_case_does_not_pass_an_interval_backed_rule() -> None:
    done = scored([1.0])
    iv = done.intervals["exact_match"]
    assert iv.method == "bounded" and iv.low is not None and iv.low < 0.25 and iv.high == 1.0
    out = domain.decide_eval(absolute("exact_match", ">=", 0.9), "", done)
    (r,) = out.rules
    assert (out.decision, r.verdict) == ("NEEDS_REVIEW", "INCONCLUSIVE")
    assert "increase the sample to about 785 cases (now 1)" in r.hint  # as the same outcome's pass rate says


@pytest.mark.parametrize(("threshold", "verdict"), [(0.9, "INCONCLUSIVE"), (0.8, "PASS")])
def test_twenty_of_twenty_bound_the_mean_as_a_pass_rate_would(threshold: float, verdict: str) -> None:
    # Wilson for 20/20 is [0.84, 1]: `>= 0.9` cannot be shown, `>= 0.8` can.
    done = scored([1.0] * 20)
    assert domain.decide_eval(absolute("exact_match", ">=", threshold), "", done).rules[0].verdict == verdict


@pytest.mark.parametrize("values", [[1.0, 1.0, 0.99], [1.0] * 19 + [0.9]], ids=["three", "twenty"])
def test_a_small_sample_next_to_the_bound_is_not_read_as_narrow(values: list[float]) -> None:
    # Before: [0.99, 1] and [0.975, 1] (the bootstrap never leaves the observed values), so `>= 0.98` PASSed.
    done = scored(values, "token_f1")
    assert domain.decide_eval(absolute("token_f1", ">=", 0.9), "", done).rules[0].verdict == "INCONCLUSIVE"


def test_a_zero_width_degenerate_interval_from_an_older_evaluator_is_read_as_unbounded() -> None:
    ev = domain.Evidence(metrics={"exact_match": 1.0}, intervals={"exact_match": MetricInterval(
        estimate=1.0, low=1.0, high=1.0, method="degenerate", n=1)})
    r = domain.evaluate_rule(absolute("exact_match", ">=", 0.9).rules[0], ev)
    assert r.verdict == "INCONCLUSIVE" and (r.low, r.high) == (None, None)
    assert "1 case(s) that all scored alike cannot bound it" in r.hint and "about 785 cases" in r.hint
    missed = domain.evaluate_rule(absolute("exact_match", ">=", 0.9).rules[0], domain.Evidence(
        metrics={"exact_match": 0.5}, intervals={"exact_match": MetricInterval(
            estimate=0.5, low=0.5, high=0.5, method="degenerate", n=3)}))
    assert missed.verdict == "INCONCLUSIVE" and "more cases will not clear it" in missed.hint


def test_cost_with_no_spread_has_no_interval_and_is_inconclusive() -> None:
    done = EvalCompleted(run_id="r", release="r", suite="s", metrics={"cost_usd_per_case": 0.001},
                         intervals=summary.intervals(SUITE, [CaseResult(
                             case_id="0", repeat=0, input="q", expected="a", scores={"exact_match": 1.0},
                             latency_ms=1.0)], costs=[0.001]))
    iv = done.intervals["cost_usd_per_case"]
    assert (iv.low, iv.high, iv.method) == (None, None, "degenerate")
    r = domain.decide_eval(absolute("cost_usd_per_case", "<=", 0.01), "", done).rules[0]
    assert r.verdict == "INCONCLUSIVE" and "more cases, or cases that differ" in r.hint


@pytest.mark.parametrize(("values", "verdict"), [([1.0] * 5, "PASS"), ([1.0] * 4 + [0.0], "FAIL")])
def test_a_threshold_at_the_end_of_the_range_counts_the_cases_run(values: list[float], verdict: str) -> None:
    # `>= 1` tolerates no failing case: judged on this run's cases both ways, as max_count: 0 is.
    r = domain.decide_eval(absolute("exact_match", ">=", 1.0), "", scored(values)).rules[0]
    assert r.verdict == verdict
    if verdict == "PASS":
        assert "on all 5 cases" in r.hint and "pin the suite" in r.explanation


def compared(cand: list[float], base: list[float]) -> EvalCompleted:
    s = eval_domain.parse_suite({"name": "s", "prompt": {"template": "{input}"},
                                 "dataset": [{"input": "q", "expected": "a"}], "scorers": ["exact_match"]})

    def rows(values: list[float]) -> list[CaseResult]:
        return [CaseResult(case_id=str(i), repeat=0, input="q", expected="a", scores={"exact_match": v},
                           latency_ms=10.0) for i, v in enumerate(values)]

    comps, warnings = summary.compare(s, rows(cand), rows(base))
    return EvalCompleted(run_id="r", release="r", suite="s", metrics=eval_domain.aggregate(s, rows(cand)),
                         comparisons=comps, warnings=warnings, baseline="b")


@pytest.mark.parametrize("rule", [{"relative": {"max_regression": 0.02}},
                                  {"non_inferiority": {"margin": 0.05}}], ids=["relative", "non_inferiority"])
def test_one_shared_case_does_not_show_a_change_within_the_margin(rule: dict) -> None:
    # Before: paired_bootstrap gave [0, 0] for one shared pair, and both rules PASSed "within the margin".
    done = compared([1.0], [1.0])
    comp = done.comparisons["exact_match"]
    assert comp.diff_low is not None and comp.diff_low < -0.5 and comp.diff_high > 0.5  # type: ignore[operator]
    policy = domain.parse_policy({"name": "p", "rules": [{"metric": "exact_match", **rule}]})
    out = domain.decide_eval(policy, "", done)
    assert (out.decision, out.rules[0].verdict) == ("NEEDS_REVIEW", "INCONCLUSIVE")


@pytest.mark.parametrize(("rule", "by_points"), [({"relative": {"max_regression": 0.02}}, "PASS"),
                                               ({"non_inferiority": {"margin": 0.05}}, "INCONCLUSIVE")],
                         ids=["relative", "non_inferiority"])
def test_a_zero_width_change_from_an_older_evaluator_is_inconclusive(rule: dict, by_points: str) -> None:
    comp = BaselineComparison(metric="m", candidate=1.0, baseline=1.0, diff=0.0, diff_low=0.0, diff_high=0.0,
                              test="paired-bootstrap", n_pairs=1)
    r = domain.evaluate_rule(domain.parse_policy({"name": "p", "rules": [{"metric": "m", **rule}]}).rules[0],
                             domain.Evidence(metrics={"m": 1.0}, comparisons={"m": comp}))
    assert r.verdict == "INCONCLUSIVE" and "1 shared case(s) all moved alike" in r.hint
    assert "increase the sample to about" in r.hint
    # Two runs' values compared without any interval are judged as documented: relative by the points,
    # non-inferiority never without an interval.
    point = msgspec.structs.replace(comp, diff_low=None, diff_high=None, test="point-values", n_pairs=0)
    assert domain.evaluate_rule(domain.parse_policy({"name": "p", "rules": [{"metric": "m", **rule}]}).rules[0],
                                domain.Evidence(metrics={"m": 1.0}, comparisons={"m": point})).verdict == by_points
