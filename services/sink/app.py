"""Sink wiring: three durable consumers."""

from __future__ import annotations

from lockgate.bus import consume, consume_batch
from lockgate.contracts import DeadLetter, InferenceEvent, SpanBatch
from lockgate.server.service import Service, ServiceContext
from lockgate.services.sink.handlers import SinkHandlers


class Sink(Service):
    """Persists `inference.>`, `telemetry.spans` and `dlq.>` into ClickHouse."""

    name = "sink"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.handlers = SinkHandlers(ctx, self.tracer)
        s, bus = ctx.bus.subjects, ctx.bus
        common = {"ack_wait_s": ctx.settings.ack_wait_s}
        consume_batch(bus, self.consumers, subject=s.inference_all, stream="inference",
                      durable=s.durable("sink", "inference"), wire_type=list[InferenceEvent] | InferenceEvent,
                      origin="sink", handler=self.handlers.on_inference, batch_size=64, **common)
        consume(bus, self.consumers, subject=s.spans, stream="telemetry", durable=s.durable("sink", "spans"),
                wire_type=SpanBatch, origin="sink-spans", handler=self.handlers.on_spans, **common)
        consume(bus, self.consumers, subject=s.dlq_all, stream="dlq", durable=s.durable("sink", "dlq"),
                wire_type=DeadLetter, origin="sink-dlq", handler=self.handlers.on_dead_letter, **common)


def create(ctx: ServiceContext) -> Sink:
    """Build the sink."""
    return Sink(ctx)
