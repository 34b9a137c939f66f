"""NATS edge of the sink: decoded batches in, idempotent column inserts out (the only writer of ClickHouse)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

from lockgate import metrics
from lockgate.bus import Delivery
from lockgate.contracts import DeadLetter, InferenceEvent, SpanBatch
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.sink import domain
from lockgate.store import Store
from lockgate.store.tables import DEAD_LETTERS, OTEL_TRACES

log = logging.getLogger("lockgate.sink")


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


@dataclass
class Written:
    """What one insert did: rows stored, and messages whose rows were all found stored already."""

    rows: int = 0
    skipped_messages: int = 0


class Writer:
    """Stores the facts of one projection idempotently, a batch of messages per insert.

    An insert is atomic, so after a crash either all of a batch's rows are stored or none. Before
    inserting, the keys of the facts that may be stored already (all of them, or only redelivered
    ones, per the projection) are looked up and those rows dropped; the insert also carries a
    deduplication token over its keys, so an identical retry is a no-op in ClickHouse.
    """

    def __init__(self, store: Store, projection: domain.Projection) -> None:
        self.store = store
        self.projection = projection
        self.table = projection.table
        self.stored = Progress()  # messages handled (a skipped one counts again)
        # Messages this process stored lately. After a nats-server crash the consumer's state may roll
        # back, so stored messages come again as first deliveries, which the lookup of redelivered
        # keys alone would store twice.
        self.recent = domain.RecentTokens()

    def unseen(self, messages: Sequence[tuple[Any, Delivery]]) -> tuple[list[tuple[Any, Delivery]], int]:
        """The messages this process has not stored lately, and how many it has."""
        fresh = [(v, d) for v, d in messages if _token(d) not in self.recent]
        return fresh, len(messages) - len(fresh)

    async def _stored_keys(self, keys: set[tuple[Any, ...]]) -> set[tuple[Any, ...]]:
        if not keys:
            return set()
        key = self.table.key
        # Each key column narrowed on its own (a superset of the keys), the exact tuples picked here.
        types = ["String" if isinstance(v, str) else "Int64" for v in next(iter(keys))]
        where = " AND ".join(f"{c} IN {{k{i}:Array({t})}}" for i, (c, t) in enumerate(zip(key, types, strict=True)))
        params = {f"k{i}": sorted({k[i] for k in keys}) for i in range(len(key))}
        rows = await self.store.arows(f"SELECT DISTINCT {', '.join(key)} FROM {self.table.name} WHERE {where}", params)
        return {t for r in rows if (t := tuple(r[c] for c in key)) in keys}

    async def write(
        self,
        messages: Sequence[tuple[Sequence[msgspec.Struct], Delivery]],
        extra: Mapping[str, Sequence[Any]] | None = None,
        transform: Mapping[str, Callable[[Any], Any]] | None = None,
    ) -> Written:
        """Insert the rows of these messages that are not stored yet."""
        values = [v for vals, _ in messages for v in vals]
        data = self.table.data(values, extra, transform)
        n = len(data[0]) if data else 0
        if n == 0:
            self.recent.add_all(_token(d) for _, d in messages)
            return Written()
        always = self.projection.check == "always"
        keys: list[tuple[Any, ...]] | None = None
        skipped = 0
        if always or any(d.deliveries > 1 for _, d in messages):
            keys = self.table.keys(data)
            message_of = [m for m, (vals, _) in enumerate(messages) for _ in vals]
            origins = [message_of[i] for i in self.table.origins(values)]
            candidates = {k for k, o in zip(keys, origins, strict=True) if always or messages[o][1].deliveries > 1}
            stored = await self._stored_keys(candidates)
            if always or stored:
                keep = domain.new_rows(keys, origins, stored)
                skipped = len(set(origins) - {origins[i] for i in keep})
                if not keep:
                    self.recent.add_all(_token(d) for _, d in messages)
                    return Written(skipped_messages=skipped)
                if len(keep) < n:
                    data = domain.select(data, keep)
                    keys = [keys[i] for i in keep]
        token = domain.batch_token(self._token_parts(data, keys))
        await self.store.ainsert_columns(self.table.name, self.table.columns, data, token=token)
        self.recent.add_all(_token(d) for _, d in messages)
        return Written(rows=len(data[0]), skipped_messages=skipped)

    def _token_parts(self, data: list[list[Any]], keys: list[tuple[Any, ...]] | None) -> list[str]:
        if keys is None and len(self.table.key) == 1:  # the hot path: one key column, nothing dropped
            return [str(k) for k in set(data[self.table.index(self.table.key[0])])]
        return list({"\x00".join(map(str, k)) for k in (keys if keys is not None else self.table.keys(data))})

    async def on_facts(self, items: list[tuple[msgspec.Struct, Delivery]]) -> None:
        """Persist one fetch of facts (one event per message) in one insert."""
        fresh, _ = self.unseen(items)
        await self.write([([value], delivery) for value, delivery in fresh])
        await self.stored.bump(len(items))


class SinkHandlers:
    """Handlers for every stream the sink persists."""

    def __init__(self, ctx: ServiceContext, tracer: trace.Tracer) -> None:
        self.ctx = ctx
        self.tracer = tracer
        self.inference = Writer(ctx.store, domain.INFERENCE)
        self.facts = {p.table.name: Writer(ctx.store, p) for p in domain.FACTS}
        self.events = Progress()  # inference events handled (a skipped redelivery counts again)
        self.spans = Progress()
        self.dead_letters = Progress()
        self.skipped_redeliveries = 0
        self._redaction = domain.redaction(ctx.settings.redact)

    def progress(self, table: str) -> Progress:
        """Messages handled for one fact table; tests and benches await it instead of sleeping."""
        return self.facts[table].stored

    async def on_inference(self, items: list[tuple[list[InferenceEvent] | InferenceEvent, Delivery]]) -> None:
        """Persist every message of one fetch in one insert; redelivered messages already stored are skipped."""
        fresh, seen = self.inference.unseen(items)
        messages = [(value if isinstance(value, list) else [value], delivery) for value, delivery in fresh]
        msg_ids = [_token(d) for batch, d in messages for _ in batch]
        spans = [self._message_span(batch, d) for batch, d in messages if batch]
        try:
            written = await self.inference.write(messages, extra={"msg_id": msg_ids}, transform=self._redaction)
        finally:
            for span in spans:
                span.end()
        skipped = written.skipped_messages + seen
        self.skipped_redeliveries += skipped
        metrics.redeliveries_skipped("sink", skipped)
        await self.events.bump(sum(len(v) if isinstance(v, list) else 1 for v, _ in items))

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
        await self.ctx.store.ainsert_columns("otel_traces", OTEL_TRACES.columns, OTEL_TRACES.data(batch.spans),
                                             token=_token(delivery))
        await self.spans.bump(len(batch.spans))

    async def on_dead_letter(self, letter: DeadLetter, delivery: Delivery) -> None:
        """Make dead letters queryable."""
        data = DEAD_LETTERS.data([letter], transform=domain.DEAD_LETTER_SCRUB)
        await self.ctx.store.ainsert_columns("dead_letters", DEAD_LETTERS.columns, data, token=letter.id)
        await self._delete_original(letter)
        await self.dead_letters.bump()

    async def _delete_original(self, letter: DeadLetter) -> None:
        # Now that the scrubbed copy is stored, an unreadable original (which may carry secrets) leaves
        # its stream. The sink is the only identity allowed to delete; it checks the original itself,
        # because a dead letter can be published by any service.
        bus = self.ctx.bus
        if not letter.stream or letter.stream_seq <= 0 or letter.cut_from:
            return  # no original to delete, or the letter holds only part of it: the original is the copy
        if letter.stream not in {spec.name for spec in bus.subjects.streams.values()}:
            log.warning("dead letter %s names stream %s, which is not lockgate's: nothing deleted",
                        letter.id, letter.stream)
            return
        original = await bus.stored(letter.stream, letter.stream_seq)
        if original is None:  # deleted already (another consumer dead-lettered it too) or expired
            return
        subject, payload = original
        if subject != letter.subject or not domain.unreadable(payload):
            # A rejected (readable) message stays, as does anything a forged letter points at.
            log.debug("dead letter %s: message %d of %s is %s; kept", letter.id, letter.stream_seq, letter.stream,
                      "on another subject" if subject != letter.subject else "a readable event")
            return
        await bus.delete(letter.stream, letter.stream_seq)
