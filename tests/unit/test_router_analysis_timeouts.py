"""Latency evidence counts the calls that timed out (probe p22 F5): a canary whose slow tail times out is not judged
on its fast answers only. Pure: events into Evidence, then measure."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from lockgate.contracts import InferenceEvent
from lockgate.services.router import analysis
from lockgate.services.router.analysis import AnalysisSpec, MetricSpec
from lockgate.services.router.evidence import Evidence

T0 = 1_000_000.0
LATENCY = AnalysisSpec(metrics=[MetricSpec(name="latency_p95", max_ratio=1.5),
                                MetricSpec(name="ttft_p95", max_ratio=1.5)], min_sample=100)


def _served(failure: str, latency_ms: float, ttft_ms: float = 0.0, share: float = 0.3, n: int = 600) -> Evidence:
    """One key's streamed requests, half to each arm; stable answers in 500-650 ms (first token at 100-150 ms), and
    `share` of the canary's calls fail with error type `failure` after `latency_ms` (`ttft_ms`: a first token
    came), the rest answer as stable's do."""
    rng = random.Random(7)
    ev = Evidence(price=lambda e: None)
    for i in range(n):
        canary = i % 2 == 1
        failed = canary and rng.random() < share
        ev.add(InferenceEvent(
            app="shop", deployment="d", release="r2" if canary else "r1", key_id="k", output_tokens=20,
            status="error" if failed else "ok", error_type=failure if failed else "",
            latency_ms=latency_ms if failed else rng.uniform(500, 650),
            ttft_ms=ttft_ms if failed else rng.uniform(100, 150), time=datetime.fromtimestamp(T0 + i / 30, UTC)))
    return ev


def _measure(ev: Evidence) -> dict[str, analysis.MetricResult]:
    m = analysis.measure(LATENCY, ev.sample("d", "r2", T0), ev.sample("d", "r1", T0), look=1)
    return {r.name: r for r in m.metrics}


@pytest.mark.parametrize("failure", ["first_byte", "upstream_timeout", "upstream_unanswered", "connect_timeout"])
def test_a_canary_whose_slow_calls_time_out_fails_latency_and_ttft(failure: str) -> None:
    # p22 F5: 30% of the canary's calls hung past the endpoint's 2 s first-byte timeout; judged on its answers only,
    # its p95 (563 ms) looked better than stable's, and it passed latency_p95 and was promoted.
    ev = _served(failure, 2000.0)
    canary = ev.sample("d", "r2", T0)
    assert canary.errors and len(canary.latency_ms) == canary.n  # every call, each timed out one at its 2 s
    found = _measure(ev)
    for name in ("latency_p95", "ttft_p95"):  # no first token before the timeout: at its time to failure
        assert found[name].verdict == "FAILED" and found[name].canary == 2000.0, analysis.describe(found[name])


def test_a_stream_that_stalls_after_its_first_token_keeps_its_ttft() -> None:
    ev = _served("stream_interrupted:ChunkTimeout", 5000.0, ttft_ms=120.0)
    found = _measure(ev)
    assert found["latency_p95"].verdict == "FAILED" and found["latency_p95"].canary == 5000.0
    assert found["ttft_p95"].verdict == "SUCCESSFUL", analysis.describe(found["ttft_p95"])


@pytest.mark.parametrize("failure", ["500", "connect", "breaker_open", "400"])
def test_a_call_that_failed_fast_for_another_reason_is_no_latency(failure: str) -> None:
    # A 5xx or a refused connection in 3 ms says nothing of how fast the release answers: counted, it would make a
    # failing canary look faster. error_rate (client_error_rate for a 4xx) judges it.
    ev = _served(failure, 3.0)
    canary = ev.sample("d", "r2", T0)
    assert len(canary.latency_ms) == canary.n - canary.errors and min(canary.latency_ms) >= 500
    assert not len(canary.ttft_ms) or min(canary.ttft_ms) >= 100
