"""Shadow mirror budget and the served-versus-shadow comparison, pure, on an injected clock."""

from __future__ import annotations

import pytest

from lockgate.contracts import InferenceEvent
from lockgate.services.router.shadowstats import Budget, Ledger
from lockgate.services.router.strategy import ShadowSpec

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _admit(budget: Budget, n: int, draw: float = 0.0, spent: float = 0.0) -> int:
    return sum(budget.admit(draw, spent) for _ in range(n))


def test_sample_share_is_what_the_draw_says() -> None:
    b = Budget(ShadowSpec(sample=0.25, max_rps=1e4, max_concurrency=256), Clock())
    admitted = sum(b.admit(i / 100, 0.0) for i in range(100))
    assert admitted == 25 and b.skipped == {"not_sampled": 75}


def test_rate_is_a_token_bucket_with_one_second_of_burst() -> None:
    clock = Clock()
    b = Budget(ShadowSpec(sample=1.0, max_rps=5, max_concurrency=256), clock)
    assert _admit(b, 20) == 5 and b.skipped["over_max_rps"] == 15
    clock.now += 0.5  # two and a half tokens back
    assert _admit(b, 20) == 2
    clock.now += 100  # idle for long: still one second's burst only
    assert _admit(b, 20) == 5 and b.sent == 12


def test_concurrency_requests_and_cost_caps() -> None:
    clock = Clock()
    b = Budget(ShadowSpec(sample=1.0, max_rps=1e4, max_concurrency=2, max_requests=5, max_cost_usd=0.01), clock)
    assert _admit(b, 4) == 2 and b.skipped["over_max_concurrency"] == 2
    b.done()
    b.done()
    assert _admit(b, 1, spent=0.01) == 0 and b.skipped["over_max_cost"] == 1
    assert _admit(b, 2) == 2
    b.done()
    b.done()
    assert _admit(b, 5) == 1 and b.sent == 5 and b.skipped["over_max_requests"] == 4


def _event(trace: str, variant: str, response: str, status: str = "ok", latency: float = 10.0,
           out: int = 3, error_type: str = "") -> InferenceEvent:
    return InferenceEvent(tenant="t", app="shop", deployment="chat", variant=variant,
                          release="cand" if variant == "shadow" else "r1", trace_id=trace, response=response,
                          status=status, latency_ms=latency, output_tokens=out, model="m", error_type=error_type)


def test_ledger_pairs_by_trace_in_either_order_and_compares() -> None:
    ledger = Ledger(lambda e: 0.002 if e.variant == "shadow" else 0.001)
    ledger.add("chat", _event("a" * 32, "shadow", "hi"))  # before start: ignored
    ledger.start("chat", "cand")
    ledger.add("chat", _event("1" * 32, "stable", "same answer"))
    ledger.add("chat", _event("1" * 32, "shadow", "same answer", latency=30.0))
    ledger.add("chat", _event("2" * 32, "shadow", "a much longer answer", out=9))  # shadow first
    ledger.add("chat", _event("2" * 32, "stable", "short", latency=20.0))
    ledger.add("chat", _event("3" * 32, "stable", "x"))  # served, not mirrored: never paired
    ledger.add("chat", _event("4" * 32, "shadow", "", status="error"))
    ledger.add("chat", _event("4" * 32, "stable", "y"))
    s = ledger.summary("chat")
    assert (s.candidate, s.shadow_events, s.pairs) == ("cand", 3, 3)
    assert s.exact_match_rate == pytest.approx(1 / 3) and s.shadow_error_rate == pytest.approx(1 / 3)
    assert s.served_error_rate == 0.0 and s.shadow_cost_usd == pytest.approx(0.006)
    assert s.mean_latency_delta_ms == pytest.approx((20 - 10 + 0) / 3)
    assert [p.exact_match for p in s.recent] == [True, False, False]
    assert s.recent[1].length_delta == len("a much longer answer") - len("short")
    assert s.recent[1].output_tokens_delta == 6
    ledger.start("chat", "cand")  # a new rollout starts from nothing
    assert ledger.summary("chat").pairs == 0 and ledger.spent("chat") == 0.0


def test_pairs_the_client_failed_are_not_compared() -> None:
    """As canary analysis: a client's hang-up or a body the upstream refused says nothing of either release."""
    ledger = Ledger(lambda e: 0.002 if e.variant == "shadow" else None)
    ledger.start("chat", "cand")
    ledger.add("chat", _event("1" * 32, "stable", "", status="error", error_type="client_disconnected"))
    ledger.add("chat", _event("1" * 32, "shadow", "hi"))
    ledger.add("chat", _event("2" * 32, "stable", "", status="error", error_type="400"))
    ledger.add("chat", _event("2" * 32, "shadow", "", status="error", error_type="400"))
    ledger.add("chat", _event("3" * 32, "stable", "hi"))
    ledger.add("chat", _event("3" * 32, "shadow", "", status="error", error_type="503"))
    s = ledger.summary("chat")
    assert (s.shadow_events, s.pairs, s.served_error_rate, s.shadow_error_rate) == (3, 1, 0.0, 1.0)
    assert s.shadow_cost_usd == pytest.approx(0.006)  # every shadow call cost, compared or not
