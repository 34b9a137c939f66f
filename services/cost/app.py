"""Cost accountant wiring: the price book and one inference consumer."""

from __future__ import annotations

from lockgate.bus import consume
from lockgate.contracts import InferenceEvent
from lockgate.limits import EventLimits
from lockgate.pricebook import load_price_book
from lockgate.server.service import Service, ServiceContext
from lockgate.services.cost.handlers import CostHandlers


class Cost(Service):
    """Prices inference events; publishes the `cost_ledger` fact and `cost.<tenant>` records."""

    name = "cost"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.price_book = load_price_book(ctx.settings.price_book)
        self.handlers = CostHandlers(ctx, self.price_book)
        s = ctx.bus.subjects
        consume(ctx.bus, self.consumers, subject=s.inference_all, stream="inference", durable=s.durable("cost", "inference"),
                wire_type=list[InferenceEvent] | InferenceEvent, origin="cost",
                handler=self.handlers.on_inference, batch_size=64, ack_wait_s=ctx.settings.ack_wait_s,
                # The sink records what the edge refuses; a bad message costs this consumer a failed decode.
                limits=EventLimits.from_settings(ctx.settings), records_refusals=False)


def create(ctx: ServiceContext) -> Cost:
    """Build the cost accountant."""
    return Cost(ctx)
