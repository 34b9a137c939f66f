"""NATS edge of the cost accountant: inference batches in, ledger facts (stored by the sink) and cost records out."""

from __future__ import annotations

from lockgate.bus import Delivery
from lockgate.contracts import CostLedger, InferenceEvent
from lockgate.ids import content_hash, derived_id
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.cost import domain


class CostHandlers:
    """Prices each message's events against one price book."""

    def __init__(self, ctx: ServiceContext, book: domain.PriceBook) -> None:
        self.ctx = ctx
        self.book = book
        self.events = Progress()

    async def on_inference(self, value: list[InferenceEvent] | InferenceEvent, delivery: Delivery) -> None:
        """One ledger fact per message, then one CostRecord per (tenant, app, deployment, model)."""
        received = value if isinstance(value, list) else [value]
        events = domain.distinct_events(received)
        if not events:
            return
        # Ids derive from the events, not the message: a redelivered message, or the same events
        # re-sent under another message id, republishes duplicates JetStream drops (within its
        # duplicate window; the sink stores a ledger entry once per event id whatever the delay).
        # An event is its (tenant, app, id): another tenant's or app's event under the same id is priced on its own.
        token = content_hash(sorted((e.tenant, e.app, e.id) for e in events))[7:47]
        priced = domain.price_events(events, self.book)
        bus = self.ctx.bus
        ledger = CostLedger(id=derived_id("cost-ledger", token), price_book=self.book.hash, entries=priced.entries,
                            source="lockgate-cost", tenant=events[0].tenant)
        await bus.publish(bus.subjects.cost_ledger, ledger)
        for key, record in zip(priced.group_keys, priced.records, strict=True):
            msg_id = f"cost-{token}-{content_hash(list(key))[7:31]}"
            await bus.publish(bus.subjects.cost(record.tenant), record, msg_id=msg_id)
        await self.events.bump(len(received))  # handled, repeats included
