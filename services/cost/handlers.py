"""NATS edge of the cost accountant: inference batches in, ledger facts (stored by the sink) and cost records out."""

from __future__ import annotations

from lockgate.bus import Delivery
from lockgate.contracts import CostLedger, InferenceEvent
from lockgate.ids import content_hash, derived_id
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.cost import domain


def _token(delivery: Delivery) -> str:
    # Nats-Msg-Id survives redelivery and republish; the stream sequence is the fallback.
    return delivery.msg_id or f"seq-{delivery.stream_seq}"


class CostHandlers:
    """Prices each message's events against one price book."""

    def __init__(self, ctx: ServiceContext, book: domain.PriceBook) -> None:
        self.ctx = ctx
        self.book = book
        self.events = Progress()

    async def on_inference(self, value: list[InferenceEvent] | InferenceEvent, delivery: Delivery) -> None:
        """One ledger fact per message, then one CostRecord per (tenant, app, deployment, model)."""
        events = value if isinstance(value, list) else [value]
        if not events:
            return
        token = _token(delivery)
        priced = domain.price_events(events, self.book)
        bus = self.ctx.bus
        # Its id derives from the message, so a redelivered message republishes a duplicate JetStream drops.
        ledger = CostLedger(id=derived_id("cost-ledger", token), price_book=self.book.hash, entries=priced.entries,
                            source="lockgate-cost", tenant=events[0].tenant)
        await bus.publish(bus.subjects.cost_ledger, ledger)
        for key, record in zip(priced.group_keys, priced.records, strict=True):
            # Deterministic id per (message, group): a redelivered message republishes a duplicate
            # that JetStream drops.
            msg_id = f"cost-{token}-{content_hash(list(key))[7:31]}"
            await bus.publish(bus.subjects.cost(record.tenant), record, msg_id=msg_id)
        await self.events.bump(len(events))
