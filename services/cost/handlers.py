"""NATS edge of the cost accountant: inference batches in, ledger rows and cost records out."""

from __future__ import annotations

from lockgate.bus import Delivery
from lockgate.contracts import InferenceEvent
from lockgate.ids import content_hash
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
        """One ledger insert per message, then one CostRecord per (tenant, app, deployment, model)."""
        events = value if isinstance(value, list) else [value]
        if not events:
            return
        token = _token(delivery)
        priced = domain.price_events(events, self.book)
        await self.ctx.store.ainsert_columns("cost_ledger", domain.LEDGER_COLUMNS, priced.columns, token=token)
        bus = self.ctx.bus
        for key, record in zip(priced.group_keys, priced.records, strict=True):
            # Deterministic id per (message, group): a redelivered message republishes a duplicate
            # that JetStream drops.
            msg_id = f"cost-{token}-{content_hash(list(key))[7:31]}"
            await bus.publish(bus.subjects.cost(record.tenant), record, msg_id=msg_id)
        await self.events.bump(len(events))
