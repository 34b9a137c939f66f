"""Rare harms: zero-tolerance thresholds, `max_count`, exact `max_rate` bounds, and no "more cases" once broken."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from lockgate.contracts import EvalCompleted, MetricInterval
from lockgate.gatestats import rates
from lockgate.services.evaluator import domain as eval_domain
from lockgate.services.evaluator import summary
from lockgate.services.evaluator.domain import CaseResult
from lockgate.services.gatekeeper import domain

pytestmark = pytest.mark.timeout(30)

SUITE = eval_domain.parse_suite({"name": "s", "prompt": {"template": "{input}"},
                                 "dataset": [{"input": "q", "expected": "a"}], "scorers": ["pii_free"]})


def run_with_leaks(leaks: int, n: int = 1000) -> EvalCompleted:
    """An evaluated run of n answered cases of which `leaks` leaked PII (metrics and intervals as the evaluator makes them)."""
    results = [CaseResult(case_id=str(i), repeat=0, input="q", expected="a", scores={"pii_free": float(i >= leaks)},
                          latency_ms=10.0) for i in range(n)]
    return EvalCompleted(run_id="run-1", release="r", suite="sha256:" + "0" * 64, n_cases=n,
                         metrics=eval_domain.aggregate(SUITE, results), intervals=summary.intervals(SUITE, results))


def policy(*rules: dict) -> domain.Policy:
    return domain.parse_policy({"name": "p", "rules": list(rules)})


def test_hard_zero_pii_rule_with_two_leaks_in_a_thousand_blocks() -> None:
    # Why: the interval of the mean touches 1.0, so this was INCONCLUSIVE -> NEEDS_REVIEW (approvable), with a
    # hint to "increase the sample" for a rule already broken.
    done = run_with_leaks(2)
    assert done.intervals["pii_free"].high == 1.0  # the interval does touch the threshold
    out = domain.decide_eval(policy({"metric": "pii_free", "op": ">=", "threshold": 1.0, "hard": True}), "", done)
    (r,) = out.rules
    assert (out.decision, r.verdict) == ("BLOCK", "FAIL")
    assert "increase the sample" not in r.hint and "lockgate sql" in r.hint
    assert "hard gate failed" in out.reason


def test_zero_tolerance_rule_without_leaks_passes() -> None:
    out = domain.decide_eval(policy({"metric": "pii_free", "op": ">=", "threshold": 1.0, "hard": True}), "",
                             run_with_leaks(0))
    assert out.decision == "PASS"


def test_error_rate_at_most_zero_fails_on_one_error_even_if_the_interval_reaches_zero() -> None:
    ev = domain.Evidence(metrics={"error_rate": 0.001}, intervals={"error_rate": MetricInterval(
        estimate=0.001, low=0.0, high=0.003, n=1000)})
    r = domain.evaluate_rule(policy({"metric": "error_rate", "op": "<=", "threshold": 0}).rules[0], ev)
    assert r.verdict == "FAIL"


@pytest.mark.parametrize(("leaks", "verdict", "decision"), [(0, "PASS", "PASS"), (1, "FAIL", "BLOCK"),
                                                            (2, "FAIL", "BLOCK")])
def test_max_count_zero_fails_on_any_occurrence(leaks: int, verdict: str, decision: str) -> None:
    out = domain.decide_eval(policy({"metric": "pii_free", "max_count": 0, "hard": True}), "", run_with_leaks(leaks))
    (r,) = out.rules
    assert (r.verdict, out.decision, r.observed, r.threshold, r.rule) == (
        verdict, decision, float(leaks), 0.0, "pii_free failures <= 0")
    assert "increase the sample" not in r.hint and "more cases" not in r.hint


def test_max_count_tolerates_up_to_its_limit() -> None:
    rule = policy({"metric": "pii_free", "max_count": 2}).rules[0]
    assert domain.evaluate_rule(rule, run_with_leaks(2).metrics).verdict == "PASS"
    assert domain.evaluate_rule(rule, run_with_leaks(3).metrics).verdict == "FAIL"


def test_count_rules_without_counts_are_no_data() -> None:
    r = domain.evaluate_rule(policy({"metric": "pii_free", "max_count": 0}).rules[0], {"pii_free": 1.0})
    assert r.verdict == "NO_DATA" and "pii_free_failures" in r.hint


@pytest.mark.parametrize(("leaks", "n", "verdict", "hint"), [
    (0, 3000, "PASS", "at most 0.001 with 95% confidence"),
    (0, 1000, "INCONCLUSIVE", "about 2995 cases at this failure rate would show it (now 1000)"),
    (1, 2000, "INCONCLUSIVE", "cases at this failure rate would show it"),
    (2, 1000, "INCONCLUSIVE", "more cases will not clear it"),  # observed 0.2% > 0.1%: never "more cases"
    (10, 1000, "FAIL", "above 0.001 with 95% confidence"),
])
def test_max_rate_uses_the_exact_clopper_pearson_bounds(leaks: int, n: int, verdict: str, hint: str) -> None:
    rule = policy({"metric": "pii_free", "max_rate": 0.001, "confidence": 0.95}).rules[0]
    r = domain.evaluate_rule(rule, run_with_leaks(leaks, n).metrics)
    assert (r.verdict, r.observed, r.threshold) == (verdict, leaks / n, 0.001)
    assert hint in r.hint
    assert r.high == pytest.approx(rates.upper_bound(leaks, n, 0.95))


def test_rule_of_three_for_zero_events() -> None:
    # 0 events in n: the exact one-sided bound is 1 - (1 - c)^(1/n), about 3/n at 95%.
    assert rates.upper_bound(0, 3000) == pytest.approx(1 - 0.05 ** (1 / 3000))
    assert rates.trials_for(0.001) == 2995
    assert rates.trials_for(0.001, observed_rate=0.002) is None


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), frac=st.floats(0, 1), conf=st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_clopper_pearson_bounds_match_their_binomial_definition(n: int, frac: float, conf: float) -> None:
    k = round(frac * n)
    hi, lo = rates.upper_bound(k, n, conf), rates.lower_bound(k, n, conf)
    assert 0 <= lo <= k / n <= hi <= 1
    if k < n:  # at the upper bound, seeing k or fewer has probability exactly 1 - conf
        assert sps.binom.cdf(k, n, hi) == pytest.approx(1 - conf, rel=1e-6, abs=1e-12)
    if k > 0:  # at the lower bound, seeing k or more has probability exactly 1 - conf
        assert sps.binom.sf(k - 1, n, lo) == pytest.approx(1 - conf, rel=1e-6, abs=1e-12)


def test_trials_for_a_nonzero_rate_reaches_the_bound() -> None:
    need = rates.trials_for(0.01, 0.95, observed_rate=0.002)
    assert need is not None and rates.upper_bound(math.floor(0.002 * need), need) <= 0.01


def test_an_inconclusive_rule_whose_estimate_already_misses_never_asks_for_more_cases() -> None:
    rule = policy({"metric": "m", "op": ">=", "threshold": 0.8}).rules[0]
    iv = MetricInterval(estimate=0.78, low=0.7, high=0.86, n=100)
    r = domain.evaluate_rule(rule, domain.Evidence(metrics={"m": 0.78}, intervals={"m": iv}))
    assert r.verdict == "INCONCLUSIVE" and "increase the sample" not in r.hint and "will not clear it" in r.hint
