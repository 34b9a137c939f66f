"""Online evaluation: deterministic sampling, reference-free scores, and scores as analysis metrics."""

from __future__ import annotations

import msgspec
import pytest

from lockgate.contracts import InferenceEvent
from lockgate.errors import ConfigError
from lockgate.services.evaluator import online
from lockgate.services.router.analysis import AnalysisSpec, MetricSpec, VariantSample, describe, measure

pytestmark = pytest.mark.timeout(30)


def _event(i: int, response: str | None = "hello", status: str = "ok") -> InferenceEvent:
    return InferenceEvent(id=f"01941f29-7c00-7000-8000-{i:012x}", app="shop", deployment="chat", release="r2",
                          variant="canary", response=response, status=status, trace_id="t" * 32)


def test_sampling_is_deterministic_by_event_id_and_near_its_rate() -> None:
    ids = [f"01941f29-7c00-7000-8000-{i:012x}" for i in range(4000)]
    picked = [online.sampled(i, 0.1) for i in ids]
    assert picked == [online.sampled(i, 0.1) for i in ids]  # every replica and redelivery agrees
    assert 300 <= sum(picked) <= 500
    assert all(online.sampled(i, 1.0) for i in ids[:10]) and not any(online.sampled(i, 0.0) for i in ids[:10])


def test_scores_of_an_answer_and_none_for_errors() -> None:
    scored = online.score(_event(1, "write to jane.doe@example.com"), ("pii_free", "refusal", "length"), 1.0)
    assert scored is not None and scored.event_id == _event(1).id and scored.release == "r2"
    assert scored.scores == {"pii_free": 0.0, "refusal": 0.0, "length": 29.0}
    assert scored.trace_id == "t" * 32 and scored.variant == "canary"
    assert online.score(_event(2, "I'm sorry, but I can't help with that"), ("refusal",), 1.0).scores == {  # type: ignore[union-attr]
        "refusal": 1.0}
    assert online.score(_event(3, None, status="error"), ("length",), 1.0) is None
    with pytest.raises(ConfigError, match="exact_match cannot score live traffic"):
        online.check(("pii_free", "exact_match"))


def _sample(n: int, **scores: list[float]) -> VariantSample:
    return VariantSample(n=n, latency_ms=[1.0] * n, scores=scores)


def test_score_metric_fails_a_canary_whose_score_dropped_naming_value_and_threshold() -> None:
    spec = AnalysisSpec(metrics=[MetricSpec(name="score", scorer="pii_free", max_decrease=0.01)], min_sample=100)
    leaky = _sample(200, pii_free=[1.0] * 60 + [0.0] * 40)
    clean = _sample(200, pii_free=[1.0] * 100)
    m = measure(spec, leaky, clean, look=1)
    assert m.verdict == "FAILED"
    r = m.metrics[0]
    assert (r.name, r.canary, r.stable, r.threshold) == ("score:pii_free", 0.6, 1.0, 0.99)
    assert describe(r).startswith("score:pii_free 0.6 < threshold 0.99 (stable 1; 100 canary vs 100 stable scores)")
    assert measure(spec, clean, clean, look=1).verdict == "SUCCESSFUL"


def test_too_few_scores_wait_and_no_scores_never_pass() -> None:
    spec = AnalysisSpec(metrics=[MetricSpec(name="score", scorer="pii_free", min=0.9, min_scores=30)], min_sample=100)
    assert measure(spec, _sample(200, pii_free=[1.0] * 10), _sample(200), look=1).verdict == "WAITING"
    assert measure(spec, _sample(200), _sample(200), look=1).verdict == "WAITING"  # e.g. online eval is off
    assert measure(spec, _sample(200, pii_free=[1.0] * 30), _sample(200), look=1).verdict == "SUCCESSFUL"


def test_lower_is_better_scores_use_the_ceiling_limits() -> None:
    spec = AnalysisSpec(metrics=[MetricSpec(name="score", scorer="length", max_ratio=2.0)], min_sample=100)
    tripled = _sample(200, length=[30.0 + i % 3 for i in range(100)])
    plain = _sample(200, length=[10.0 + i % 3 for i in range(100)])
    m = measure(spec, tripled, plain, look=1)
    assert m.verdict == "FAILED" and describe(m.metrics[0]).startswith("score:length 30.99 > threshold 21.98 (stable 10.99; 100 canary vs 100 stable scores)")


def test_score_metrics_are_checked_when_decoded() -> None:
    for bad, part in (({"name": "score", "min": 0.9}, "name its scorer"),
                      ({"name": "score", "scorer": "x", "min": 0.9, "max": 3}, "not both"),
                      ({"name": "error_rate", "min": 0.9}, "are for score metrics")):
        with pytest.raises(msgspec.ValidationError, match=part):
            msgspec.convert(bad, MetricSpec)
