"""Spans to bus messages: SpanBatches cut by encoded bytes so that each fits one NATS message, under ids made of
their spans. The one way spans are put on the bus: the OTLP receiver's (an application's spans) and the exporter of
lockgate's own tracing (`lockgate.telemetry`) both cut here, with the outbox's cut (`chunked`).

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

from lockgate.codec import encode
from lockgate.contracts import SpanBatch, SpanRecord
from lockgate.outbox import BATCH_BYTES, chunked

BATCH_SPANS = 2000
# Bytes of a connection's max_payload kept for a SpanBatch's envelope (type, id, source, time, tenant...: a few
# hundred bytes) and its message's headers (Nats-Msg-Id, traceparent), which nats-server counts too.
ROOM = 4096


def span_bytes(max_payload: int) -> int:
    """The bytes of spans one message may carry on a connection whose server takes `max_payload`: as many as an
    outbox batch of events (BATCH_BYTES), or fewer on a server configured below it."""
    return max(1, min(BATCH_BYTES, max_payload - ROOM))


class Message(NamedTuple):
    """One bus message of spans: its Nats-Msg-Id, its bytes (an encoded SpanBatch), and how many spans it carries."""

    id: str
    data: bytes
    spans: int


def batch_id(source: str, tenant: str, app: str, spans: Sequence[SpanRecord]) -> str:
    """A SpanBatch id that is a function of its sender (source, tenant and app) and spans: the same spans published
    again (a request re-sent after a lost answer, a publish retried) go under the same Nats-Msg-Id, and are stored
    once; another tenant's or app's spans under the same ids are not mistaken for them (JetStream and the store
    would drop them as their duplicate)."""
    h = hashlib.sha256(tenant.encode() + b"\x00" + app.encode() + b"\x00")
    for s in spans:
        h.update(bytes.fromhex(s.trace_id + s.span_id))
    return f"{source}-{h.hexdigest()[:40]}"


def span_batches(spans: Sequence[SpanRecord], *, source: str, tenant: str = "default", app: str = "",
                 max_bytes: int = BATCH_BYTES, max_spans: int = BATCH_SPANS) -> tuple[list[Message], list[SpanRecord]]:
    """The bus messages of `spans`, in order, each a SpanBatch of at most `max_spans` spans whose encoded bytes add
    up to at most `max_bytes`; and the spans that fit no message, each over `max_bytes` encoded alone."""
    if not spans:
        return [], []

    def message(part: Sequence[SpanRecord]) -> Message:
        batch = SpanBatch(id=batch_id(source, tenant, app, part), source=source, tenant=tenant, spans=list(part))
        return Message(batch.id, encode(batch), len(part))

    if len(spans) <= max_spans:
        whole = message(spans)
        if len(whole.data) <= max_bytes:  # the usual batch: each span encoded once
            return [whole], []
    sizes = [len(encode(s)) + 1 for s in spans]  # the separator counted
    fit = [(s, n) for s, n in zip(spans, sizes, strict=True) if n <= max_bytes]
    too_large = [s for s, n in zip(spans, sizes, strict=True) if n > max_bytes]
    parts = chunked([s for s, _ in fit], [n for _, n in fit], max_items=max_spans, max_bytes=max_bytes)
    return [message(part) for part in parts], too_large
