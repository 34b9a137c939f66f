"""Shadow mirror budget and the served-versus-shadow comparison, pure, on an injected clock; how a copy is asked
for and its stream read."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from lockgate.contracts import InferenceEvent
from lockgate.contracts.inference import REQUEST_DIGEST
from lockgate.services.router import shadowstats
from lockgate.services.router.cache import MAX_KEYED_BYTES
from lockgate.services.router.domain import Target
from lockgate.services.router.shadow import _Answer, _candidate_body, _digested, _read_stream
from lockgate.services.router.shadowstats import NANO, Budget, Ledger, Spend, spend_key
from lockgate.services.router.strategy import ShadowSpec

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _admit(budget: Budget, n: int, draw: float = 0.0) -> int:
    return sum(budget.admit(draw) for _ in range(n))


def test_sample_share_is_what_the_draw_says() -> None:
    b = Budget(ShadowSpec(sample=0.25, max_rps=1e4, max_concurrency=256), Clock())
    admitted = sum(b.admit(i / 100) for i in range(100))
    assert admitted == 25 and b.skipped == {"not_sampled": 75}


def test_rate_is_a_token_bucket_with_one_second_of_burst() -> None:
    clock = Clock()
    b = Budget(ShadowSpec(sample=1.0, max_rps=5, max_concurrency=256), clock)
    assert _admit(b, 20) == 5 and b.skipped["over_max_rps"] == 15
    clock.now += 0.5  # two and a half tokens back
    assert _admit(b, 20) == 2
    clock.now += 100  # idle for long: still one second's burst only
    assert _admit(b, 20) == 5 and b.sent == 12


def test_concurrency_and_requests_caps_and_a_refused_copy_takes_nothing() -> None:
    clock = Clock()
    b = Budget(ShadowSpec(sample=1.0, max_rps=3, max_concurrency=2, max_requests=5), clock)
    assert _admit(b, 4) == 2 and b.skipped["over_max_concurrency"] == 2
    b.refused("over_max_cost")  # its cost did not fit: no slot, request or rate token taken
    assert (b.in_flight, b.sent, b.tokens, b.skipped["over_max_cost"]) == (1, 1, 2.0, 1)
    b.done()
    clock.now += 1.0
    assert _admit(b, 2) == 2
    b.done()
    b.done()
    clock.now += 1.0
    assert _admit(b, 5) == 2 and b.sent == 5 and b.skipped["over_max_requests"] == 3


def test_the_rollouts_spend_reserves_worst_cases_up_to_the_cap_and_settles_to_real_costs() -> None:
    spend: Spend | None = None
    taken = 0
    while (after := shadowstats.reserve(spend, 3 * NANO // 1000, 0.01)) is not None:  # 0.003 USD each
        spend, taken = after, taken + 1
    assert taken == 3 and spend == Spend(spent=9 * NANO // 1000)  # a fourth would pass 0.01
    spend = shadowstats.settle(spend, 3 * NANO // 1000, NANO // 1000)  # one cost 0.001: its room is back
    assert shadowstats.reserve(spend, 3 * NANO // 1000, 0.01) == Spend(spent=10 * NANO // 1000)
    assert shadowstats.reserve(None, NANO // 100 + 1, 0.01) is None  # one copy's worst case over the cap alone
    assert shadowstats.settle(None, 5, 0) == Spend(spent=0)  # never below nothing


def test_each_rollout_has_a_spend_of_its_own_no_gateway_budget_can_take() -> None:
    a = spend_key("chat", "cand", 1700000000.123456)
    assert a == "_shadow.chat.cand.1700000000123456"
    assert spend_key("chat", "cand", 1700000001.0) != a and spend_key("chat.v2", "cand", 1700000000.123456) != a
    assert spend_key("chat.v2", "c", 1.0).count(".") == 3  # names are tokens: the parts stay apart


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
    assert ledger.summary("chat").pairs == 0 and ledger.summary("chat").shadow_cost_usd == 0.0


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


def test_a_failed_call_a_retry_went_past_pairs_with_no_shadow() -> None:
    """Probe p78: a stable call the router retried is an event of its own sharing its request's trace (`superseded`):
    pending in the answer's place, it was compared with the shadow as stable's answer (an error of 0 tokens)."""
    from msgspec.structs import replace

    from lockgate.contracts.inference import ATTEMPT, SUPERSEDED

    ledger = Ledger(lambda e: 0.002 if e.variant == "shadow" else None)
    ledger.start("chat", "cand")
    failed = replace(_event("1" * 32, "stable", "", status="error", error_type="503", out=0),
                     attributes={ATTEMPT: SUPERSEDED})
    for event in (_event("1" * 32, "stable", "same"), failed, _event("1" * 32, "shadow", "same")):
        ledger.add("chat", event)
    s = ledger.summary("chat")
    assert (s.pairs, s.served_error_rate, s.exact_match_rate) == (1, 0.0, 1.0)


def test_pairs_read_back_from_the_record_compare_all_but_the_answers_it_does_not_keep() -> None:
    """The record (the `served_events` query a starting router reads back) keeps no answer: such a pair counts for
    errors, tokens, latency and cost, not for exact match or length (an empty answer on both sides would match)."""
    ledger = Ledger(lambda e: 0.002 if e.variant == "shadow" else None)
    ledger.start("chat", "cand")
    ledger.add("chat", _event("1" * 32, "stable", "same"))
    ledger.add("chat", _event("1" * 32, "shadow", "same"))
    ledger.add("chat", _event("2" * 32, "stable", None, out=3))  # type: ignore[arg-type]  # read back
    ledger.add("chat", _event("2" * 32, "shadow", None, out=5, latency=30.0))  # type: ignore[arg-type]
    ledger.add("chat", _event("3" * 32, "stable", None))  # type: ignore[arg-type]
    ledger.add("chat", _event("3" * 32, "shadow", None, status="error"))  # type: ignore[arg-type]
    s = ledger.summary("chat")
    assert (s.shadow_events, s.pairs, s.text_pairs) == (3, 3, 1)
    assert s.exact_match_rate == 1.0 and s.mean_length_delta == 0.0  # of the pair whose answers are known
    assert s.shadow_error_rate == pytest.approx(1 / 3) and s.mean_output_tokens_delta == pytest.approx(2 / 3)
    assert s.shadow_cost_usd == pytest.approx(0.006)
    assert [p.exact_match for p in s.recent] == [True, None, None]


@pytest.mark.parametrize(("stream", "sent"), [
    (True, {"stream": True, "stream_options": {"include_usage": True}}),
    (False, {"stream": False}),
])
def test_a_copy_is_streamed_as_the_clients_request_was(stream: bool, sent: dict[str, object]) -> None:
    # Made unstreamed, a copy of a long streamed answer waited for the whole answer as its first byte, and failed
    # where the served call did not (probe p9 F2). Streamed, it asks for its usage: the copy's cost is known.
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": not stream,
                       "stream_options": {"include_usage": False}}).encode()
    got = json.loads(_candidate_body(body, Target(release="r2", model="m2"), stream))
    assert {k: got.get(k) for k in ("model", *sent)} == {"model": "m2", **sent}
    assert stream or "stream_options" not in got


def _chunk(content: str | None = None, finish: str | None = None, usage: bool = False) -> bytes:
    choices = [] if usage else [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}]
    data: dict[str, object] = {"id": "c", "object": "chat.completion.chunk", "model": "m2", "choices": choices}
    if usage:
        data["usage"] = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    return b"data: " + json.dumps(data).encode() + b"\n"


async def _read(lines: list[bytes]) -> _Answer:
    async def gen() -> AsyncIterator[bytes]:
        for line in lines:
            yield line

    answer = _Answer()
    await _read_stream(gen(), answer)
    return answer


@pytest.mark.parametrize(("lines", "status", "text"), [
    ([_chunk("a "), b"\n", _chunk("b", "stop"), _chunk(usage=True), b"data: [DONE]\n"], ("ok", ""), "a b"),
    ([_chunk("a "), _chunk("b")], ("error", "stream_interrupted:truncated"), "a b"),
    # Its end marker before the choice's finish reason: cut short all the same (before, probe p63 C, ok).
    ([_chunk("a "), _chunk("b"), b"data: [DONE]\n"], ("error", "stream_interrupted:truncated"), "a b"),
    ([_chunk("a "), b'data: {"object": "error", "message": "overloaded"}\n'], ("error", "upstream_stream_error"), "a "),
], ids=["whole", "cut-short", "cut-before-done", "error-event"])
async def test_a_streamed_copy_is_read_as_the_served_stream_is(lines: list[bytes], status: tuple[str, str],
                                                               text: str) -> None:
    answer = await _read(lines)
    assert ((answer.status, answer.error_type), answer.text) == (status, text)
    if status[0] == "ok":
        assert (answer.input_tokens, answer.output_tokens, answer.finish_reason) == (2, 3, "stop")


def test_a_copy_of_a_body_over_the_digest_bound_has_no_digest() -> None:
    # As the served request's own event (proxy.Proxy._record): the digest decodes the body whole on the event loop
    # (probe p18 F4), and a body over MAX_KEYED_BYTES is no eval case.
    target = Target(release="r2", model="m2")

    def body(n: int) -> bytes:
        return json.dumps({"messages": [{"role": "user", "content": "hi"}], "x_pad": [{"a": 1}] * n}).encode()

    small, large = body(10), body(MAX_KEYED_BYTES // 8 + 1)
    assert len(large) > MAX_KEYED_BYTES
    assert _digested({"k": "v"}, small, target)[REQUEST_DIGEST].startswith("sha256:")
    assert _digested({"k": "v"}, large, target) == {"k": "v"}
