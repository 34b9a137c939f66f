"""NATS edge of the sink: decoded batches in, idempotent column inserts out (the only writer of ClickHouse)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import chain, repeat
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

from lockgate import metrics
from lockgate.bus import Delivery, original_name
from lockgate.codec import encode
from lockgate.contracts import DeadLetter, InferenceEvent, SpanBatch, SpanRecord
from lockgate.errors import RowsRefused, StoreUnavailable
from lockgate.redact import scrub_bytes
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.sink import domain
from lockgate.store import Store
from lockgate.store.tables import DEAD_LETTERS

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


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The stored-keys windows of each store this process writes through (see Writer._open_window).
_WINDOWS: weakref.WeakKeyDictionary[Store, dict[str, domain.StoredWindow]] = weakref.WeakKeyDictionary()


@dataclass
class Written:
    """What one insert did: rows stored, and messages whose rows were all stored already (a redelivery,
    or a re-send under another message id)."""

    rows: int = 0
    skipped_messages: int = 0


class Writer:
    """Stores the facts of one projection exactly once per key, a batch of messages per insert.

    An insert is atomic, so after a crash either all of a batch's rows are stored or none. Before
    inserting, the batch's keys are looked up (within the batch's time range, for a high-volume
    table) and the rows found, or repeated in the batch, are dropped: a redelivered message and an
    event re-sent under another message id are stored once alike. The insert also carries a
    deduplication token over its keys, so an identical retry is a no-op in ClickHouse. Lookup and
    insert run under one lock, so two concurrent writes of this process cannot both miss a key.
    """

    def __init__(self, store: Store, projection: domain.Projection) -> None:
        self.store = store
        self.projection = projection
        self.table = projection.table
        self.stored = Progress()  # messages handled (a skipped one counts again)
        self._lock = asyncio.Lock()  # one lookup and insert at a time: neither misses the other's keys
        self._session = uuid.uuid4().hex[:12]  # this writer's temporary lookup table
        self._staged = False
        # Where this process is the only writer, the keys it stored lately spare most lookups (the
        # lookup was a third of the sink's time under load). Elsewhere (a ClickHouse server shared by
        # sink replicas) every batch is looked up.
        self._window: domain.StoredWindow | None = None
        self._windowed = bool(store.exclusive and (projection.within or projection.keys_table))

    async def _open_window(self) -> domain.StoredWindow:
        if self._window is None:
            # One window per table and store, shared by every writer of this process on it.
            windows = _WINDOWS.setdefault(self.store, {})
            if self.table.name not in windows:
                windows.setdefault(self.table.name, await self._new_window())
            self._window = windows[self.table.name]
        return self._window

    async def _new_window(self) -> domain.StoredWindow:
        # Rows stored before this process wrote the table (by an earlier one) lie at or before the horizon.
        if self.projection.by_id:
            id_column, table = self.table.key[-1], self.projection.keys_table
            # Characters, as domain.id_order takes them, never bytes: an id's first 13 bytes sort before its first 13
            # characters when they hold a character of more than one byte, and a horizon below a stored id's own order
            # had its re-sent event taken for a new one (stored and billed twice: probe p47 F2).
            order = f"substringUTF8({id_column}, 1, 13)"  # domain.id_order
            ceiling = {"ceiling": domain.id_ceiling(time.time())}
            rows = await self.store.arows(f"SELECT max({order}) AS o FROM {table} WHERE {order} <= {{ceiling:String}}",
                                          ceiling)
            # And the orders stored after it (ids ahead of now), which the window keeps until now reaches them.
            ahead = await self.store.arows(
                f"SELECT DISTINCT substringUTF8({id_column}, 1, {domain.AHEAD_PREFIX}) AS p FROM {table}"
                f" WHERE {order} > {{ceiling:String}} ORDER BY p LIMIT {domain.AHEAD_MAX + 1}", ceiling)
            return domain.StoredWindow(rows[0]["o"] if rows else "", ahead=[r["p"] for r in ahead],
                                       ceiling=lambda: domain.id_ceiling(time.time()))
        # As microseconds, so no driver's time zone handling can shift it.
        micros = await self.store.arows(f"SELECT toUnixTimestamp64Micro(max({self.projection.within})) AS t "
                                        f"FROM {self.projection.keys_table or self.table.name}")
        return domain.StoredWindow(_EPOCH + timedelta(microseconds=int(micros[0]["t"] if micros else 0)))

    def _stored_keys(self, keys: set[Any], times: list[Any] | None) -> set[Any]:
        """Which of these keys (as `Table.keys` gives them) are stored already."""
        # The keys travel as rows of a session-scoped temporary table, not as query text: a few
        # thousand ids parse in milliseconds that way, against a hundred and more as an IN list.
        key = self.table.key
        single = len(key) == 1  # a one-column key is its value, not a 1-tuple (see Table.keys)
        columns = [list(keys)] if single else [list(c) for c in zip(*keys, strict=True)]
        types = ["String" if isinstance(c[0], str) else "Int64" for c in columns]
        staged = f"lookup_{self.table.name}_{self._session}"
        if not self._staged:
            cols = ", ".join(f"k{i} {t}" for i, t in enumerate(types))
            self.store.command(f"CREATE TEMPORARY TABLE IF NOT EXISTS {staged} ({cols}) ENGINE = Memory")
            self._staged = True
        self.store.command(f"TRUNCATE TABLE {staged}")
        names = [f"k{i}" for i in range(len(key))]
        self.store.insert_columns(staged, names, columns, token=None)
        cond = f"({', '.join(key)}) IN (SELECT {', '.join(names)} FROM {staged})"
        params: dict[str, Any] = {}
        if self.projection.within and times:
            col = self.projection.within
            cond = f"{col} >= {{lo:DateTime64(6, 'UTC')}} AND {col} <= {{hi:DateTime64(6, 'UTC')}} AND {cond}"
            params.update(lo=min(times), hi=max(times))
        rows = self.store.rows(f"SELECT DISTINCT {', '.join(key)} FROM {self.projection.keys_table or self.table.name}"
                               f" WHERE {cond}", params)
        if single:
            return {r[key[0]] for r in rows}
        return {tuple(r[c] for c in key) for r in rows}

    async def write(
        self,
        messages: Sequence[tuple[Sequence[msgspec.Struct], Delivery]],
        extra: Mapping[str, Sequence[Any]] | None = None,
        transform: Mapping[str, Callable[[Any], Any]] | None = None,
    ) -> Written:
        """Insert the rows of these messages whose keys are not stored yet."""
        values = list(chain.from_iterable(vals for vals, _ in messages))
        data = self.table.data(values, extra, transform)
        n = len(data[0]) if data else 0
        if n == 0:
            return Written()
        keys = self.table.keys(data)
        times = data[self.table.index(self.projection.within)] if self.projection.within else None
        # What the window orders rows by: their time where lookups are bounded by it, else a keys table's ids.
        orders = domain.id_order(keys) if self.projection.by_id else times
        async with self._lock:
            window = await self._open_window() if self._windowed else None
            ask, ask_times = keys, times
            if window is not None and orders is not None:
                rows = window.to_look_up(keys, orders)
                ask = [keys[i] for i in rows]
                ask_times = [times[i] for i in rows] if times is not None else None
            stored: set[Any] = set()
            if ask:
                try:
                    stored = await asyncio.to_thread(self._stored_keys, set(ask), ask_times)
                except StoreUnavailable:
                    self._staged = False  # a new session (the server restarted) has no temporary table yet
                    raise
            # Which message each row came from matters only where rows are dropped or one fact has many rows.
            origins = None if self.projection.per_row else self._origins(messages, values)
            keep = domain.new_rows(keys, origins, stored, per_row=self.projection.per_row)
            skipped = 0
            if len(keep) < n:
                origins = origins or self._origins(messages, values)
                skipped = len(set(origins) - {origins[i] for i in keep})
            if not keep:
                return Written(skipped_messages=skipped)
            if len(keep) < n:
                data = domain.select(data, keep)
                keys = [keys[i] for i in keep]
                orders = [orders[i] for i in keep] if orders is not None else None
            token = domain.batch_token(domain.key_strings(keys))
            try:
                await self.store.ainsert_columns(self.table.name, self.table.columns, data, token=token)
            finally:
                if window is not None and orders is not None:
                    # Stored, or perhaps stored (a failed insert may have landed all the same): a key
                    # remembered here is looked up when it comes again, so neither case stores it twice.
                    window.stored(keys, orders)
        return Written(rows=len(data[0]), skipped_messages=skipped)

    def _origins(self, messages: Sequence[tuple[Sequence[msgspec.Struct], Delivery]],
                 values: Sequence[msgspec.Struct]) -> list[int]:
        """For each row of `table.data(values)`, the index of the message it came from."""
        message_of = list(chain.from_iterable(repeat(m, len(vals)) for m, (vals, _) in enumerate(messages)))
        if self.table.items is None:
            return message_of
        return [message_of[i] for i in self.table.origins(values)]

    async def on_facts(self, items: list[tuple[msgspec.Struct, Delivery]]) -> None:
        """Persist one fetch of facts (one event per message) in one insert."""
        await self.write([([value], delivery) for value, delivery in items])
        await self.stored.bump(len(items))


class SinkHandlers:
    """Handlers for every stream the sink persists."""

    def __init__(self, ctx: ServiceContext, tracer: trace.Tracer) -> None:
        self.ctx = ctx
        self.tracer = tracer
        self.inference = Writer(ctx.store, domain.INFERENCE)
        self.span_writer = Writer(ctx.store, domain.SPANS)
        self.facts = {p.table.name: Writer(ctx.store, p) for p in domain.FACTS}
        self.events = Progress()  # inference events handled (a skipped redelivery counts again)
        self.rows = Progress()  # inference events inserted (each once: what a count of the table finds)
        self.spans = Progress()
        self.dead_letters = Progress()
        self.skipped_redeliveries = 0
        self._redaction = domain.redaction(ctx.settings.redact)

    def progress(self, table: str) -> Progress:
        """Messages handled for one fact table; tests and benches await it instead of sleeping."""
        return self.facts[table].stored

    async def on_inference(self, items: list[tuple[list[InferenceEvent] | InferenceEvent, Delivery]]) -> None:
        """Persist every message of one fetch in one insert; events stored already (by id) are skipped."""
        # From the subject alone: only the router may publish on its own, whatever an event says.
        is_served = self.ctx.bus.subjects.is_served
        messages = [(domain.as_stored(value if isinstance(value, list) else [value], served=is_served(delivery.subject)),
                     delivery) for value, delivery in items]
        msg_ids = list(chain.from_iterable(repeat(_token(d), len(batch)) for batch, d in messages))
        served = list(chain.from_iterable(repeat(is_served(d.subject), len(batch)) for batch, d in messages))
        spans = [self._message_span(batch, d) for batch, d in messages if batch]
        try:
            written = await self.inference.write(messages, extra={"msg_id": msg_ids, "served": served},
                                                 transform=self._redaction)
        finally:
            for span in spans:
                span.end()
        self.skipped_redeliveries += written.skipped_messages
        metrics.redeliveries_skipped("sink", written.skipped_messages)
        await self.rows.bump(written.rows)
        await self.events.bump(sum(len(batch) for batch, _ in messages))

    def _message_span(self, events: list[InferenceEvent], delivery: Delivery) -> trace.Span:
        """One consumer span per message, child of its traceparent, linked to every request in it."""
        parent = trace.get_current_span(delivery.trace_context).get_span_context() if delivery.trace_context else None
        parent_trace = format(parent.trace_id, "032x") if parent and parent.is_valid else ""
        links = [lk for t, s in domain.linked_traces(events, parent_trace) if (lk := _link(t, s))]
        attributes: dict[str, str | int] = {"messaging.destination.name": delivery.subject,
                                            "lockgate.events": len(events), "messaging.message.id": delivery.msg_id}
        # Whose events these are, from the subject (only that tenant's are stored from it): the span joins the
        # trace its sender's traceparent or events name, any tenant's, and a trace read scoped to one tenant
        # (`lockgate traces --tenant`, `--release`) leaves out another's.
        sender = self.ctx.bus.subjects.sender(delivery.subject)
        if sender is not None:
            attributes["lockgate.tenant"] = sender[0]
        return self.tracer.start_span(
            "sink.persist inference_events", context=delivery.trace_context, kind=SpanKind.CONSUMER, links=links,
            attributes=attributes,
        )

    async def on_spans(self, batch: SpanBatch, delivery: Delivery) -> None:
        """Persist exported spans (no span of its own: that would trace the tracing), each once per its sender's
        tenant, trace and span id, whatever batches carry it. A span the store refuses is dead-lettered alone;
        the others of its batch are stored."""
        refused: list[tuple[SpanRecord, str]] = []
        await self._insert_spans(batch.spans, delivery, refused)
        if refused:
            # Once per message however often it is redelivered; the batch's readable original stays.
            await self.ctx.bus.dead_letter(
                "sink-spans", subject=delivery.subject, reason="rejected",
                payload=encode(msgspec.structs.replace(batch, spans=[span for span, _ in refused])),
                error="; ".join(f"span {span.span_id}: {why}" for span, why in refused[:20]),
                headers=delivery.headers, deliveries=delivery.deliveries, msg_id=f"rows-sink-spans-{_token(delivery)}")
        await self.spans.bump(len(batch.spans))

    async def _insert_spans(self, spans: Sequence[SpanRecord], delivery: Delivery,
                            refused: list[tuple[SpanRecord, str]]) -> None:
        try:
            await self.span_writer.write([(spans, delivery)])
        except RowsRefused as exc:
            # One bad row (an event time no DateTime64 holds) failed the insert of every span with it: the halves
            # are inserted apart, so it costs about 2*log2(n) inserts, not n. Each part is looked up by its spans'
            # keys again, so a part stored before (on a redelivery) is not stored again.
            if len(spans) == 1:
                refused.append((spans[0], exc.message))
                return
            mid = len(spans) // 2
            await self._insert_spans(spans[:mid], delivery, refused)
            await self._insert_spans(spans[mid:], delivery, refused)

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
        if not letter.stream or letter.stream_seq <= 0:
            return  # no original to delete
        if letter.stream not in {spec.name for spec in bus.subjects.streams.values()}:
            log.warning("dead letter %s names stream %s, which is not lockgate's: nothing deleted",
                        letter.id, letter.stream)
            return
        if letter.cut_from and not letter.original:
            # The bucket refused its whole original (the letter's error says why): the message, the one copy of the
            # bytes past the cut, stays in its stream until its consumers have taken it or it expires.
            log.debug("dead letter %s: message %d of %s is cut and its whole original was not kept; kept", letter.id,
                      letter.stream_seq, letter.stream)
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
        if letter.cut_from and not await bus.kept_original(original_name(scrub_bytes(payload), letter.stream,
                                                                         letter.stream_seq)):
            # The letter holds only the start: the rest goes only once the bucket holds this message's whole
            # (scrubbed) copy, checked here, never taken from the letter's word.
            log.warning("dead letter %s: message %d of %s is cut and its whole copy is not stored; kept",
                        letter.id, letter.stream_seq, letter.stream)
            return
        await bus.delete(letter.stream, letter.stream_seq)
