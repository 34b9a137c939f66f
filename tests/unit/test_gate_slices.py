"""Slices: suites declare slice keys, metrics and comparisons come per slice, and a policy rule blocks a slice
that regresses beyond its margin, corrected for the number of slices."""

from __future__ import annotations

import numpy as np
import pytest

from lockgate.contracts import EvalCompleted
from lockgate.gatestats import multiplicity
from lockgate.services.evaluator import domain as eval_domain
from lockgate.services.evaluator import summary
from lockgate.services.evaluator.domain import CaseResult, SuiteError
from lockgate.services.gatekeeper import domain

pytestmark = pytest.mark.timeout(60)
N = 400
LANGS = ["en"] * 300 + ["fr"] * 60 + ["de"] * 40  # de is a 10% minority
CASES = [{"id": f"c{i}", "input": f"q{i}", "expected": "a", "meta": {"lang": lang}, "tags": ["long"] if i % 4 else []}
         for i, lang in enumerate(LANGS)]
SUITE = eval_domain.parse_suite({"name": "s", "prompt": {"template": "{input}"}, "dataset": CASES,
                                 "scorers": ["exact_match"], "slices": ["lang", "tags",
                                                                        {"key": "input", "buckets": [3]}]})
LABELS = {c.id: eval_domain.slice_labels(SUITE, c) for c in SUITE.dataset}  # type: ignore[union-attr]
MEAN_RULE = {"name": "mean", "metric": "exact_match", "relative": {"max_regression": 0.05}}
SLICE_RULE = {"name": "slices", "metric": "exact_match", "slices": {"max_regression": 0.1, "min_cases": 30}}


def run(p: dict[str, float], seed: int = 1) -> list[CaseResult]:
    # One difficulty per case shared by both runs (as real cases have): a case passes below its slice's rate.
    difficulty = np.random.default_rng(seed).random(N)
    return [CaseResult(case_id=f"c{i}", repeat=0, input="q", expected="a",
                       scores={"exact_match": float(difficulty[i] < p[lang])}, latency_ms=1.0)
            for i, lang in enumerate(LANGS)]


def completed(candidate: list[CaseResult], baseline: list[CaseResult]) -> EvalCompleted:
    metrics = eval_domain.aggregate(SUITE, candidate)
    ivs = summary.intervals(SUITE, candidate)
    sm, si = summary.slice_metrics(SUITE, candidate, LABELS)
    comps, warnings = summary.compare(SUITE, candidate, baseline)
    comps.update(summary.slice_compare(SUITE, candidate, baseline, LABELS))
    return EvalCompleted(run_id="r", release="r", suite="s", metrics={**metrics, **sm}, intervals={**ivs, **si},
                         comparisons=comps, warnings=warnings)


def test_labels_from_meta_tags_and_buckets() -> None:
    assert LABELS["c0"] == ("lang=en", "input<3")
    assert LABELS["c399"] == ("lang=de", "tag=long", "input>=3")


def test_a_collapsed_minority_slice_blocks_although_the_mean_held() -> None:
    # Why: accuracy collapsed on a minority slice while the mean held, and the gate PASSed.
    base = run({"en": 0.85, "fr": 0.85, "de": 0.85})
    cand = run({"en": 0.95, "fr": 0.95, "de": 0.35})
    done = completed(cand, base)
    assert done.comparisons["exact_match"].diff > -0.01  # the mean held (it even rose)
    assert done.metrics["n_cases[lang=de]"] == 40 and done.intervals["exact_match[lang=de]"].n == 40
    only_mean = domain.parse_policy({"name": "p", "rules": [MEAN_RULE]})
    assert domain.decide_eval(only_mean, "", done).decision == "PASS"  # what the gate saw before slices
    with_slices = domain.parse_policy({"name": "p", "rules": [MEAN_RULE, SLICE_RULE]})
    out = domain.decide_eval(with_slices, "", done)
    assert out.decision == "BLOCK" and out.rules[1].verdict == "FAIL"
    assert "lang=de" in out.rules[1].hint and "holm at alpha 0.05" in out.rules[1].hint


def test_slices_under_min_cases_are_not_tested() -> None:
    base = run({"en": 0.85, "fr": 0.85, "de": 0.85})
    cand = run({"en": 0.85, "fr": 0.85, "de": 0.35})
    rule = domain.parse_policy({"name": "p", "rules": [{**SLICE_RULE, "slices": {"max_regression": 0.1,
                                                                                "min_cases": 50}}]})
    r = domain.decide_eval(rule, "", completed(cand, base)).rules[0]
    assert r.verdict == "PASS" and "not tested (input<3, lang=de)" in r.hint


@pytest.mark.parametrize(("no_data", "decision"), [("fail", "BLOCK"), ("pass", "PASS")])
def test_a_slices_rule_that_tested_no_slice_is_no_data(no_data: str, decision: str) -> None:
    # Found by probe p40 (F3): every slice under min_cases, the rule was a PASS over regressions it never tested.
    base = run({"en": 0.85, "fr": 0.85, "de": 0.85})
    cand = run({"en": 0.85, "fr": 0.35, "de": 0.35})
    policy = domain.parse_policy({"name": "p", "no_data": no_data, "rules": [
        {**SLICE_RULE, "slices": {"max_regression": 0.1, "min_cases": 500}}]})
    out = domain.decide_eval(policy, "", completed(cand, base))
    r = out.rules[0]
    assert (out.decision, r.verdict, r.observed) == (decision, "NO_DATA", None)
    assert r.hint.startswith("no slice of exact_match was tested, under min_cases 500: input<3 ")
    assert "lang=de -0.625 (n=40), lang=en +0 (n=300), lang=fr -0.5333 (n=60)" in r.hint  # the untested estimates
    assert r.hint.endswith("; run the eval with more cases per slice, or lower min_cases")
    assert r.explanation == f"slices could not be judged: {r.hint.split(';')[0]}."
    said = "0 of 1 rules of policy 'p' passed; 1 rule(s) had no data (no_data: pass): slices: no slice of" \
        if no_data == "pass" else "1 of 1 rules failed: slices: no slice of exact_match was tested"
    assert out.reason.startswith(said)


def test_no_slices_is_no_data() -> None:
    rule = domain.parse_policy({"name": "p", "rules": [SLICE_RULE]}).rules[0]
    assert domain.evaluate_rule(rule, {"exact_match": 0.9}).verdict == "NO_DATA"


def test_suites_reject_bad_buckets() -> None:
    with pytest.raises(SuiteError, match="increasing"):
        eval_domain.parse_suite({"name": "s", "prompt": {"template": "{input}"}, "dataset": CASES,
                                 "scorers": ["exact_match"], "slices": [{"key": "input", "buckets": [5, 3]}]})


@pytest.mark.parametrize(("p", "holm", "bh"), [
    ([0.01, 0.04, 0.03, 0.005], [True, False, False, True], [True, True, True, True]),
    ([0.2, 0.5], [False, False], [False, False]),
    ([0.001, 0.02, 0.5], [True, True, False], [True, True, False]),
])
def test_holm_and_benjamini_hochberg(p: list[float], holm: list[bool], bh: list[bool]) -> None:
    assert multiplicity.holm(p, 0.05) == holm
    assert multiplicity.benjamini_hochberg(p, 0.05) == bh


def test_holm_and_bh_match_statsmodels_style_adjusted_p_values() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = list(rng.random(8) ** 3)
        order = np.argsort(p)
        m = len(p)
        # Adjusted p-values (the textbook definitions): reject iff adjusted <= alpha.
        holm_adj = np.maximum.accumulate([min(1, (m - i) * p[j]) for i, j in enumerate(order)])
        bh_sorted = [p[j] * m / (i + 1) for i, j in enumerate(order)]
        bh_adj = np.minimum.accumulate(bh_sorted[::-1])[::-1]
        want_holm, want_bh = [False] * m, [False] * m
        for i, j in enumerate(order):
            want_holm[j], want_bh[j] = bool(holm_adj[i] <= 0.05), bool(bh_adj[i] <= 0.05)
        assert multiplicity.holm(p, 0.05) == want_holm
        assert multiplicity.benjamini_hochberg(p, 0.05) == want_bh
