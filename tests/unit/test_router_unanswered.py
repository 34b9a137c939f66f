"""Calls still in flight past router_unanswered_s count in a look as failed, at their silence in latency and TTFT
(probe p26 F1): a release that never answers a share of its calls is not judged on its fast answers only. Pure:
events and calls in flight into Evidence, then measure."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from lockgate.contracts import InferenceEvent
from lockgate.services.router import analysis, progress
from lockgate.services.router.analysis import AnalysisSpec, MetricSpec
from lockgate.services.router.evidence import Evidence, InFlight, Unanswered

T0 = 1_000_000.0
SPEC = AnalysisSpec(metrics=[MetricSpec(name="error_rate", max_increase=0.05),
                             MetricSpec(name="latency_p95", max_ratio=1.5)], min_sample=50)


def _answered(n: int = 200) -> Evidence:
    """`n` requests of two keys, half to each arm, every one answered in 500-650 ms."""
    rng = random.Random(7)
    ev = Evidence(price=lambda e: None)
    for i in range(n):
        ev.add(InferenceEvent(app="shop", deployment="d", release="r2" if i % 2 else "r1", key_id=f"k{i % 4 // 2}",
                              output_tokens=20, latency_ms=rng.uniform(500, 650),
                              time=datetime.fromtimestamp(T0 + i / 10, UTC)))
    return ev


def _hung(n: int, silent_s: float = 12.0) -> list[Unanswered]:
    """`n` calls of the canary in flight, silent for `silent_s`, begun during the window."""
    return [Unanswered(at=T0 + 1 + i / 10, silent_s=silent_s, key_id=f"k{i % 2}") for i in range(n)]


def test_calls_in_flight_count_as_failed_at_their_silence() -> None:
    ev = _answered()
    plain = ev.sample("d", "r2", T0)
    sample = ev.sample("d", "r2", T0, _hung(30))
    assert (sample.n, sample.errors) == (plain.n + 30, 30)
    assert sorted(sample.latency_ms)[-30:] == [12_000.0] * 30 and sorted(sample.ttft_ms)[-30:] == [12_000.0] * 30
    assert len(sample.cost) == 0 and len(sample.tokens) == plain.n  # no answer: no tokens, no cost
    assert sum(s.n for s in sample.by_key.values()) == sample.n  # each with the key that sent it
    assert ev.sample("d", "r2", T0).n == plain.n  # nothing kept: a look's own


def test_a_call_that_began_before_the_window_counts_at_its_start() -> None:
    ev = _answered()
    since = T0 + 5
    sample = ev.sample("d", "r2", since, [Unanswered(at=T0 - 30, silent_s=40.0, key_id="k0")])
    assert sample.n == ev.sample("d", "r2", since).n + 1


def test_only_calls_in_flight_no_event_yet() -> None:
    sample = Evidence(price=lambda e: None).sample("d", "r2", T0, _hung(3))
    assert (sample.n, sample.errors, list(sample.latency_ms)) == (3, 3, [12_000.0] * 3)


def test_a_look_on_fast_answers_passes_and_with_its_hung_calls_fails_saying_so() -> None:
    # p26 F1: 30% of the canary's calls never answered; judged on the events alone it passed with error_rate 0.
    ev = _answered()
    stable = ev.sample("d", "r1", T0)
    assert analysis.measure(SPEC, ev.sample("d", "r2", T0), stable, look=1).verdict == "SUCCESSFUL"
    m = analysis.unanswered(analysis.measure(SPEC, ev.sample("d", "r2", T0, _hung(40)), stable, look=1), 40, 10.0)
    assert m.verdict == "FAILED"
    culprit = m.failing()
    assert culprit is not None and culprit.name == "error_rate"
    assert analysis.describe(culprit).endswith(
        "compared; 40 canary calls unanswered for longer than 10 s, still in flight, counted as failed)")
    notes = {r.name: r.note for r in m.metrics}
    assert notes["latency_p95"] and notes["error_rate"] and not notes["client_error_rate"]


def test_a_waiting_look_names_its_calls_in_flight() -> None:
    m = analysis.measure(SPEC, Evidence(price=lambda e: None).sample("d", "r2", T0, _hung(1)),
                         _answered().sample("d", "r1", T0), look=1)
    m = analysis.unanswered(m, 1, 10.0)
    culprit = m.failing()
    assert culprit is not None and culprit.verdict == "WAITING"
    assert progress._what(culprit).endswith("; 1 canary call unanswered for longer than 10 s, still in flight, "
                                            "counted as failed")


def test_no_call_in_flight_changes_nothing() -> None:
    ev = _answered()
    m = analysis.measure(SPEC, ev.sample("d", "r2", T0), ev.sample("d", "r1", T0), look=1)
    assert analysis.unanswered(m, 0, 10.0) is m


def test_in_flight_keeps_each_request_until_it_ends() -> None:
    calls = InFlight()
    a, b = object(), object()
    calls.begin("d", a, "k1")
    calls.begin("d", b, "k2")
    calls.begin("e", object(), "k1")
    assert calls.calls("d") == [(a, "k1"), (b, "k2")]
    calls.end("d", a)
    calls.end("d", a)  # twice: no harm
    assert calls.calls("d") == [(b, "k2")] and calls.calls("nowhere") == []
