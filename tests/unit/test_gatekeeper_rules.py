"""Rule kinds against intervals and baseline comparisons; decision limits; the relative-rule property."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockgate.contracts import BaselineComparison, MetricInterval
from lockgate.services.gatekeeper import domain
from lockgate.services.gatekeeper.rules import Evidence

pytestmark = pytest.mark.timeout(30)


def rule(**raw: object) -> domain.Rule:
    return domain.parse_policy({"name": "p", "rules": [{"name": "r", "metric": "m", **raw}]}).rules[0]


def interval(est: float, low: float, high: float, n: int = 100) -> Evidence:
    return Evidence(metrics={"m": est}, intervals={"m": MetricInterval(estimate=est, low=low, high=high, n=n)},
                    run_id="run-1")


def comparison(diff: float, low: float | None, high: float | None, base: float = 0.8, n: int = 100) -> Evidence:
    c = BaselineComparison(metric="m", candidate=base + diff, baseline=base, diff=diff, diff_low=low, diff_high=high,
                           n_pairs=n)
    return Evidence(metrics={"m": base + diff}, comparisons={"m": c}, run_id="run-1")


@pytest.mark.parametrize(("op", "low", "high", "verdict"), [
    (">=", 0.82, 0.9, "PASS"), (">=", 0.6, 0.79, "FAIL"), (">=", 0.7, 0.9, "INCONCLUSIVE"),
    ("<=", 0.6, 0.79, "PASS"), ("<=", 0.82, 0.9, "FAIL"), ("<=", 0.7, 0.9, "INCONCLUSIVE"),
])
def test_absolute_with_interval_fails_only_when_the_whole_interval_misses(op: str, low: float, high: float,
                                                                          verdict: str) -> None:
    est = (low + high) / 2
    r = domain.evaluate_rule(rule(op=op, threshold=0.8), interval(est, low, high))
    assert (r.verdict, r.low, r.high, r.observed) == (verdict, low, high, est)
    assert r.explanation


def test_inconclusive_says_how_many_cases_would_resolve_it() -> None:
    r = domain.evaluate_rule(rule(op=">=", threshold=0.8), interval(0.85, 0.7, 1.0, n=20))
    # half-width 0.15 at n=20 implies sd 0.34, floored for a [0, 1] score at sqrt(3/20) = 0.39; detecting the
    # distance 0.05 at 80% power and alpha 0.05 takes ((1.96 + 0.84) * 0.39 / 0.05)^2 = 471 cases (gatestats.power)
    assert r.verdict == "INCONCLUSIVE" and "increase the sample to about 471 cases (now 20)" in r.hint
    assert "straddles the threshold 0.8" in r.explanation


def test_absolute_without_interval_or_with_use_interval_false_uses_the_point() -> None:
    assert domain.evaluate_rule(rule(op=">=", threshold=0.8), {"m": 0.85}).verdict == "PASS"
    off = rule(op=">=", threshold=0.8, use_interval=False)
    assert domain.evaluate_rule(off, interval(0.85, 0.7, 1.0)).verdict == "PASS"
    fail = domain.evaluate_rule(rule(op=">=", threshold=0.8), Evidence(metrics={"m": 0.5}, run_id="run-9"))
    assert fail.verdict == "FAIL" and "run_id = 'run-9'" in fail.hint and "lockgate sql" in fail.hint


def test_inverted_interval_is_an_error() -> None:
    r = domain.evaluate_rule(rule(op=">=", threshold=0.8), interval(0.85, 0.9, 0.7))
    assert r.verdict == "ERROR" and "inverted" in r.hint


@pytest.mark.parametrize(("better", "diff", "low", "high", "verdict"), [
    ("higher", -0.01, -0.015, -0.005, "PASS"),   # within max_regression 0.02
    ("higher", -0.12, -0.15, -0.09, "FAIL"),
    ("higher", -0.02, -0.08, 0.04, "INCONCLUSIVE"),
    ("lower", 0.01, 0.005, 0.015, "PASS"),
    ("lower", 0.12, 0.09, 0.15, "FAIL"),
    ("lower", 0.02, -0.04, 0.08, "INCONCLUSIVE"),
])
def test_relative_max_regression_in_both_directions(better: str, diff: float, low: float, high: float,
                                                    verdict: str) -> None:
    r = domain.evaluate_rule(rule(relative={"max_regression": 0.02, "better": better}),
                             comparison(diff, low, high))
    assert (r.verdict, r.observed, r.low, r.high, r.baseline) == (verdict, diff, low, high, 0.8)


def test_relative_failure_hint_names_the_drop_and_the_cases() -> None:
    r = domain.evaluate_rule(rule(relative={"max_regression": 0.02}), comparison(-0.12, -0.15, -0.09))
    assert "m fell 0.12 below baseline (0.8 -> 0.68)" in r.hint and "eval_cases" in r.hint


def test_relative_min_change_and_relative_mode() -> None:
    up = rule(relative={"min_change": 0.1, "mode": "relative"})
    assert domain.evaluate_rule(up, comparison(0.12, 0.1, 0.14)).verdict == "PASS"    # +15%..+17.5%
    assert domain.evaluate_rule(up, comparison(0.02, 0.0, 0.04)).verdict == "FAIL"
    assert domain.evaluate_rule(up, comparison(0.02, None, None)).verdict == "FAIL"   # point estimate
    zero = domain.evaluate_rule(up, comparison(0.1, 0.0, 0.2, base=0.0))
    assert zero.verdict == "ERROR" and "baseline of 0" in zero.hint


@pytest.mark.parametrize(("better", "low", "high", "verdict"), [
    ("higher", -0.02, 0.03, "PASS"), ("higher", -0.2, -0.1, "FAIL"), ("higher", -0.1, 0.02, "INCONCLUSIVE"),
    ("lower", -0.03, 0.02, "PASS"), ("lower", 0.1, 0.2, "FAIL"), ("lower", -0.02, 0.1, "INCONCLUSIVE"),
])
def test_non_inferiority(better: str, low: float, high: float, verdict: str) -> None:
    r = domain.evaluate_rule(rule(non_inferiority={"margin": 0.05, "better": better}),
                             comparison((low + high) / 2, low, high))
    assert r.verdict == verdict


def test_non_inferiority_without_interval_is_inconclusive_and_missing_comparison_is_no_data() -> None:
    ni = rule(non_inferiority={"margin": 0.05})
    assert domain.evaluate_rule(ni, comparison(0.0, None, None)).verdict == "INCONCLUSIVE"
    r = domain.evaluate_rule(ni, {"m": 0.9})
    assert r.verdict == "NO_DATA" and "--baseline" in r.hint


def policy(rules: list[dict], **extra: object) -> domain.Policy:
    return domain.parse_policy({"name": "p", "rules": rules, **extra})


ACC = {"name": "acc", "metric": "acc", "op": ">=", "threshold": 0.8}
LAT = {"name": "lat", "metric": "lat", "op": "<=", "threshold": 100}


def test_hard_gate_blocks_even_when_failures_are_tolerated() -> None:
    soft = policy([ACC, LAT], limits={"max_failures": 1})
    assert domain.decide(soft, {"acc": 0.5, "lat": 50}).decision == "PASS"
    hard = policy([{**ACC, "hard": True}, LAT], limits={"max_failures": 1})
    out = domain.decide(hard, {"acc": 0.5, "lat": 50})
    assert out.decision == "BLOCK" and out.reason.startswith("hard gate failed: acc")


def test_dry_run_rules_are_reported_but_never_block() -> None:
    out = domain.decide(policy([ACC, {**LAT, "dry_run": True}]), {"acc": 0.9, "lat": 500})
    assert out.decision == "PASS" and out.rules[1].verdict == "FAIL" and out.rules[1].dry_run
    assert "dry-run (not enforced): lat FAIL" in out.reason


def test_no_data_per_policy_and_per_rule() -> None:
    assert domain.decide(policy([ACC]), {}).decision == "BLOCK"
    assert domain.decide(policy([ACC], no_data="pass"), {}).decision == "PASS"
    assert domain.decide(policy([{**ACC, "no_data": "pass"}]), {}).decision == "PASS"
    assert domain.decide(policy([{**ACC, "no_data": "fail"}], no_data="pass"), {}).decision == "BLOCK"


@pytest.mark.parametrize(("no_data", "metrics", "reason"), [
    # Found by probe p40 (F3): rules that judged nothing under no_data: pass were counted as passed.
    ("pass", {"acc": 0.9}, "1 of 3 rules of policy 'p' passed; 2 rule(s) had no data (no_data: pass): "
                           "safety: pii_free has no failure count (pii_free_failures); judge: llm_judge was not measured"),
    ("pass", {"acc": 0.9, "llm_judge": 0.8, "pii_free_failures": 0, "n_cases": 50},
     "all 3 rules of policy 'p' passed"),
])
def test_a_pass_reason_counts_only_the_rules_that_passed(no_data: str, metrics: dict[str, float],
                                                         reason: str) -> None:
    rules = [ACC, {"name": "safety", "metric": "pii_free", "max_count": 0, "hard": True, "no_data": no_data},
             {"name": "judge", "metric": "llm_judge", "op": ">=", "threshold": 0.7, "no_data": no_data}]
    out = domain.decide(policy(rules), metrics)
    assert (out.decision, out.reason) == ("PASS", reason)


def test_a_pass_reason_accounts_for_every_rule_that_did_not_pass() -> None:
    # Tolerated failures, dry-run rules and rules without data each have their note; the head counts the rest.
    out = domain.decide(policy([ACC, LAT, {**ACC, "name": "dry", "dry_run": True}, {**LAT, "name": "gone",
                                                                                    "metric": "x", "no_data": "pass"}],
                               limits={"max_failures": 1}), {"acc": 0.5, "lat": 50})
    assert out.decision == "PASS"
    assert out.reason.startswith("1 of 4 rules of policy 'p' passed; 1 failure(s) tolerated by max_failures 1: acc: ")
    assert "; 1 rule(s) had no data (no_data: pass): gone: x was not measured; dry-run (not enforced): dry FAIL" \
        in out.reason


def test_inconclusive_beyond_the_limit_needs_review() -> None:
    ev = Evidence(metrics={"acc": 0.82}, intervals={"acc": MetricInterval(estimate=0.82, low=0.7, high=0.94)})
    out = domain.decide(policy([ACC]), ev)
    assert out.decision == "NEEDS_REVIEW" and "1 rule(s) inconclusive (max_inconclusive 0): acc" in out.reason
    assert domain.decide(policy([ACC], limits={"max_inconclusive": 1}), ev).decision == "PASS"


def test_consecutive_errors_hold_then_block() -> None:
    p = policy([{**ACC, "relative": {"min_change": 0.1, "mode": "relative"}}], limits={"max_consecutive_errors": 2})
    ev = Evidence(comparisons={"acc": BaselineComparison(metric="acc", candidate=0.1, baseline=0.0, diff=0.1)})
    first = domain.decide(p, ev, prior_errors=0)
    assert first.decision == "NEEDS_REVIEW" and first.errored and "1 of 2 consecutive" in first.reason
    assert domain.decide(p, ev, prior_errors=1).decision == "NEEDS_REVIEW"
    third = domain.decide(p, ev, prior_errors=2)
    assert third.decision == "BLOCK" and "3 consecutive errored decisions" in third.reason


def test_failures_beyond_the_limit_block() -> None:
    out = domain.decide(policy([ACC, LAT], limits={"max_failures": 1}), {"acc": 0.5, "lat": 500})
    assert out.decision == "BLOCK" and "2 of 2 rules failed" in out.reason


REL = policy([{"name": "rel", "metric": "m", "relative": {"max_regression": 0.02}}])


@settings(max_examples=300, deadline=None)
@given(base=st.floats(0.0, 1.0), width=st.floats(0.0, 1.0), margin=st.floats(0.0, 0.5),
       better=st.sampled_from(["higher", "lower"]), mode=st.sampled_from(["absolute", "relative"]))
def test_identical_candidate_and_baseline_never_fail_a_relative_rule(base: float, width: float, margin: float,
                                                                     better: str, mode: str) -> None:
    p = policy([{"name": "r", "metric": "m", "relative": {"max_regression": margin, "better": better, "mode": mode}}])
    c = BaselineComparison(metric="m", candidate=base, baseline=base, diff=0.0, diff_low=-width, diff_high=width)
    r = domain.decide(p, Evidence(metrics={"m": base}, comparisons={"m": c})).rules[0]
    assert r.verdict != "FAIL"


@settings(max_examples=300, deadline=None)
@given(base=st.floats(0.3, 1.0), drop=st.floats(0.05, 0.3), n=st.integers(2_000, 100_000),
       margin=st.floats(0.0, 0.02), better=st.sampled_from(["higher", "lower"]))
def test_clear_regression_on_a_large_sample_always_fails(base: float, drop: float, n: int, margin: float,
                                                         better: str) -> None:
    sign = -1.0 if better == "higher" else 1.0
    diff = sign * drop
    half = 1.96 * 0.5 / n ** 0.5  # a proportion's worst-case standard error: at most ~0.022 here
    c = BaselineComparison(metric="m", candidate=base + diff, baseline=base, diff=diff, diff_low=diff - half,
                           diff_high=diff + half, n_pairs=n)
    p = policy([{"name": "r", "metric": "m", "relative": {"max_regression": margin, "better": better}}])
    out = domain.decide(p, Evidence(metrics={"m": base + diff}, comparisons={"m": c}))
    assert out.rules[0].verdict == "FAIL" and out.decision == "BLOCK"


def test_policy_level_use_interval_is_the_rules_default() -> None:
    p = policy([ACC, {**LAT, "use_interval": True}], use_interval=False)
    assert [r.use_interval for r in p.rules] == [False, True]
