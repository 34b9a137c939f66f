"""NATS edge of the cost accountant: inference batches in, ledger facts (stored by the sink) and cost records out."""

from __future__ import annotations

import asyncio

from lockgate.bus import Delivery
from lockgate.codec import encode
from lockgate.contracts import CostEntry, CostLedger, InferenceEvent
from lockgate.ids import content_hash, derived_id
from lockgate.outbox import BATCH_BYTES, chunked
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.cost import domain


class CostHandlers:
    """Prices each message's events against one price book."""

    def __init__(self, ctx: ServiceContext, book: domain.PriceBook) -> None:
        self.ctx = ctx
        self.book = book
        self.events = Progress()

    async def on_inference(self, value: list[InferenceEvent] | InferenceEvent, delivery: Delivery) -> None:
        """The ledger facts of a message (chunked when large), then one CostRecord per (tenant, app, deployment, model),
        at most domain.RECORDS_MAX (the rest folded)."""
        received = value if isinstance(value, list) else [value]
        events = domain.distinct_events(received)
        if not events:  # none to book: each was a call a router's event bills
            await self.events.bump(len(received))
            return
        # Ids derive from the events, not the message: a redelivered message, or the same events
        # re-sent under another message id, republishes duplicates JetStream drops (within its
        # duplicate window; the sink stores a ledger entry once per event id whatever the delay).
        # An event is its (tenant, app, id): another tenant's or app's event under the same id is priced on its own.
        token = content_hash(sorted((e.tenant, e.app, e.id) for e in events))[7:47]
        priced = domain.price_events(events, self.book)
        bus = self.ctx.bus
        # Each batch's publishes in flight together, not one acknowledgement after another: this one consumer serves
        # every tenant, and a message's publishes awaited in turn held every other tenant's ledger back (probe p42
        # F1: 16 to 77 s). The ledger facts still go before the records that sum them.
        await asyncio.gather(*(bus.publish(bus.subjects.cost_ledger, data, msg_id=ledger.id)
                               for ledger, data in self._ledgers(token, priced.entries, events[0].tenant)))
        await asyncio.gather(*(bus.publish(bus.subjects.cost(record.tenant), record,
                                           msg_id=f"cost-{token}-{content_hash(list(key))[7:31]}")
                               for key, record in zip(priced.group_keys, priced.records, strict=True)))
        await self.events.bump(len(received))  # handled, repeats included

    def _ledgers(self, token: str, entries: list[CostEntry], tenant: str) -> list[tuple[CostLedger, bytes]]:
        """The ledger facts of one message, each with its JSON: one, or as many as it takes to keep each under a
        bus message's bytes (an entry's JSON is about 2.5 times its event's: a message of 5,000 events, which
        the limits allow, made a ledger over NATS' max_payload that was never billed)."""
        def ledger(part: list[CostEntry], *suffix: str) -> CostLedger:
            # Ids from the events and the cut alone: a redelivery republishes the same facts, deduplicated.
            return CostLedger(id=derived_id("cost-ledger", token, *suffix), price_book=self.book.hash,
                              entries=part, source="lockgate-cost", tenant=tenant)

        whole = ledger(entries)
        data = encode(whole)
        if len(data) <= BATCH_BYTES:  # the usual message: encoded once
            return [(whole, data)]
        parts = chunked(entries, [len(encode(e)) + 1 for e in entries], max_items=len(entries))
        out = [ledger(part, f"{i + 1}/{len(parts)}") for i, part in enumerate(parts)]
        return [(one, encode(one)) for one in out]
