"""Measurement reliability: a failed scorer is missing (not 0); broken measurements need review; judge cache keys."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lockgate.contracts import EvalCompleted, EvalRequested
from lockgate.endpoints import Access
from lockgate.services.evaluator import domain as eval_domain
from lockgate.services.evaluator import judge, summary
from lockgate.services.evaluator.cache import Cached
from lockgate.services.evaluator.domain import CaseResult
from lockgate.services.evaluator.runner import CallPolicy, Completion
from lockgate.services.evaluator.upstream import Upstream, judge_step
from lockgate.services.gatekeeper import domain

pytestmark = pytest.mark.timeout(30)

JUDGE = {"name": "llm_judge", "params": {"model": "judge-1", "rubric": "Is it right?", "n": 3}}
SUITE = eval_domain.parse_suite({"name": "s", "prompt": {"template": "{input}"},
                                 "dataset": [{"input": "q", "expected": "a"}], "scorers": [JUDGE]})
POLICY = domain.parse_policy({"name": "p", "rules": [
    {"name": "judge", "metric": "llm_judge", "relative": {"max_regression": 0.02}},
    {"name": "overall", "metric": "score", "op": ">=", "threshold": 0.5},
]})


def judged(case: int, value: float | None, agreement: float = 1.0) -> CaseResult:
    scores = {} if value is None else {"llm_judge": value, "llm_judge_agreement": agreement}
    details = {"llm_judge": {"error": "no score in judge reply 'sorry'"}} if value is None else {}
    return CaseResult(case_id=str(case), repeat=0, input="q", expected="a", output="a", scores=scores,
                      latency_ms=5.0, details=details)


def quality(case: int) -> float:
    return 0.9 if case % 10 else 0.4  # the same per-case quality in both runs


def completed(candidate: list[CaseResult], baseline: list[CaseResult]) -> EvalCompleted:
    comparisons, warnings = summary.compare(SUITE, candidate, baseline)
    return EvalCompleted(run_id="run-1", release="r", suite="sha256:" + "0" * 64, n_cases=len(candidate),
                         metrics=eval_domain.aggregate(SUITE, candidate), intervals=summary.intervals(SUITE, candidate),
                         comparisons=comparisons, warnings=warnings)


def test_unreadable_judge_replies_are_missing_and_the_decision_needs_review() -> None:
    # Why: 40% of cases got no readable judge score; they were scored 0, the judge metric fell by ~0.3 and the
    # candidate was BLOCKed for a regression it did not have.
    baseline = [judged(i, quality(i)) for i in range(200)]
    candidate = [judged(i, None if i % 5 < 2 else quality(i)) for i in range(200)]
    done = completed(candidate, baseline)
    assert done.metrics["llm_judge_missing"] == pytest.approx(0.4)
    assert done.metrics["llm_judge"] == pytest.approx(sum(quality(i) for i in range(200) if i % 5 >= 2) / 120)
    assert done.comparisons["llm_judge"].n_pairs == 120 and abs(done.comparisons["llm_judge"].diff) < 1e-9
    out = domain.decide_eval(POLICY, "", done)
    assert out.decision == "NEEDS_REVIEW"
    assert [r.verdict for r in out.rules] == ["ERROR", "ERROR"]
    assert "40.0% of answered cases have no llm_judge score" in out.rules[0].hint
    assert "--no-cache" in out.rules[0].hint


def test_a_few_missing_scores_within_the_threshold_are_left_out_not_zeroed() -> None:
    baseline = [judged(i, quality(i)) for i in range(200)]
    candidate = [judged(i, None if i == 3 else quality(i)) for i in range(200)]
    out = domain.decide_eval(POLICY, "", completed(candidate, baseline))
    assert out.decision == "PASS", out.reason
    assert [r.verdict for r in out.rules] == ["PASS", "PASS"]


def test_low_judge_agreement_needs_review_not_a_verdict() -> None:
    runs = [judged(i, quality(i), agreement=2 / 3) for i in range(200)]
    out = domain.decide_eval(POLICY, "", completed(runs, runs))
    assert out.decision == "NEEDS_REVIEW"
    assert all(r.verdict == "ERROR" and "judge agreement 0.667" in r.hint for r in out.rules)
    relaxed = domain.parse_policy({"name": "p", "rules": [{"metric": "llm_judge", "op": ">=", "threshold": 0.5}],
                                   "measurement": {"min_judge_agreement": 0.6}})
    assert domain.decide_eval(relaxed, "", completed(runs, runs)).decision == "PASS"


def test_rules_on_other_metrics_are_untouched_by_a_broken_judge() -> None:
    rule = domain.parse_policy({"name": "p", "rules": [{"metric": "error_rate", "op": "<=", "threshold": 0.1}]})
    done = completed([judged(i, None) for i in range(50)], [judged(i, 0.9) for i in range(50)])
    assert "llm_judge" not in done.metrics and done.metrics["llm_judge_missing"] == 1.0
    assert domain.decide_eval(rule, "", done).decision == "PASS"


def fake_upstream(replies: list[str]) -> Any:
    async def call(msgs: list[dict[str, str]], params: dict[str, Any] | None = None,
                   salt: dict[str, Any] | None = None) -> Completion:
        return Completion(text=replies.pop(0), latency_ms=1.0)

    return call


def test_judge_step_leaves_an_unreadable_case_unscored() -> None:
    params = judge.parse_params(JUDGE["params"])
    step = judge_step(fake_upstream(["sorry", "no idea", "<judge call failed: timed out>"]), params)
    out = asyncio.run(step(CaseResult(case_id="1", repeat=0, input="q", expected="a", output="a")))
    assert "llm_judge" not in out.scores and "no majority verdict: 0 of 3" in out.details["llm_judge"]["error"]
    assert eval_domain.case_scores(SUITE, out) == {"llm_judge": None, "score": None}


class RecordingCache:
    """A cache that hits on every key and records them (so no call is made)."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    async def get(self, key: str) -> Cached:
        self.keys.append(key)
        return Cached('{"score": 1}', 1.0)

    def put(self, key: str, value: Cached) -> None:
        raise AssertionError("a hit is not written back")


def judge_keys(**changes: Any) -> set[str]:
    params = judge.parse_params({**JUDGE["params"], **changes})
    cache = RecordingCache()
    at = Access(id="judge", base="http://127.0.0.1:1/v1")
    upstream = Upstream(None, at, params.model, CallPolicy(), cache)  # type: ignore[arg-type]
    asyncio.run(judge_step(upstream, params)(judged(1, 1.0)))
    return set(cache.keys)


def test_judge_cache_keys_include_the_judge_model_and_every_parameter() -> None:
    base = judge_keys()
    assert len(base) == 3  # one per replica
    for change in ({"model": "judge-2"}, {"temperature": 0.2}, {"n": 3, "pass_mark": 0.7},
                   {"rubric": "Is it kind?"}):
        assert judge_keys(**change).isdisjoint(base), change
    assert judge_keys() == base  # deterministic


def test_a_run_can_bypass_the_cache() -> None:
    assert EvalRequested(run_id="r", release="r", suite="s", endpoint="e").cache is True
    assert EvalRequested(run_id="r", release="r", suite="s", endpoint="e", cache=False).cache is False
