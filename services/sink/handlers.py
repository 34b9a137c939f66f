"""NATS edge of the sink: decoded batches in, idempotent column inserts out."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

from lockgate import metrics
from lockgate.bus import Delivery
from lockgate.contracts import DeadLetter, InferenceEvent, SpanBatch
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.sink import domain


def _token(delivery: Delivery) -> str:
    # Nats-Msg-Id is stable across redeliveries and republishes; the stream sequence is the fallback.
    return delivery.msg_id or f"seq-{delivery.stream_seq}"


def _link(trace_id: str, span_id: str) -> Link | None:
    try:
        ctx = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                          trace_flags=TraceFlags(TraceFlags.SAMPLED))
    except ValueError:
        return None
    return Link(ctx)


class SinkHandlers:
    """Handlers for the three streams the sink persists."""

    def __init__(self, ctx: ServiceContext, tracer: trace.Tracer) -> None:
        self.ctx = ctx
        self.tracer = tracer
        self.events = Progress()  # events handled (a skipped redelivery counts again)
        self.spans = Progress()
        self.dead_letters = Progress()
        self.skipped_redeliveries = 0

    async def _already_stored(self, items: list[tuple[Any, Delivery]]) -> set[str]:
        """Messages of this batch whose rows already landed before a crash (only redeliveries can)."""
        redelivered = [_token(d) for _, d in items if d.deliveries > 1]
        if not redelivered:
            return set()
        rows = await self.ctx.store.arows(
            "SELECT DISTINCT msg_id FROM inference_events WHERE msg_id IN {ids:Array(String)}", {"ids": redelivered}
        )
        return {r["msg_id"] for r in rows}

    async def on_inference(self, items: list[tuple[list[InferenceEvent] | InferenceEvent, Delivery]]) -> None:
        """Persist every message of one fetch in one insert.

        Idempotency: an insert is atomic, so after a crash either all of a batch's messages are
        stored or none; their redeliveries are looked up by msg_id and skipped. The insert also
        carries a deduplication token over its message ids for an identical retry.
        """
        stored = await self._already_stored(items)
        self.skipped_redeliveries += len(stored)
        metrics.redeliveries_skipped("sink", len(stored))
        events: list[InferenceEvent] = []
        msg_ids: list[str] = []
        spans = []
        handled = 0
        for value, delivery in items:
            batch = value if isinstance(value, list) else [value]
            handled += len(batch)
            token = _token(delivery)
            if token in stored or not batch:
                continue
            events.extend(batch)
            msg_ids.extend([token] * len(batch))
            spans.append(self._message_span(batch, delivery))
        try:
            if events:
                columns = domain.inference_columns(events, self.ctx.settings.redact, msg_ids)
                await self.ctx.store.ainsert_columns(
                    "inference_events", domain.INFERENCE_COLUMNS, columns,
                    token=domain.batch_token(sorted(set(msg_ids))),
                )
        finally:
            for span in spans:
                span.end()
        await self.events.bump(handled)

    def _message_span(self, events: list[InferenceEvent], delivery: Delivery) -> trace.Span:
        """One consumer span per message, child of its traceparent, linked to every request in it."""
        parent = trace.get_current_span(delivery.trace_context).get_span_context() if delivery.trace_context else None
        parent_trace = format(parent.trace_id, "032x") if parent and parent.is_valid else ""
        links = [lk for t, s in domain.linked_traces(events, parent_trace) if (lk := _link(t, s))]
        return self.tracer.start_span(
            "sink.persist inference_events", context=delivery.trace_context, kind=SpanKind.CONSUMER, links=links,
            attributes={"messaging.destination.name": delivery.subject, "lockgate.events": len(events),
                        "messaging.message.id": delivery.msg_id},
        )

    async def on_spans(self, batch: SpanBatch, delivery: Delivery) -> None:
        """Persist exported spans (no span of its own: that would trace the tracing)."""
        await self.ctx.store.ainsert_columns(
            "otel_traces", domain.SPAN_COLUMNS, domain.span_columns(batch.spans), token=_token(delivery)
        )
        await self.spans.bump(len(batch.spans))

    async def on_dead_letter(self, letter: DeadLetter, delivery: Delivery) -> None:
        """Make dead letters queryable."""
        await self.ctx.store.ainsert_rows(
            "dead_letters", domain.DEAD_LETTER_COLUMNS, [domain.dead_letter_row(letter)], token=letter.id
        )
        await self.dead_letters.bump()
