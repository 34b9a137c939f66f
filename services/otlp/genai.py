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

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from lockgate.contracts import InferenceEvent
from lockgate.errors import InvalidEvent
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


def to_event(span: SpanFacts, *, tenant: str, app: str) -> InferenceEvent | None:
    """The inference event of a model-call span (None for other spans); InvalidEvent with the reason
    when the span is a model call whose values the contract refuses (a bad name, a non-numeric count)."""
    attrs = span.attributes
    op = operation(attrs)
    if op is None:
        return None
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
            attributes={"otel.span.name": span.name},
        )
    except ValueError as exc:  # a name breaking the grammar (raised by the contract's __post_init__)
        raise InvalidEvent(str(exc)) from None
