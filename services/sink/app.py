"""Sink wiring: one durable consumer per stream it projects into a table."""

from __future__ import annotations

from lockgate.bus import consume, consume_batch
from lockgate.contracts import DeadLetter, SpanBatch
from lockgate.limits import EventLimits
from lockgate.server.service import Service, ServiceContext, fewer_collections
from lockgate.services.sink import domain
from lockgate.services.sink.handlers import SinkHandlers


class Sink(Service):
    """The store owner: the only service that writes ClickHouse. Every table is a projection of a stream."""

    name = "sink"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        fewer_collections()
        self.handlers = SinkHandlers(ctx, self.tracer)
        s, bus = ctx.bus.subjects, ctx.bus
        common = {"ack_wait_s": ctx.settings.ack_wait_s}
        inference = domain.INFERENCE
        consume_batch(bus, self.consumers, subject=inference.subject(s), stream=inference.stream,
                      durable=s.durable("sink", "inference"), wire_type=inference.wire_type,
                      origin="sink", handler=self.handlers.on_inference, batch_size=64,
                      # Inserts of thousands of rows: each insert costs about 10 ms on top of its rows,
                      # so at 20k events/s one per message (500 events) would take half a core.
                      max_wait_s=domain.INSERT_MAX_AGE_S, max_rows=domain.INSERT_MAX_ROWS, rows=domain.events_in,
                      limits=EventLimits.from_settings(ctx.settings), **common)
        consume(bus, self.consumers, subject=s.spans, stream="telemetry", durable=s.durable("sink", "spans"),
                wire_type=SpanBatch, origin="sink-spans", handler=self.handlers.on_spans, **common)
        consume(bus, self.consumers, subject=s.dlq_all, stream="dlq", durable=s.durable("sink", "dlq"),
                wire_type=DeadLetter, origin="sink-dlq", handler=self.handlers.on_dead_letter, **common)
        for fact in domain.FACTS:
            # Per subject, not per stream: the events stream also carries requests no table stores.
            consume_batch(bus, self.consumers, subject=fact.subject(s), stream=fact.stream,
                          durable=s.durable("sink", fact.table.name), wire_type=fact.wire_type, origin="sink",
                          handler=self.handlers.facts[fact.table.name].on_facts, batch_size=64, **common)


def create(ctx: ServiceContext) -> Sink:
    """Build the sink."""
    return Sink(ctx)
