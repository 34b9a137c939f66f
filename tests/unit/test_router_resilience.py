"""The router's resilience rules, pure: breaker transitions, retry budget, backoff and Retry-After,
fallback chain, endpoint configuration."""

from __future__ import annotations

import email.utils
import random
from pathlib import Path

import msgspec
import pytest
from multidict import CIMultiDict
from yarl import URL

from lockgate.config import Settings
from lockgate.endpoints import EndpointSpec, resolve
from lockgate.errors import ConfigError
from lockgate.retry import RetryPolicy
from lockgate.services.router.endpoints import Endpoint, Endpoints
from lockgate.services.router.resilience import (
    Breaker,
    BreakerSpec,
    RetryBudget,
    RetrySpec,
    Timeouts,
    Window,
    breaker_failure,
    fallback_chain,
    rank,
    retry_after_s,
    retry_wait,
    retryable_status,
    told_not_to_retry,
)
from lockgate.services.router.upstream import (
    Lane,
    Upstream,
    forward_headers,
    identified,
    returned_headers,
    scrub,
)

# Breaker


def test_breaker_opens_after_consecutive_failures_and_skips_until_cooldown() -> None:
    b = Breaker(BreakerSpec(consecutive_failures=3, cooldown_s=10))
    for t in (0.0, 1.0):
        assert b.allow(t)
        b.record(t, ok=False)
    assert b.state == "closed"
    b.record(2.0, ok=True)  # a success resets the run
    for t in (3.0, 4.0, 5.0):
        b.record(t, ok=False)
    assert b.state == "open"
    assert not b.allow(14.9)  # still cooling down: skip to the fallback at once


def test_breaker_half_open_lets_one_probe_and_its_success_closes() -> None:
    b = Breaker(BreakerSpec(consecutive_failures=1, cooldown_s=10))
    b.record(0.0, ok=False)
    assert b.allow(10.0) and b.state == "half_open"
    assert not b.allow(10.1)  # one probe at a time; the others go to the fallback
    b.record(10.2, ok=True)
    assert b.state == "closed" and b.allow(10.3) and b.allow(10.3)


def test_breaker_failed_probe_reopens_for_another_cooldown() -> None:
    b = Breaker(BreakerSpec(consecutive_failures=1, cooldown_s=10))
    b.record(0.0, ok=False)
    assert b.allow(10.0)
    b.record(10.5, ok=False)
    assert b.state == "open" and not b.allow(20.0) and b.allow(20.5)


def test_breaker_abandoned_probe_frees_the_slot() -> None:
    b = Breaker(BreakerSpec(consecutive_failures=1, cooldown_s=1))
    b.record(0.0, ok=False)
    assert b.allow(1.0)
    b.abandon()  # the client left mid-probe: no verdict, but the next request may probe
    assert b.state == "half_open" and b.allow(1.1)


def test_a_breaker_refuses_while_open_within_its_cooldown_or_probing_and_reading_it_moves_nothing() -> None:
    b = Breaker(BreakerSpec(consecutive_failures=1, cooldown_s=10))
    assert not b.refusing(0.0)  # closed
    b.record(0.0, ok=False)
    assert b.refusing(9.9) and b.state == "open"
    assert not b.refusing(10.0) and b.state == "open"  # its cooldown over: the next request probes
    assert b.allow(10.0) and b.refusing(10.1)  # the probe out: every other request is refused
    b.record(10.2, ok=True)
    assert not b.refusing(10.3)


def test_a_refused_client_is_told_when_the_breaker_lets_a_call_through() -> None:
    b = Breaker(BreakerSpec(consecutive_failures=1, cooldown_s=10))
    assert b.retry_in(0.0) == 0.0  # closed
    b.record(2.0, ok=False)
    assert b.retry_in(5.0) == 7.0  # the rest of its cooldown
    assert b.allow(12.0) and b.retry_in(12.1) == 1.0  # its probe out: its answer decides within its timeouts


def test_breaker_opens_on_failure_ratio_without_a_long_run() -> None:
    b = Breaker(BreakerSpec(consecutive_failures=100, failure_ratio=0.5, min_requests=10, window_s=30))
    for i in range(10):  # alternate: never two failures in a row, half of them failures
        b.record(float(i), ok=i % 2 == 0)
    assert b.state == "open"


def test_breaker_ratio_needs_min_requests_and_forgets_old_calls() -> None:
    b = Breaker(BreakerSpec(consecutive_failures=100, failure_ratio=0.5, min_requests=10, window_s=10))
    for i in range(9):
        b.record(i * 0.1, ok=i % 2 == 0)
    assert b.state == "closed"  # 9 calls: below min_requests
    for i in range(10):  # the earlier failures aged out of the window
        b.record(100.0 + i * 0.1, ok=i != 0)
    assert b.state == "closed"


# Retry budget


def test_budget_caps_retries_at_the_ratio_of_requests() -> None:
    budget = RetryBudget(RetrySpec(budget_ratio=0.2, budget_min=0, budget_window_s=10))
    for _ in range(50):
        budget.request(1.0)
    spent = sum(budget.spend(1.0) for _ in range(100))
    assert spent == 10  # 20% of 50: a failing upstream gets at most that much extra load


def test_budget_min_lets_a_quiet_endpoint_retry_and_refills_with_time() -> None:
    budget = RetryBudget(RetrySpec(budget_ratio=0.2, budget_min=2, budget_window_s=10))
    budget.request(0.0)
    assert [budget.spend(0.0) for _ in range(3)] == [True, True, False]
    assert budget.spend(11.0)  # the window moved on


def test_window_ages_out_old_buckets() -> None:
    w = Window(10.0, buckets=10)
    w.add(0.5, a=3)
    w.add(5.5, a=1, b=1)
    assert w.totals(6.0) == (4, 1)
    assert w.totals(10.6) == (1, 1)  # the first bucket is older than the window
    assert w.totals(100.0) == (0, 0)


# Backoff and Retry-After


def test_retry_wait_uses_the_house_backoff_and_stops_after_the_attempts() -> None:
    spec = RetrySpec(attempts=3, initial_s=0.1, max_s=2.0)
    policy = RetryPolicy(attempts=3, initial_s=0.1, max_s=2.0, jitter=False)
    assert retry_wait(spec, 1, None, 60.0, policy) == pytest.approx(0.1)
    assert retry_wait(spec, 2, None, 60.0, policy) == pytest.approx(0.2)
    assert retry_wait(spec, 3, None, 60.0, policy) is None


def test_retry_wait_jitters_within_the_cap() -> None:
    spec = RetrySpec(attempts=5, initial_s=0.1, max_s=0.3)
    policy = RetryPolicy(attempts=5, initial_s=0.1, max_s=0.3, rng=random.Random(7))
    waits = [retry_wait(spec, 4, None, 60.0, policy) for _ in range(50)]
    assert all(w is not None and 0 <= w <= 0.3 for w in waits) and len(set(waits)) > 1


def test_retry_wait_honours_retry_after_and_refuses_a_long_one() -> None:
    spec = RetrySpec(attempts=3, max_retry_after_s=5)
    assert retry_wait(spec, 1, 3.0, 60.0) == 3.0  # the upstream's wait, not the backoff
    assert retry_wait(spec, 1, 30.0, 60.0) is None  # too long: fall back or tell the client
    assert retry_wait(spec, 1, 3.0, 2.0) is None  # would leave the request no time


def test_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert retry_after_s({"Retry-After": "7"}, now) == 7.0
    assert retry_after_s({"retry-after-ms": "250", "Retry-After": "7"}, now) == 0.25
    date = email.utils.formatdate(now + 12, usegmt=True)
    assert retry_after_s({"Retry-After": date}, now) == pytest.approx(12.0)
    assert retry_after_s({"Retry-After": "soon"}, now) is None
    assert retry_after_s({"Retry-After": "-3"}, now) == 0.0
    # Names in any case (headers are kept as the upstream wrote them).
    assert retry_after_s({"retry-after": "40"}, now) == 40.0
    assert retry_after_s({"RETRY-AFTER": "40"}, now) == 40.0
    assert retry_after_s({"Retry-After-Ms": "250", "retry-after": "7"}, now) == 0.25
    assert retry_after_s({}, now) is None


@pytest.mark.parametrize(("status", "retry", "sick"), [(200, False, False), (400, False, False), (404, False, False),
                                                       (429, True, False), (500, True, True), (503, True, True)])
def test_status_classes(status: int, retry: bool, sick: bool) -> None:
    assert (retryable_status(status), breaker_failure(status)) == (retry, sick)


# Fallback chain


def test_fallback_chain_endpoint_then_named_then_stable() -> None:
    fallbacks = {"canary-ep": "canary-backup", "canary-backup": None, "stable-ep": "stable-backup"}
    assert fallback_chain(["canary-ep", "stable-ep"], fallbacks) == [
        (0, "canary-ep"), (0, "canary-backup"), (1, "stable-ep"), (1, "stable-backup")]


def test_fallback_chain_same_endpoint_for_both_targets_is_kept_per_target() -> None:
    # Canary and stable on one endpoint with different models: stable is still a fallback.
    assert fallback_chain(["shared", "shared"], {}) == [(0, "shared"), (1, "shared")]


def test_fallback_chain_stops_on_cycles_and_at_the_limit() -> None:
    assert fallback_chain(["a"], {"a": "b", "b": "a"}) == [(0, "a"), (0, "b")]
    long = {f"e{i}": f"e{i + 1}" for i in range(10)}
    assert len(fallback_chain(["e0"], long, limit=4)) == 4


# Endpoint configuration


def _endpoints(tmp_path: Path, text: str) -> Endpoints:
    (tmp_path / "endpoints.yaml").write_text(text)
    return Endpoints(Settings(endpoints_file=str(tmp_path / "endpoints.yaml")))


def test_endpoint_file_carries_timeouts_retry_breaker_and_fallback(tmp_path: Path) -> None:
    eps = _endpoints(tmp_path, """
endpoints:
  main:
    url: http://127.0.0.1:1/v1
    timeouts: {connect_s: 0.5, first_byte_s: 4}
    retry: {attempts: 1}
    breaker: {cooldown_s: 2}
    fallback: backup
  backup: {url: http://127.0.0.1:2/v1}
""")
    main = eps.get("main")
    assert main.timeouts == Timeouts(connect_s=0.5, first_byte_s=4)
    assert (main.retry.attempts, main.breaker.cooldown_s, main.fallback) == (1, 2, "backup")
    assert eps.get("backup").timeouts == Timeouts() and eps.fallbacks == {"main": "backup", "backup": None}


def test_default_timeouts_end_a_hung_upstream_well_before_the_old_five_minutes() -> None:
    t = Timeouts()
    assert t.connect_s <= 5 and t.first_byte_s <= 60 and t.between_chunks_s <= 30


@pytest.mark.parametrize(("text", "part"), [
    ("endpoints:\n  a: {url: 'http://127.0.0.1:1/v1', fallback: nowhere}\n", "'nowhere', which is not configured"),
    ("endpoints:\n  a: {url: 'http://127.0.0.1:1/v1', timeouts: {first_byte_s: 0}}\n", "first_byte_s"),
    ("endpoints:\n  a: {url: 'http://127.0.0.1:1/v1', retry: {attempts: 0}}\n", "attempts"),
    ("endpoints:\n  a: {url: 'http://127.0.0.1:1/v1', timeouts: {read: 3}}\n", "read"),
])
def test_bad_resilience_settings_fail_the_start(tmp_path: Path, text: str, part: str) -> None:
    with pytest.raises(ConfigError, match=part):
        _endpoints(tmp_path, text)


# Headers across the gateway and what a client may see (upstream.py's pure helpers)


def test_forwarded_and_returned_headers() -> None:
    out: dict[str, str] = {}
    forward_headers(CIMultiDict({"Authorization": "Bearer lg-key", "OpenAI-Beta": "assistants=v2",
                                 "Idempotency-Key": "k1", "X-Stainless-Lang": "python", "Cookie": "c",
                                 "x-lockgate-user": "alice"}), out)
    assert out == {"OpenAI-Beta": "assistants=v2", "Idempotency-Key": "k1", "X-Stainless-Lang": "python"}
    back = returned_headers(CIMultiDict({"Retry-After": "3", "X-RateLimit-Remaining-Tokens": "10", "x-request-id": "r",
                                         "Set-Cookie": "s", "Server": "nginx", "openai-organization": "org",
                                         "openai-processing-ms": "12", "OpenAI-Version": "2020-10-01"}))
    assert back == {"Retry-After": "3", "X-RateLimit-Remaining-Tokens": "10", "x-request-id": "r",
                    "openai-processing-ms": "12", "OpenAI-Version": "2020-10-01"}


def test_an_answer_without_a_request_id_gets_the_routers_own() -> None:
    assert identified({"X-Request-ID": "r"}) == {"X-Request-ID": "r"}  # the upstream's, in any spelling
    own = identified({"retry-after": "3"})
    assert own["retry-after"] == "3" and own["x-request-id"].startswith("req_lockgate_")
    assert own["x-request-id"] != identified({})["x-request-id"]


def test_upstream_address_is_replaced_by_the_endpoint_id_in_error_bodies() -> None:
    ep = Endpoint(id="prod", url=URL("http://10.0.0.7:8000/v1/chat/completions"))
    body = b'{"error": {"message": "no route at http://10.0.0.7:8000/v1/x (10.0.0.7:8000)"}}'
    assert scrub(body, ep) == b'{"error": {"message": "no route at endpoint prod/v1/x (endpoint prod)"}}'
    assert scrub(b"plain", ep) == b"plain"
    # On a default port the URL names none, and a message may name only the host: both were passed on as they were.
    ep = Endpoint(id="prod", url=URL("https://llm.internal.example/v1"))
    body = b'{"error": {"message": "overloaded: https://llm.internal.example/v1/chat (llm.internal.example)"}}'
    assert scrub(body, ep) == b'{"error": {"message": "overloaded: endpoint prod/v1/chat (endpoint prod)"}}'


@pytest.mark.parametrize(("url", "said", "scrubbed"), [
    # Percent-encoded (a URL quoted in a query or a redirect), either hex case: host and port as one unit.
    ("http://10.0.0.7:8000/v1", "see http%3A%2F%2F10.0.0.7%3A8000%2Fv1", "see endpoint prod%2Fv1"),
    ("http://10.0.0.7:8000/v1", "see http%3a%2f%2f10.0.0.7%3a8000", "see endpoint prod"),
    ("http://10.0.0.7:8000/v1", "10.0.0.7%3A8000 busy", "endpoint prod busy"),
    # JSON-escaped (`\/`), as PHP's json_encode and several Java and .NET serializers write a URL.
    ("http://10.0.0.7:8000/v1", r"at http:\/\/10.0.0.7:8000\/v1", r"at endpoint prod\/v1"),
    ("https://llm.internal/v1", r"at https:\/\/llm.internal\/v1", r"at endpoint prod\/v1"),
    # The upstream naming itself on its own machine: a loopback name with the endpoint's port.
    ("http://vllm.internal:8000/v1", "listening on localhost:8000", "listening on endpoint prod"),
    ("http://vllm.internal:8000/v1", "listening on http://127.0.0.1:8000/v1", "listening on endpoint prod/v1"),
    ("http://vllm.internal:8000/v1", "listening on [::1]:8000, LOCALHOST%3A8000", "listening on endpoint prod, "
                                                                                 "endpoint prod"),
    ("http://[::1]:8000/v1", "at http://[::1]:8000/v1 and http%3A%2F%2F%5B%3A%3A1%5D%3A8000", "at endpoint prod/v1 "
                                                                                             "and endpoint prod"),
    ("http://VLLM.internal:8000/v1", "vllm.INTERNAL:8000 down", "endpoint prod down"),
    # Any host joined to the endpoint's port (probe p7, F4): the listener, the machine's or pod's own name, any
    # spelling of loopback or of an IPv4 address, a URL quoted twice, the port in words or with a leading zero.
    ("http://127.0.0.1:8000/v1", "bind 0.0.0.0:8000; 127.1:8000; vm:8000; ip6-localhost:8000",
     "bind endpoint prod; endpoint prod; endpoint prod; endpoint prod"),
    ("http://llm.internal:8000/v1", "pod vllm-7f9c-x2.ns.svc.cluster.local:8000 or 10.1.2.3:08000, 2130706433:8000",
     "pod endpoint prod or endpoint prod, endpoint prod"),
    ("http://127.0.0.1:8000/v1", "[0:0:0:0:0:0:0:1]:8000 [::ffff:127.0.0.1]:8000 %5B%3A%3Affff%3A10.0.0.7%5D%3A8000",
     "endpoint prod endpoint prod endpoint prod"),
    ("http://127.0.0.1:8000/v1", "see http%253A%252F%252Fvm%253A8000%252Fv1", "see endpoint prod%252Fv1"),
    ("http://127.0.0.1:8000/v1", "host vm port 8000, vm\uff1a8000, vm\uFF1A8000",
     "host vm port of endpoint prod, endpoint prod, endpoint prod"),
    ("http://127.0.0.1:8000/v1", "vm\uff1a8000", "endpoint prod"),
    # Never a number that merely holds the port, nor a bare count or time joined to it, nor a word ending in port.
    ("http://127.0.0.1:8000/v1", "18000 tokens, 80001, 12:8000, x:80000, passport 8000",
     "18000 tokens, 80001, 12:8000, x:80000, passport 8000"),
    # A loopback name without the port, or another port, says nothing about the endpoint: it stays.
    ("http://vllm.internal:8000/v1", "localhost refused; 127.0.0.1:80001 and localhost:80", "localhost refused; "
                                                                                           "127.0.0.1:80001 and "
                                                                                           "localhost:80"),
])
def test_upstream_address_is_replaced_in_every_spelling_an_error_may_use(url: str, said: str, scrubbed: str) -> None:
    """Before (probe p5): only the address as configured was replaced, so a percent-encoded URL kept the port
    (`%3A8000`) and an upstream naming itself `localhost:8000` was passed on whole."""
    ep = Endpoint(id="prod", url=URL(url).joinpath("chat/completions"))
    assert scrub(said.encode(), ep) == scrubbed.encode()


@pytest.mark.parametrize(("provider", "key"), [("openai", "opaque-7f3a9c1e"), ("anthropic", 'op"aque\\7f3a')])
def test_the_endpoints_credential_is_masked_in_error_bodies(provider: str, key: str) -> None:
    """Before: an upstream quoting the key it was sent passed it on to the client (scrub knew only addresses)."""
    access = resolve("prod", EndpointSpec(url="http://10.0.0.7:8000/v1", credential="K", provider=provider),  # type: ignore[arg-type]
                     {"K": key})
    ep = Endpoint(id="prod", url=URL("http://10.0.0.7:8000/v1/chat/completions"), provider=provider,
                  authorization=access.authorization, auth_headers=access.headers)
    for echo in (f"Bearer {key}", key, f"Received API Key = Bearer {key}"):
        body = msgspec.json.encode({"error": {"message": f"bad key {echo} at 10.0.0.7:8000"}})  # a JSON string
        message = msgspec.json.decode(scrub(body, ep))["error"]["message"]  # still JSON, as the client reads it
        assert key not in message and "[REDACTED]" in message and message.endswith("at endpoint prod"), message
        assert key.encode() not in scrub(echo.encode(), ep)  # and quoted raw (a text body, a log line)
    # Other secrets an upstream may quote (another key of the tenant's, say) are masked too.
    assert scrub(b'{"error": {"message": "key sk-proj-abcdefghijklmnopqrstu"}}', ep) == (
        b'{"error": {"message": "key [REDACTED]"}}')


def test_rank_by_price_puts_the_cheapest_first_and_unpriced_last() -> None:
    prices = {"dear": 12.0, "cheap": 0.75, "unknown": None}
    assert rank(["unknown", "dear", "cheap"], "price", prices, {}) == ["cheap", "dear", "unknown"]
    assert rank(["a", "b"], "price", {"a": 1.0, "b": 1.0}, {}) == ["a", "b"]  # a tie keeps the configured order
    assert rank(["dear", "cheap"], "price", {"dear": 2.0, "cheap": 1.0}, {}, explore=0.5, draw=0.0) == [
        "cheap", "dear"]  # declared prices: no exploration


def test_rank_by_latency_measures_every_member_then_takes_the_fastest() -> None:
    assert rank(["slow", "fast", "new"], "latency", {}, {"slow": 0.9, "fast": 0.05, "new": None}) == [
        "new", "fast", "slow"]
    assert rank(["slow", "fast"], "latency", {}, {"slow": 0.9, "fast": 0.05}) == ["fast", "slow"]
    # Exploration: a draw under the share sends this request to the runner-up, the best stays a fallback.
    assert rank(["slow", "fast"], "latency", {}, {"slow": 0.9, "fast": 0.05}, explore=0.05, draw=0.01) == [
        "slow", "fast"]
    assert rank(["slow", "fast"], "latency", {}, {"slow": 0.9, "fast": 0.05}, explore=0.05, draw=0.5) == [
        "fast", "slow"]


def test_a_breaker_counts_one_lanes_calls_only() -> None:
    # Probe p27 F3: keyed by the model alone, another tenant's failing calls opened the breaker a canary's requests and
    # its rollout's hold read. Each (model, tenant, release) lane has its own.
    now = [100.0]
    up = Upstream(clock=lambda: now[0])
    ep = Endpoint(id="shared", url=URL("http://10.0.0.7:8000/v1/chat/completions"),
                  breaker=BreakerSpec(consecutive_failures=2, cooldown_s=30))
    acme, canary, other = Lane("turns", "acme", "a-rel"), Lane("turns", "default", "turns"), Lane("turns", "default", "x")
    for _ in range(2):
        up.health(ep).breaker(acme).record(now[0], False)
    assert up.refused_for(["shared"], acme) == 0.0
    assert up.refused_for(["shared"], canary) is None and up.refused_for(["shared"], other) is None
    assert up.health(ep).breaker(canary).allow(now[0]) and up.health(ep).breaker(Lane("turns")).allow(now[0])
    now[0] += 5
    assert up.refused_for(["shared"], acme) == 5.0


@pytest.mark.parametrize(("headers", "told"), [({"x-should-retry": "false"}, True), ({"X-Should-Retry": " False"}, True),
                                              ({"x-should-retry": "true"}, False), ({}, False), (None, False)])
def test_an_upstreams_no_retry_is_read_in_any_case(headers: dict[str, str] | None, told: bool) -> None:
    """Probe p79 F2: ignored, and the call was made again; it is passed on to the client too."""
    assert told_not_to_retry(headers) is told
    assert returned_headers(headers or {}) == (headers or {})
