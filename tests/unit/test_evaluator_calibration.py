"""The suite's `calibration:` field: validation, per-case confidence, ECE/Brier aggregation and intervals."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest

from lockgate.llmwire import decode_completion
from lockgate.services.evaluator import calibrated, calibration, domain, summary
from lockgate.services.evaluator.domain import CaseResult, SuiteError

pytestmark = pytest.mark.timeout(10)


def suite_doc(**changes: object) -> dict:
    doc = {
        "name": "qa",
        "prompt": {"template": "{input}"},
        "dataset": [{"id": "a", "input": "2+2?", "expected": "4"}],
        "scorers": [{"name": "exact_match", "weight": 2}, {"name": "token_f1", "threshold": 0.5}],
    }
    doc.update(changes)
    return doc


def test_calibration_defaults_to_the_first_scorer_and_ten_bins() -> None:
    assert domain.parse_suite(suite_doc()).calibration is None
    spec = domain.parse_suite(suite_doc(calibration={"confidence": "logprobs"})).calibration
    assert spec == domain.CalibrationSpec(confidence="logprobs", scorer="exact_match", bins=10)
    spec = domain.parse_suite(suite_doc(calibration={"confidence": "field:conf", "scorer": "token_f1",
                                                     "bins": 5})).calibration
    assert (spec.json_field, spec.scorer, spec.bins) == ("conf", "token_f1", 5)


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        ("logprobs", "Expected `object | null`, got `str` - at `$.calibration`"),
        ({}, "missing required field `confidence` - at `$.calibration`"),
        ({"confidence": 1}, "Expected `str`, got `int` - at `$.calibration.confidence`"),
        ({"confidence": "probs"}, "confidence: expected 'logprobs' or 'field:<name>', got 'probs' - at `$.calibration`"),
        ({"confidence": "field:"}, "confidence: expected 'logprobs' or 'field:<name>', got 'field:'"),
        ({"confidence": "logprobs", "scorer": "rouge_l"}, "expected one of the suite's scorers (exact_match, token_f1), got 'rouge_l' - at `$.calibration.scorer`"),
        ({"confidence": "logprobs", "bins": 0}, "Expected `int` >= 1 - at `$.calibration.bins`"),
        ({"confidence": "logprobs", "bins": True}, "Expected `int`, got `bool` - at `$.calibration.bins`"),
        ({"confidence": "logprobs", "bin": 5}, "unknown field `bin` - at `$.calibration`"),
    ],
)
def test_calibration_errors_name_the_field(calibration: object, message: str) -> None:
    with pytest.raises(SuiteError) as err:
        domain.parse_suite(suite_doc(calibration=calibration))
    assert message in err.value.message


def test_logprobs_confidence_needs_a_called_task() -> None:
    task = {"type": "recorded", "app": "a", "release": "r"}
    with pytest.raises(SuiteError, match=r"'logprobs' needs task type 'call' .* - at `\$.calibration.confidence`"):
        domain.parse_suite(suite_doc(task=task, calibration={"confidence": "logprobs"}))
    assert domain.parse_suite(suite_doc(task=task, calibration={"confidence": "field:c"})).calibration


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ('{"answer": "4", "conf": 0.8}', 0.8),
        ('```json\n{"answer": "4", "conf": 1}\n```', 1.0),
        ('{"answer": "4"}', None),
        ('{"conf": 1.2}', None),
        ('{"conf": "0.8"}', None),
        ('{"conf": true}', None),
        ("[0.8]", None),
        ("not json", None),
    ],
)
def test_confidence_from_a_json_field(output: str, expected: float | None) -> None:
    spec = domain.CalibrationSpec(confidence="field:conf", scorer="exact_match")
    assert calibrated.confidence(spec, output, None) == expected


def test_confidence_from_logprobs_and_request_params() -> None:
    suite = domain.parse_suite(suite_doc(calibration={"confidence": "logprobs"}))
    assert calibrated.confidence(suite.calibration, "4", [-0.1, -0.3]) == pytest.approx(math.exp(-0.2))
    assert calibrated.confidence(suite.calibration, "4", None) is None
    assert calibrated.confidence(suite.calibration, "4", [0.5]) is None  # not a log probability
    assert calibrated.request_params(suite) == {"logprobs": True}
    assert calibrated.request_params(domain.parse_suite(suite_doc())) is None
    scores = calibrated.with_confidence(suite, {"exact_match": 1.0}, "4", [0.0])
    assert scores == {"exact_match": 1.0, "confidence": 1.0}
    assert calibrated.with_confidence(domain.parse_suite(suite_doc()), {"x": 1.0}, "4", [0.0]) == {"x": 1.0}


def _token_logprobs(payload: dict) -> tuple[float, ...] | None:
    return decode_completion(msgspec.json.encode(payload)).choices[0].token_logprobs()


def test_token_logprobs_are_read_from_the_openai_shape() -> None:
    content = [{"token": "four", "logprob": -0.5}, {"token": "!", "logprob": -1}]
    assert _token_logprobs({"choices": [{"logprobs": {"content": content}}]}) == (-0.5, -1.0)
    for payload in ({"choices": [{"logprobs": None}]}, {"choices": [{}]}, {"choices": [{"logprobs": {"content": []}}]},
                    {"choices": [{"logprobs": {"content": [{"token": "x"}]}}]}):
        assert _token_logprobs(payload) is None


def row(case_id: str, correct: float, conf: float | None, *, error: str = "", f1: float = 0.0) -> CaseResult:
    scores = {"exact_match": correct, "token_f1": f1}
    if conf is not None:
        scores["confidence"] = conf
    return CaseResult(case_id=case_id, repeat=0, input="q", expected="4", scores={} if error else scores, error=error)


# Hand computation, 10 bins, over the five rows with a confidence:
#   (0.8,0.9]: a 0.9 right, e 0.85 wrong -> acc 0.5, conf 0.875, weight 2/5 -> 0.15
#   (0.7,0.8]: b 0.8 wrong -> 0.8 * 1/5 = 0.16;  (0.2,0.3]: c 0.3 wrong -> 0.06;  (0.9,1]: d 0.95 right -> 0.01
#   ECE = 0.38;  Brier = (0.1^2 + 0.8^2 + 0.3^2 + 0.05^2 + 0.85^2) / 5 = 1.465 / 5 = 0.293
HAND = [row("a", 1, 0.9), row("b", 0, 0.8), row("c", 0, 0.3), row("d", 1, 0.95), row("e", 0, 0.85)]


def test_ece_and_brier_match_a_hand_computation_and_missing_ones_are_reported() -> None:
    suite = domain.parse_suite(suite_doc(calibration={"confidence": "logprobs"}))
    results = [*HAND, row("f", 1, None), row("g", 0, None, error="HTTP 500")]
    metrics, warnings = calibrated.metrics(suite, results)
    assert metrics == {"ece": pytest.approx(0.38), "brier": pytest.approx(0.293)}
    assert warnings == ["calibration: 2 cases had no confidence (1 errored); ece and brier are over the other 5"]
    intervals = summary.intervals(suite, results)
    assert intervals["ece"].estimate == pytest.approx(0.38) and intervals["ece"].method == "percentile"
    assert intervals["brier"].estimate == pytest.approx(0.293) and intervals["brier"].n == 5
    for name in ("ece", "brier"):
        iv = intervals[name]
        assert iv.low is not None and iv.high is not None and iv.low <= iv.estimate <= iv.high
    assert "confidence" not in domain.aggregate(suite, results)  # a confidence is not a scorer


def test_correctness_uses_the_scorers_threshold() -> None:
    suite = domain.parse_suite(suite_doc(calibration={"confidence": "logprobs", "scorer": "token_f1"}))
    results = [row("a", 0, 0.6, f1=0.5), row("b", 0, 0.6, f1=0.4)]  # threshold 0.5: a right, b wrong
    metrics, warnings = calibrated.metrics(suite, results)
    assert metrics == {"ece": pytest.approx(0.1), "brier": pytest.approx((0.4**2 + 0.6**2) / 2)}
    assert warnings == []


def test_no_confidence_at_all_means_no_metrics_and_a_warning() -> None:
    suite = domain.parse_suite(suite_doc(calibration={"confidence": "field:conf"}))
    results = [row("a", 1, None), row("b", 0, None)]
    metrics, warnings = calibrated.metrics(suite, results)
    assert metrics == {}
    assert len(warnings) == 1 and warnings[0].startswith("calibration: 2 cases had no confidence")
    assert "'conf'" in warnings[0]
    assert "ece" not in summary.intervals(suite, results)
    assert calibrated.metrics(domain.parse_suite(suite_doc()), HAND) == ({}, [])


def test_ece_interval_resamples_cases_and_leaves_one_case_unestimable() -> None:
    one = calibration.ece_interval([0.9, 0.7], [1, 0], ["a", "a"])
    assert one.estimate == pytest.approx(calibration.expected_calibration_error([0.9, 0.7], [1, 0]))
    assert math.isnan(one.low) and math.isnan(one.high)
    iv = calibration.ece_interval([0.9, 0.8, 0.3, 0.95, 0.85], [1, 0, 0, 1, 0], list("abcde"), n_resamples=500)
    assert iv == calibration.ece_interval([0.9, 0.8, 0.3, 0.95, 0.85], [1, 0, 0, 1, 0], list("abcde"),
                                          n_resamples=500)  # seeded
    assert iv.estimate == pytest.approx(0.38) and 0 <= iv.low <= iv.estimate <= iv.high <= 1
    # Perfect calibration in every resample: confidence 1 and always right.
    exact = calibration.ece_interval([1.0] * 4, [1] * 4, list("abcd"))
    assert (exact.low, exact.estimate, exact.high) == (0.0, 0.0, 0.0)


def test_ece_bootstrap_matches_a_plain_loop_over_resampled_cases() -> None:
    # Two repeats per case: a resample takes both rows of each drawn case.
    conf = [0.9, 0.7, 0.55, 0.6, 0.2, 0.35, 0.95, 0.9, 0.45, 0.8]
    right = [1, 1, 0, 1, 0, 0, 1, 1, 1, 0]
    groups = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"]
    iv = calibration.ece_interval(conf, right, groups, 5, n_resamples=300, seed=3)
    draws = np.random.default_rng(3).integers(0, 5, size=(300, 5))
    by_case = {i: [j for j, g in enumerate(groups) if g == "abcde"[i]] for i in range(5)}
    boot = []
    for draw in draws:
        rows = [j for i in draw for j in by_case[i]]
        boot.append(calibration.expected_calibration_error([conf[j] for j in rows], [right[j] for j in rows], 5))
    low, high = np.percentile(boot, [2.5, 97.5])
    assert (iv.low, iv.high) == (pytest.approx(min(low, iv.estimate)), pytest.approx(max(high, iv.estimate)))
