"""Model-call spans to inference events under the three naming schemes (pure mapping)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from lockgate.errors import ConfigError, InvalidEvent
from lockgate.services.otlp import genai

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def span(attrs: dict[str, Any], resource: dict[str, Any] | None = None, *, error: bool = False) -> genai.SpanFacts:
    return genai.SpanFacts(trace_id="0af7651916cd43dd8448eb211c80319c", span_id="b7ad6b7169203331", name="call",
                           start=T0, duration_ns=1_500_000, error=error, status_message="boom" if error else "",
                           attributes=attrs, resource=resource or {"service.name": "shop"})


SEMCONV = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
           "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.usage.input_tokens": 100,
           "gen_ai.usage.output_tokens": 20, "gen_ai.usage.cache_read.input_tokens": 40,
           "gen_ai.usage.cache_creation.input_tokens": 30,
           "gen_ai.response.finish_reasons": ["stop", "length"], "gen_ai.conversation.id": "conv-1"}
# OpenLLMetry (traceloop): the older gen_ai names plus llm.* ones
OPENLLMETRY = {"llm.request.type": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4o",
               "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.usage.prompt_tokens": 100,
               "gen_ai.usage.completion_tokens": 20, "gen_ai.usage.cache_read_input_tokens": 40,
               "gen_ai.usage.cache_creation_input_tokens": 30,
               "gen_ai.completion.0.finish_reason": "stop", "gen_ai.prompt.0.content": "hi",
               "gen_ai.completion.0.content": "hello"}
OPENINFERENCE = {"openinference.span.kind": "LLM", "llm.provider": "openai", "llm.model_name": "gpt-4o",
                 "llm.token_count.prompt": 100, "llm.token_count.completion": 20,
                 "llm.token_count.prompt_details.cache_read": 40, "llm.token_count.prompt_details.cache_write": 30,
                 "input.value": "hi", "output.value": "hello",
                 "session.id": "conv-1"}


@pytest.mark.parametrize("attrs", [SEMCONV, OPENLLMETRY, OPENINFERENCE], ids=["semconv", "openllmetry", "openinference"])
def test_each_scheme_maps_to_the_same_event(attrs: dict[str, Any]) -> None:
    e = genai.to_event(span(attrs), tenant="acme", app="shop")
    assert e is not None
    assert (e.tenant, e.app, e.model, e.provider, e.operation) == ("acme", "shop", "gpt-4o", "openai", "chat")
    assert (e.input_tokens, e.output_tokens, e.cached_tokens, e.cache_write_tokens) == (100, 20, 40, 30)
    assert (e.trace_id, e.span_id, e.time, e.latency_ms, e.status) == (
        "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", T0, 1.5, "ok")
    assert e.source == "otlp" and e.attributes == {"otel.span.name": "call"}


def test_semconv_details() -> None:
    e = genai.to_event(span(SEMCONV), tenant="acme", app="fallback")
    assert e is not None
    assert (e.response_model, e.finish_reason, e.session_id) == ("gpt-4o-2024-08-06", "stop", "conv-1")


def test_contents_are_kept_as_text_or_json() -> None:
    e = genai.to_event(span(OPENLLMETRY), tenant="acme", app="a")
    assert e is not None and (e.prompt, e.response) == ("hi", "hello")
    msgs = [{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]
    e = genai.to_event(span(SEMCONV | {"gen_ai.input.messages": msgs}), tenant="acme", app="a")
    assert e is not None and e.prompt == '[{"role":"user","parts":[{"type":"text","content":"hi"}]}]'


def test_an_openinference_embedding_names_its_model() -> None:
    e = genai.to_event(span({"openinference.span.kind": "EMBEDDING", "embedding.model_name": "text-embedding-3-small",
                             "llm.token_count.prompt": 8}), tenant="acme", app="a")
    assert e is not None and (e.operation, e.model, e.input_tokens) == ("embeddings", "text-embedding-3-small", 8)


def test_the_same_span_is_always_the_same_event() -> None:
    a = genai.to_event(span(SEMCONV), tenant="acme", app="a")
    b = genai.to_event(span(SEMCONV), tenant="acme", app="a")
    assert a is not None and b is not None and a.id == b.id
    assert a.id != genai.event_id("acme", "0af7651916cd43dd8448eb211c80319c", "0000000000000001")
    other = genai.to_event(span(SEMCONV), tenant="globex", app="a")
    assert other is not None and other.id != a.id  # the same ids from another tenant: another event


@pytest.mark.parametrize("attrs", [
    {"http.route": "/ask"},
    {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search"},
    {"gen_ai.operation.name": "invoke_agent", "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 5},
    {"openinference.span.kind": "CHAIN", "llm.model_name": "gpt-4o"},
    {"openinference.span.kind": "TOOL"},
    {"llm.request.type": "unknown"},
    {"gen_ai.operation.name": "something_new"},  # unknown and no model: not a call we can account for
])
def test_spans_that_are_not_model_calls_make_no_event(attrs: dict[str, Any]) -> None:
    assert genai.to_event(span(attrs), tenant="acme", app="a") is None


@pytest.mark.parametrize(("attrs", "op"), [
    ({"openinference.span.kind": "EMBEDDING", "embedding.model_name": "e"}, "embeddings"),
    ({"llm.request.type": "completion"}, "text_completion"),
    ({"llm.request.type": "embedding"}, "embeddings"),
    ({"gen_ai.operation.name": "generate_content"}, "generate_content"),
    ({"gen_ai.system": "anthropic", "gen_ai.request.model": "claude"}, "chat"),  # no operation named
])
def test_operations(attrs: dict[str, Any], op: str) -> None:
    assert genai.operation(attrs) == op


def test_an_error_span_is_an_error_event() -> None:
    e = genai.to_event(span(SEMCONV, error=True), tenant="acme", app="a")
    assert e is not None and (e.status, e.error_type) == ("error", "boom")
    e = genai.to_event(span(SEMCONV | {"error.type": "RateLimitError"}, error=True), tenant="acme", app="a")
    assert e is not None and e.error_type == "RateLimitError"


def test_the_app_is_the_keys_and_release_and_deployment_from_lockgate_names() -> None:
    # service.name names a service, not always its lockgate app; lockgate.app naming another app is refused
    # at the request (domain.decode), so the event's app is the API key's.
    resource = {"service.name": "shop-api", "lockgate.app": "checkout", "lockgate.deployment": "web",
                "lockgate.release": "shop-v2"}
    e = genai.to_event(span(SEMCONV, resource), tenant="acme", app="checkout")
    # no variant unless the span names one: no router chose an arm for it (before, "stable")
    assert e is not None and (e.app, e.deployment, e.release, e.variant) == ("checkout", "web", "shop-v2", "")
    assert genai.other_app(span(SEMCONV, resource), "checkout") is None
    assert genai.other_app(span(SEMCONV, resource), "shop") == "checkout"
    assert genai.other_app(span(SEMCONV | {"lockgate.app": "billing"}, resource), "checkout") == "billing"
    e = genai.to_event(span(SEMCONV | {"lockgate.variant": "canary"}, {"service.name": "bad name!"}),
                       tenant="acme", app="keys-app")
    assert e is not None and (e.app, e.variant) == ("keys-app", "canary")


def test_token_counts_arrive_as_numbers_or_numeric_strings() -> None:
    e = genai.to_event(span(SEMCONV | {"gen_ai.usage.input_tokens": "7", "gen_ai.usage.output_tokens": 3.0}),
                       tenant="acme", app="a")
    assert e is not None and (e.input_tokens, e.output_tokens) == (7, 3)


@pytest.mark.parametrize("attrs", [
    SEMCONV | {"gen_ai.usage.input_tokens": "many"},
    SEMCONV | {"gen_ai.usage.output_tokens": True},
    SEMCONV | {"lockgate.deployment": "not a name"},
])
def test_values_the_contract_refuses_are_reported(attrs: dict[str, Any]) -> None:
    with pytest.raises(InvalidEvent):
        genai.to_event(span(attrs), tenant="acme", app="a")


# A superscript two is a digit to str.isdigit() (int() then failed in its own words), and full-width 123 was read as
# 123 tokens (probe s1): a count is ASCII digits.
@pytest.mark.parametrize("count", ["\u00b2", "\uff11\uff12\uff13", "\u0663"])
def test_a_token_count_is_ascii_digits(count: str) -> None:
    with pytest.raises(InvalidEvent, match="gen_ai.usage.input_tokens is .* not a token count"):
        genai.to_event(span(SEMCONV | {"gen_ai.usage.input_tokens": count}), tenant="acme", app="a")


def test_either_claim_naming_another_tenant_is_found() -> None:
    assert genai.other_tenant(span({}, {"lockgate.tenant": "acme"}), "acme") is None
    assert genai.other_tenant(span({}, {"lockgate.tenant": "acme"}), "globex") == "acme"
    assert genai.other_tenant(span({"lockgate.tenant": "globex"}, {"lockgate.tenant": "acme"}), "acme") == "globex"
    # The span saying the key's tenant used to hide the resource naming another.
    assert genai.other_tenant(span({"lockgate.tenant": "acme"}, {"lockgate.tenant": "globex"}), "acme") == "globex"
    assert genai.other_tenant(span({}), "acme") is None


# Probe p61 F3: a GenAI client span of a call made through a lockgate router is that router's call, which its own
# event bills: the span's event is kept and marked, and the cost ledger leaves it out.
ROUTERS = genai.Routers.of("router.internal:8080, llm.example.com, https://gw.example.com/v1",
                           bound=["http://127.0.0.1:41234", "http://0.0.0.0:9090"])


@pytest.mark.parametrize(("endpoint", "through_router"), [
    ({"server.address": "127.0.0.1", "server.port": 41234}, True),  # the bound router, as the client named it
    ({"server.address": "localhost", "server.port": 41234}, True),  # loopback names are one
    ({"server.address": "::1", "server.port": 9090}, True),  # a router on every interface, called here
    ({"server.address": "127.0.0.1", "server.port": 41235}, False),  # another port of the machine
    ({"server.address": "Router.Internal.", "server.port": "8080"}, True),
    ({"server.address": "router.internal"}, False),  # no port: 80 or 443, not the listed 8080
    ({"server.address": "gw.example.com"}, True),  # no port, and the router listed at 443
    ({"server.address": "llm.example.com", "server.port": 7000}, True),  # a host listed alone: any port
    ({"url.full": "https://gw.example.com/v1/chat/completions"}, True),
    ({"gen_ai.openai.api_base": "http://router.internal:8080/v1/"}, True),  # OpenLLMetry's base URL
    ({"gen_ai.openai.api_base": "https://api.openai.com/v1/"}, False),
    ({"server.address": "api.openai.com"}, False),
    ({}, False),  # a span naming no endpoint (OpenInference's) is billed as it comes
])
def test_a_call_a_span_says_went_through_a_router_is_marked_billed_by_it(endpoint: dict[str, Any],
                                                                        through_router: bool) -> None:
    event = genai.to_event(span(SEMCONV | endpoint), tenant="acme", app="shop", routers=ROUTERS)
    assert event is not None and event.billed_by_router is through_router
    assert (event.input_tokens, event.output_tokens) == (100, 20)  # kept whole: drift reads them
    # Without routers known (no router in the process, none listed) nothing is marked.
    assert not genai.to_event(span(SEMCONV | endpoint), tenant="acme", app="shop").billed_by_router


def test_a_router_address_that_is_none_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match="'router:http' is not a host, host:port or URL"):
        genai.Routers.of("router:8080, router:http")
