"""Pure mapping from contracts to ClickHouse columns."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from lockgate.contracts import DeadLetter, InferenceEvent, SpanRecord
from lockgate.redact import RedactMode, redact, scrub_bytes, scrub_mapping, scrub_secrets

INFERENCE_COLUMNS = (
    "id", "time", "tenant", "app", "deployment", "variant", "release", "model", "response_model",
    "provider", "operation", "input_tokens", "output_tokens", "cached_tokens", "latency_ms", "ttft_ms",
    "status", "error_type", "finish_reason", "prompt", "response", "user_hash", "session_id",
    "trace_id", "span_id", "source", "attributes", "scores", "msg_id",
)

SPAN_COLUMNS = (
    "Timestamp", "TraceId", "SpanId", "ParentSpanId", "TraceState", "SpanName", "SpanKind", "ServiceName",
    "ResourceAttributes", "ScopeName", "ScopeVersion", "SpanAttributes", "Duration", "StatusCode",
    "StatusMessage", "Events.Timestamp", "Events.Name", "Events.Attributes", "Links.TraceId", "Links.SpanId",
    "Links.TraceState", "Links.Attributes",
)

DEAD_LETTER_COLUMNS = ("id", "time", "origin", "subject", "reason", "error", "payload", "headers", "deliveries")


def inference_columns(events: Sequence[InferenceEvent], mode: RedactMode, msg_ids: Sequence[str]
                      ) -> list[list[Any]]:
    """Column-oriented data for `inference_events`, prompts and responses redacted per `mode`."""
    return [
        [e.id for e in events],
        [e.time for e in events],
        [e.tenant for e in events],
        [e.app for e in events],
        [e.deployment for e in events],
        [e.variant for e in events],
        [e.release for e in events],
        [e.model for e in events],
        [e.response_model for e in events],
        [e.provider for e in events],
        [e.operation for e in events],
        [e.input_tokens for e in events],
        [e.output_tokens for e in events],
        [e.cached_tokens for e in events],
        [e.latency_ms for e in events],
        [e.ttft_ms for e in events],
        [e.status for e in events],
        [e.error_type for e in events],
        [e.finish_reason for e in events],
        [redact(e.prompt, mode) for e in events],
        [redact(e.response, mode) for e in events],
        [e.user_hash for e in events],
        # Producers other than the SDK and the router may publish unscrubbed events: scrub here too.
        [scrub_secrets(e.session_id) if e.session_id else "" for e in events],
        [e.trace_id for e in events],
        [e.span_id for e in events],
        [e.source for e in events],
        [scrub_mapping(e.attributes) if e.attributes else {} for e in events],
        [e.scores for e in events],
        list(msg_ids),
    ]


def span_columns(spans: Sequence[SpanRecord]) -> list[list[Any]]:
    """Column-oriented data for `otel_traces` (Nested Events/Links as parallel arrays)."""
    return [
        [s.timestamp for s in spans],
        [s.trace_id for s in spans],
        [s.span_id for s in spans],
        [s.parent_span_id for s in spans],
        [s.trace_state for s in spans],
        [s.name for s in spans],
        [s.kind for s in spans],
        [s.service for s in spans],
        [s.resource for s in spans],
        [s.scope_name for s in spans],
        [s.scope_version for s in spans],
        [s.attributes for s in spans],
        [s.duration_ns for s in spans],
        [s.status_code for s in spans],
        [s.status_message for s in spans],
        [[ev[0] for ev in s.events] for s in spans],
        [[ev[1] for ev in s.events] for s in spans],
        [[ev[2] for ev in s.events] for s in spans],
        [[ln[0] for ln in s.links] for s in spans],
        [[ln[1] for ln in s.links] for s in spans],
        [[ln[2] for ln in s.links] for s in spans],
        [[ln[3] for ln in s.links] for s in spans],
    ]


def dead_letter_row(letter: DeadLetter) -> list[Any]:
    """One `dead_letters` row, secrets scrubbed; the payload is kept as text when it is UTF-8, else escaped."""
    payload = scrub_bytes(letter.payload).decode("utf-8", errors="backslashreplace")
    return [letter.id, letter.time, letter.origin, letter.subject, scrub_secrets(letter.reason),
            scrub_secrets(letter.error), payload, scrub_mapping(letter.headers), letter.deliveries]


def batch_token(msg_tokens: Sequence[str]) -> str:
    """Deduplication token of an insert made of several messages (order-independent)."""
    digest = hashlib.sha256("\n".join(sorted(msg_tokens)).encode()).hexdigest()
    return f"batch-{digest[:40]}"


def linked_traces(events: Sequence[InferenceEvent], parent_trace: str, limit: int = 128) -> list[tuple[str, str]]:
    """(trace_id, span_id) of other traces in a batch, so the sink's span links back to each request."""
    seen: set[str] = {parent_trace}
    out = []
    for e in events:
        if e.trace_id and e.span_id and e.trace_id not in seen:
            seen.add(e.trace_id)
            out.append((e.trace_id, e.span_id))
            if len(out) >= limit:
                break
    return out
