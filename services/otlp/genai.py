"""Which spans are model calls, and the inference event each one is (pure: no I/O).

Three naming schemes describe a model call on a span, and all three map to one InferenceEvent:
- the OpenTelemetry GenAI semantic conventions (`gen_ai.operation.name`, `gen_ai.request.model`,
  `gen_ai.usage.input_tokens`, ...), with the names they replaced (`gen_ai.system`,
  `gen_ai.usage.prompt_tokens`, ...) that OpenLLMetry and older instrumentations still send;
- OpenLLMetry's own (`llm.request.type`, `llm.usage.*`, `gen_ai.prompt.0.content`, ...);
- OpenInference's (`openinference.span.kind`, `llm.model_name`, `llm.token_count.prompt`, ...).
The first name present wins, in the order of each tuple below.

Only model calls become events: agent, tool, chain and retriever spans are stored as spans only,
so the tokens of one call are never billed twice through the spans that wrap it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec

from lockgate.contracts import InferenceEvent
from lockgate.contracts.inference import BILLED_BY, ROUTER_BILLED
from lockgate.errors import ConfigError, InvalidEvent
from lockgate.ids import derived_id
from lockgate.redact import scrub_value

OPERATION = ("gen_ai.operation.name",)
MODEL = ("gen_ai.request.model", "llm.model_name", "embedding.model_name", "llm.request.model",
         "gen_ai.response.model")
RESPONSE_MODEL = ("gen_ai.response.model", "llm.response.model")
PROVIDER = ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system", "llm.vendor")
INPUT_TOKENS = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.token_count.prompt",
                "llm.usage.prompt_tokens")
OUTPUT_TOKENS = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens", "llm.token_count.completion",
                 "llm.usage.completion_tokens")
CACHED_TOKENS = ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens",
                 "llm.token_count.prompt_details.cache_read")
# Prompt-cache writes, inside the input as the reads are and billed dearer (Anthropic's 1.25x). No scheme tells a write
# kept an hour (2x) from one kept 5 minutes: priced as 5-minute writes, as a usage giving only the total is.
CACHE_WRITE_TOKENS = ("gen_ai.usage.cache_creation.input_tokens", "gen_ai.usage.cache_creation_input_tokens",
                      "llm.token_count.prompt_details.cache_write")
FINISH_REASON = ("gen_ai.response.finish_reasons", "gen_ai.completion.0.finish_reason", "llm.response.finish_reason")
PROMPT = ("gen_ai.input.messages", "gen_ai.prompt", "gen_ai.prompt.0.content", "input.value")
RESPONSE = ("gen_ai.output.messages", "gen_ai.completion", "gen_ai.completion.0.content", "output.value")
SESSION = ("gen_ai.conversation.id", "session.id")
# lockgate's own names for what no convention says: set them on the resource or on the span
TENANT = "lockgate.tenant"
APP = "lockgate.app"
DEPLOYMENT, RELEASE, VARIANT = "lockgate.deployment", "lockgate.release", "lockgate.variant"

# The endpoint a client span called: the GenAI conventions' `server.address` and `server.port` (what the
# OpenTelemetry OpenAI instrumentation sets from the client's base_url, leaving out port 443, and httpx every
# scheme's default port), the HTTP conventions' `url.full`, OpenLLMetry's `gen_ai.openai.api_base` (the base URL).
# OpenInference records none: its spans are billed as they come.
SERVER_ADDRESS, SERVER_PORT = "server.address", "server.port"
ENDPOINT_URLS = ("url.full", "gen_ai.openai.api_base")

# gen_ai.operation.name values that are a call to a model (the others: agents, tools, workflows)
MODEL_CALLS = frozenset({"chat", "text_completion", "generate_content", "embeddings", "completion", "embedding",
                         "rerank"})
NOT_MODEL_CALLS = frozenset({"execute_tool", "invoke_agent", "create_agent", "invoke_workflow"})
# OpenInference span kinds and OpenLLMetry request types, as GenAI operation names
_OPENINFERENCE = {"LLM": "chat", "EMBEDDING": "embeddings", "RERANKER": "rerank"}
_PREFIXES = ("gen_ai.", "llm.", "openinference.", "embedding.")
_OPENLLMETRY = {"chat": "chat", "completion": "text_completion", "embedding": "embeddings", "rerank": "rerank"}


@dataclass(frozen=True)
class SpanFacts:
    """What the mapping reads from one span: its ids, times, status and typed attributes."""

    trace_id: str
    span_id: str
    name: str
    start: datetime
    duration_ns: int
    error: bool
    status_message: str
    attributes: Mapping[str, Any]
    resource: Mapping[str, Any]


_LOOPBACK = "localhost"  # every loopback name (127.0.0.1, ::1, localhost) as one: the same machine's listener
_WILDCARD = frozenset({"", "0.0.0.0", "::"})
_DEFAULT_PORTS = frozenset({80, 443})  # what a span naming no port may have called (the instrumentations leave them out)


def _host(name: str) -> str:
    """A host name as compared: lower case, without IPv6 brackets or a trailing dot, loopback names as one."""
    host = name.strip().lower().strip("[]").rstrip(".")
    if host == "localhost":
        return _LOOPBACK
    try:
        return _LOOPBACK if ipaddress.ip_address(host).is_loopback else host
    except ValueError:
        return host


def _port(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        port = int(value)
    except (TypeError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def _url_endpoint(url: str) -> tuple[str, int | None] | None:
    """(host, port) of a URL (its scheme's port when it names none), None if it names no host."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return _host(parts.hostname), port or {"http": 80, "https": 443}.get(parts.scheme.lower())


@dataclass(frozen=True)
class Routers:
    """The endpoints clients reach lockgate's routers at: (host, port) pairs, a port None for any of the host's."""

    endpoints: frozenset[tuple[str, int | None]] = frozenset()

    @classmethod
    def of(cls, listed: str, bound: Iterable[str] = ()) -> Routers:
        """From `router_addresses` (comma-separated `host`, `host:port` or URLs) and the URLs routers of this
        process are bound at (`http://127.0.0.1:8080`; one bound to every interface is reached at loopback names
        here, any other name must be listed); ConfigError naming an entry that is none of these."""
        found: set[tuple[str, int | None]] = set()
        for url in bound:
            endpoint = _url_endpoint(url)
            if endpoint is not None:
                host, port = endpoint
                found.add((_LOOPBACK if host in _WILDCARD else host, port))
        for entry in (e.strip() for e in listed.split(",")):
            if not entry:
                continue
            # `host` and `host:port` as the authority of a URL of no scheme: no port is any port of the host
            endpoint = _url_endpoint(entry if "://" in entry else f"//{entry}")
            if endpoint is None:
                raise ConfigError(f"router_addresses: {entry!r} is not a host, host:port or URL (e.g. "
                                  "router.internal:8080 or https://llm.example.com/v1)")
            found.add(endpoint)
        return cls(frozenset(found))

    def called(self, attrs: Mapping[str, Any]) -> bool:
        """The span says it called one of these endpoints. One naming none is no router's call; one naming a host
        but no port (the instrumentations leave 80 and 443 out) matches that host listed alone, at 80 or at 443."""
        if not self.endpoints:
            return False
        address = attrs.get(SERVER_ADDRESS)
        if isinstance(address, str) and address.strip():
            endpoint: tuple[str, int | None] | None = (_host(address), _port(attrs.get(SERVER_PORT)))
        else:
            url = first(attrs, ENDPOINT_URLS)
            endpoint = _url_endpoint(url) if isinstance(url, str) else None
        if endpoint is None:
            return False
        host, port = endpoint
        if (host, None) in self.endpoints:
            return True
        if port is not None:
            return (host, port) in self.endpoints
        return any((host, p) in self.endpoints for p in _DEFAULT_PORTS)


NO_ROUTERS = Routers()


def first(attrs: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    """The value of the first of `names` that is set (None if none is)."""
    for name in names:
        value = attrs.get(name)
        if value is not None and value != "":
            return value
    return None


def operation(attrs: Mapping[str, Any]) -> str | None:
    """The GenAI operation of a span that is a model call, or None for every other span."""
    if not any(k.startswith(_PREFIXES) for k in attrs):  # most spans: not worth the lookups below
        return None
    op = first(attrs, OPERATION)
    if op is not None:
        op = str(op)
        return None if op in NOT_MODEL_CALLS else op if op in MODEL_CALLS or first(attrs, MODEL) else None
    kind = attrs.get("openinference.span.kind")
    if kind is not None:
        return _OPENINFERENCE.get(str(kind).upper())
    request_type = attrs.get("llm.request.type")
    if request_type is not None:
        return _OPENLLMETRY.get(str(request_type).lower())
    # An instrumentation that names the model (and a provider) but no operation: a model call all the same.
    return "chat" if first(attrs, MODEL) is not None and first(attrs, PROVIDER) is not None else None


def other_tenant(span: SpanFacts, tenant: str) -> str | None:
    """A tenant other than `tenant` that the span or its resource says it belongs to, if either does.

    Each claim counts: a span naming `tenant` must not hide a resource naming another (or the reverse)."""
    for attrs in (span.attributes, span.resource):
        value = attrs.get(TENANT)
        if value is not None and str(value) != tenant:
            return str(value)
    return None


def other_app(span: SpanFacts, app: str) -> str | None:
    """An app other than `app` (the API key's) that the span or its resource names in `lockgate.app`, if either
    does. `service.name` names the service, which is not always its lockgate app: it never decides."""
    for attrs in (span.attributes, span.resource):
        value = attrs.get(APP)
        if value is not None and str(value) != app:
            return str(value)
    return None


def _count(span: SpanFacts, names: tuple[str, ...]) -> int:
    value = first(span.attributes, names)
    if value is None:
        return 0
    if isinstance(value, bool):
        raise InvalidEvent(f"{names[0]} is {value!r}, not a token count")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value  # out-of-range counts are refused, with the field named, by the contract check
    # ASCII digits only: str.isdigit() is also true of "²" (int() then failed with its own words) and of "１２３",
    # which int() read as 123 tokens (probe s1).
    if isinstance(value, str) and (digits := value.strip().removeprefix("-")).isascii() and digits.isdigit():
        return int(value)
    raise InvalidEvent(f"{names[0]} is {value!r}, not a token count")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # finish reasons: the first one, as the contract documents
        return _text(value[0]) if value else ""
    return str(value)


def _content(value: Any) -> str | None:
    # Structured messages (gen_ai.input.messages as an array of maps) are kept as their JSON, each string scrubbed
    # before it is encoded (the event's own scrub reads JSON text, where a newline before a secret is `\n`).
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return msgspec.json.encode(scrub_value(value)).decode()


def event_id(tenant: str, trace_id: str, span_id: str) -> str:
    """The event id of a span: the same span re-sent (an exporter's retry) is the same event, and a span
    another tenant sends under the same ids is another event (events are stored once per id, so ids
    shared across tenants let one tenant's span erase another's)."""
    return derived_id("otlp-span", tenant, trace_id, span_id)


def to_event(span: SpanFacts, *, tenant: str, app: str, routers: Routers = NO_ROUTERS) -> InferenceEvent | None:
    """The inference event of a model-call span (None for other spans); InvalidEvent with the reason
    when the span is a model call whose values the contract refuses (a bad name, a non-numeric count).

    A call the span says went to one of `routers` is marked billed by the router (`lockgate.billed_by`): the
    router's own event of it bills it, and this one is kept for drift and traces, out of the cost ledger."""
    attrs = span.attributes
    op = operation(attrs)
    if op is None:
        return None
    marks = {BILLED_BY: ROUTER_BILLED} if routers.called(attrs) else {}
    where = {**span.resource, **attrs}  # lockgate.* names may be set on either, the span's win
    error_type = _text(attrs.get("error.type")) or (span.status_message[:200] if span.error else "")
    try:
        return InferenceEvent(
            id=event_id(tenant, span.trace_id, span.span_id),
            source="otlp",
            time=span.start,
            tenant=tenant,
            trace_id=span.trace_id,
            span_id=span.span_id,
            app=app,  # the API key's: another named in lockgate.app refused the request already
            deployment=_text(where.get(DEPLOYMENT)),
            release=_text(where.get(RELEASE)),
            variant=_text(where.get(VARIANT)),  # none unless the span says: no router chose an arm for it
            model=_text(first(attrs, MODEL)),
            response_model=_text(first(attrs, RESPONSE_MODEL)),
            provider=_text(first(attrs, PROVIDER)),
            operation=op,
            input_tokens=_count(span, INPUT_TOKENS),
            output_tokens=_count(span, OUTPUT_TOKENS),
            cached_tokens=_count(span, CACHED_TOKENS),
            cache_write_tokens=_count(span, CACHE_WRITE_TOKENS),
            latency_ms=span.duration_ns / 1e6,
            status="error" if span.error else "ok",
            error_type=error_type,
            finish_reason=_text(first(attrs, FINISH_REASON)),
            prompt=_content(first(attrs, PROMPT)),
            response=_content(first(attrs, RESPONSE)),
            session_id=_text(first(attrs, SESSION)),
            attributes={"otel.span.name": span.name, **marks},
        )
    except ValueError as exc:  # a name breaking the grammar (raised by the contract's __post_init__)
        raise InvalidEvent(str(exc)) from None
