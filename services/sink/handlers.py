"""NATS edge of the sink: decoded batches in, idempotent column inserts out."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

from lockgate.bus import Delivery
from lockgate.contracts import DeadLetter, InferenceEvent, SpanBatch
from lockgate.service import Progress, ServiceContext
from services.sink import domain


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
        self.events = Progress()  # events handled (a redelivered duplicate counts again)
        self.spans = Progress()
        self.dead_letters = Progress()

    async def on_inference(self, value: list[InferenceEvent] | InferenceEvent, delivery: Delivery) -> None:
        """Persist one message's events in one insert."""
        events = value if isinstance(value, list) else [value]
        if not events:
            return
        parent = trace.get_current_span(delivery.trace_context).get_span_context() if delivery.trace_context else None
        parent_trace = format(parent.trace_id, "032x") if parent and parent.is_valid else ""
        links = [lk for t, s in domain.linked_traces(events, parent_trace) if (lk := _link(t, s))]
        with self.tracer.start_as_current_span(
            "sink.persist inference_events", context=delivery.trace_context, kind=SpanKind.CONSUMER, links=links,
            attributes={"messaging.destination.name": delivery.subject, "lockgate.events": len(events),
                        "messaging.message.id": delivery.msg_id},
        ):
            columns = domain.inference_columns(events, self.ctx.settings.redact)
            await self.ctx.store.ainsert_columns(
                "inference_events", domain.INFERENCE_COLUMNS, columns, token=_token(delivery)
            )
        await self.events.bump(len(events))

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
