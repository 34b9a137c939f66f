"""Canary analysis compares like with like in time: stable's requests of the same time as the canary's (probe p5,
finding 1). The canary's weight rises step by step, so its sample leans to later requests and stable's to earlier
ones; what a caller sends changing over time was blamed on the canary. Pure: events into Evidence, then measure."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from lockgate.contracts import InferenceEvent
from lockgate.services.router import analysis
from lockgate.services.router.analysis import AnalysisSpec, MetricSpec
from lockgate.services.router.evidence import Evidence

T0 = 1_000_000.0  # the rollout's start
SPEC = AnalysisSpec(metrics=[MetricSpec(name="tokens_per_request", max_ratio=1.5),
                             MetricSpec(name="error_rate", max_increase=0.05)], min_sample=30)


def _served(steps: list[tuple[float, float]], tokens: object, canary_worse: float = 1.0,
            per_s: int = 30, seed: int = 1) -> Evidence:
    """One app key's requests from T0 on, `per_s` a second; `steps`: (seconds from T0 a step begins, canary
    weight); `tokens(t)`: the tokens the prompt at t costs, on either arm (times `canary_worse` on the canary)."""
    rng = random.Random(seed)
    ev = Evidence(price=lambda e: None)
    end = steps[-1][0] + 10
    for i in range(int(end * per_s)):
        t = i / per_s
        weight = next(w for start, w in reversed(steps) if t >= start)
        canary = rng.random() < weight
        n = tokens(t) * rng.uniform(0.9, 1.1) * (canary_worse if canary else 1.0)  # type: ignore[operator]
        ev.add(InferenceEvent(app="shop", deployment="d", release="r2" if canary else "r1", key_id="k-app",
                              output_tokens=round(n), latency_ms=100.0, time=datetime.fromtimestamp(T0 + t, UTC)))
    return ev


def _tokens(m: analysis.Measurement) -> analysis.MetricResult:
    return next(r for r in m.metrics if r.name == "tokens_per_request")


def test_a_caller_sending_longer_prompts_later_does_not_abort_a_healthy_canary() -> None:
    # 20% then 80%; the key sends short prompts for 16 s, long ones after; both arms answer alike.
    ev = _served([(0, 0.2), (10, 0.8)], lambda t: 80 if t < 16 else 800)
    canary, stable = ev.sample("d", "r2", T0), ev.sample("d", "r1", T0)
    # Against the whole window the canary's tokens look about three times stable's (what aborted it).
    assert sum(canary.tokens) / len(canary.tokens) > 1.5 * sum(stable.tokens) / len(stable.tokens)
    m = analysis.measure(SPEC, canary, stable, look=1)
    assert m.verdict == "SUCCESSFUL", [analysis.describe(r) for r in m.metrics]
    # The 100% step after it: its requests have no stable ones of their time and are left out, the rest judged.
    ev = _served([(0, 0.2), (10, 0.8), (20, 1.0)], lambda t: 80 if t < 16 else 800)
    m = analysis.measure(SPEC, ev.sample("d", "r2", T0), ev.sample("d", "r1", T0), look=1)
    assert m.verdict == "SUCCESSFUL", [analysis.describe(r) for r in m.metrics]
    assert "left out of the comparison with stable" in _tokens(m).why


def test_a_costly_canary_is_caught_though_a_caller_sends_shorter_prompts_later() -> None:
    # The mirror: long prompts first, short ones later, and a canary 2.5 times as costly on every prompt. Against
    # the whole window it looked within the limit (its requests lean to the later, short ones).
    ev = _served([(0, 0.2), (10, 0.8)], lambda t: 1000 if t < 12 else 20, canary_worse=2.5, per_s=60)
    canary, stable = ev.sample("d", "r2", T0), ev.sample("d", "r1", T0)
    assert sum(canary.tokens) / len(canary.tokens) < 1.5 * sum(stable.tokens) / len(stable.tokens)
    m = analysis.measure(SPEC, canary, stable, look=1)
    failed = m.failing()
    assert m.verdict == "FAILED" and failed is not None and failed.name == "tokens_per_request", \
        [analysis.describe(r) for r in m.metrics]


def test_at_100_percent_the_canary_is_never_compared_with_older_stable_requests() -> None:
    # window_s: the look at 100% sees only the canary's requests of its window, and stable's whole rollout (the
    # router's fallback when its window is too thin): short prompts then, long ones now.
    ev = _served([(0, 0.5), (10, 1.0)], lambda t: 20 if t < 12 else 600)
    canary, stable = ev.sample("d", "r2", T0 + 12), ev.sample("d", "r1", T0)
    m = analysis.measure(SPEC, canary, stable, look=1)
    tokens = _tokens(m)
    assert tokens.verdict == "INCONCLUSIVE" and m.verdict != "FAILED", analysis.describe(tokens)
    assert "older stable requests are never its baseline" in tokens.why
    # An absolute limit still holds every canary request to it.
    ceiling = AnalysisSpec(metrics=[MetricSpec(name="tokens_per_request", max=300, max_ratio=1.5)], min_sample=30)
    m = analysis.measure(ceiling, canary, stable, look=1)
    assert m.verdict == "FAILED" and _tokens(m).threshold == 300, analysis.describe(_tokens(m))


def test_a_blue_green_baseline_of_the_old_release_before_the_promotion_is_compared_as_before() -> None:
    # After a promotion stable can grow no more (baseline_final): the old release's traffic before it is the
    # baseline by design, so nothing is left out for being of another time.
    ev = _served([(0, 0.0), (10, 1.0)], lambda t: 80)
    m = analysis.measure(SPEC, ev.sample("d", "r2", T0 + 10), ev.sample("d", "r1", T0), look=1, baseline_final=True)
    assert m.verdict == "SUCCESSFUL", [analysis.describe(r) for r in m.metrics]
