"""Cost records and budget alerts."""

from __future__ import annotations

from datetime import datetime

import msgspec

from lockgate.contracts.envelope import Event


class CostRecord(Event, frozen=True, kw_only=True, tag="lockgate.cost.record"):
    """Spend of one (app, deployment, model) group within one batch of inference events, on `lg.cost.<tenant>`
    (stream LG_COST). A batch yields at most 64 (`services/cost/domain.py` RECORDS_MAX): past that, its groups with
    the fewest calls are summed into one record whose deployment and model are both "*". The `cost_ledger` table
    keeps every event's own cost, deployment and model whatever the records fold. Records are per batch, not per event:
    an event re-sent in another batch is summed again in its records, while `cost_ledger` stores it once; the ledger
    is the record of spend, these a feed (README, probe p56 F3)."""

    app: str
    deployment: str
    model: str
    calls: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost_usd: float
    unpriced_calls: int = 0
    price_book: str = ""
    window_start: datetime
    window_end: datetime


class CostEntry(msgspec.Struct, frozen=True, kw_only=True):
    """What one inference event cost (a `cost_ledger` row)."""

    event_id: str
    time: datetime
    tenant: str
    app: str
    deployment: str = ""
    release: str = ""
    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    priced: bool = False


class CostLedger(Event, frozen=True, kw_only=True, tag="lockgate.cost.ledger"):
    """The priced events of one inference message, under one price book."""

    price_book: str
    entries: list[CostEntry]
