"""Pure cost accounting: per-event pricing and per-group cost records (the price book is lockgate.pricebook)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from lockgate.contracts import CostEntry, CostRecord, InferenceEvent
from lockgate.pricebook import ModelPrice, PriceBook, PriceBookError, parse_price_book, priced_model

__all__ = ["FOLDED", "RECORDS_MAX", "ModelPrice", "PriceBook", "PriceBookError", "distinct_events", "event_cost",
           "parse_price_book", "price_events"]

# The most CostRecords one inference message yields. Its sender chooses each event's deployment and model, and one
# record per group let a message of 5,000 events naming 5,000 models become 5,000 records (3.3 MB from 600 KB in,
# probe p42 F1), each published in turn on the one consumer every tenant's ledger waits on. Past the cap the
# smallest groups are folded into one record per (tenant, app) under FOLDED; the ledger keeps every event's own row.
RECORDS_MAX = 64
# The deployment and model of a record that folds the groups past RECORDS_MAX.
FOLDED = "*"


def distinct_events(events: Sequence[InferenceEvent]) -> list[InferenceEvent]:
    """The events the ledger books, each (tenant, app, id)'s first, in order: an event listed twice in one message is
    priced once, and an application's event of a call a router served and bills (`billed_by_router`: its span named
    the router's address) not at all, so the call is one ledger row, the router's, as budgets count it."""
    first: dict[tuple[str, str, str], InferenceEvent] = {}
    for e in events:
        if not e.billed_by_router:
            first.setdefault((e.tenant, e.app, e.id), e)
    return list(first.values())

def event_cost(e: InferenceEvent, price: ModelPrice) -> float:
    """What one inference event cost under `price`: its billed tokens (the worst case the router charged for a
    call whose usage is unknown, as its budgets did: its input at a cache write's rate where the router charged it
    so), prompt-cache writes at their write rates (as budgets.cost_of)."""
    return (price.writing() if e.billed_dearest else price).cost(*e.billed_tokens, *e.billed_writes)


class Priced(msgspec.Struct):
    """A priced batch: one ledger entry per event and one CostRecord per group (at most RECORDS_MAX)."""

    entries: list[CostEntry]
    records: list[CostRecord]
    group_keys: list[tuple[str, str, str, str]]


def price_events(events: Sequence[InferenceEvent], book: PriceBook) -> Priced:
    """Price every event; unknown models cost 0 and count as unpriced."""
    entries: list[CostEntry] = []
    groups: dict[tuple[str, str, str, str], list[Any]] = {}
    models = book.models
    for e in events:
        model = priced_model(e.model, e.response_model, models)
        price = models.get(model) if model else None
        cost = event_cost(e, price) if price else 0.0
        tokens_in, tokens_out, cached = e.billed_tokens
        model = model or e.model or e.response_model
        entries.append(CostEntry(
            event_id=e.id, time=e.time, tenant=e.tenant, app=e.app, deployment=e.deployment, release=e.release,
            model=model, input_tokens=tokens_in, output_tokens=tokens_out,
            cached_tokens=cached, cost_usd=cost, priced=price is not None))
        key = (e.tenant, e.app, e.deployment, model)
        g = groups.get(key)
        if g is None:
            groups[key] = [1, tokens_in, tokens_out, cached, cost, int(price is None), e.time, e.time]
        else:
            g[0] += 1
            g[1] += tokens_in
            g[2] += tokens_out
            g[3] += cached
            g[4] += cost
            g[5] += price is None
            g[6] = min(g[6], e.time)
            g[7] = max(g[7], e.time)
    groups = _capped(groups)
    keys = sorted(groups)
    records = [
        CostRecord(
            tenant=t, app=a, deployment=d, model=m, source="lockgate-cost",
            calls=g[0], input_tokens=g[1], output_tokens=g[2], cached_tokens=g[3], cost_usd=g[4],
            unpriced_calls=g[5], price_book=book.hash, window_start=g[6], window_end=g[7],
        )
        for (t, a, d, m) in keys
        for g in (groups[(t, a, d, m)],)
    ]
    return Priced(entries=entries, records=records, group_keys=keys)


def _capped(groups: dict[tuple[str, str, str, str], list[Any]]) -> dict[tuple[str, str, str, str], list[Any]]:
    """`groups` with at most RECORDS_MAX entries (a message has one sender, so one (tenant, app)): the largest by
    calls kept, the rest summed into (tenant, app, FOLDED, FOLDED). The same events always fold the same way, so
    a redelivery republishes the same records (ids from their keys)."""
    if len(groups) <= RECORDS_MAX:
        return groups
    ranked = sorted(groups, key=lambda k: (-groups[k][0], k))
    kept = {k: groups[k] for k in ranked[:RECORDS_MAX - 1]}
    for t, a, d, m in ranked[RECORDS_MAX - 1:]:
        g = groups[(t, a, d, m)]
        into = kept.setdefault((t, a, FOLDED, FOLDED), [0, 0, 0, 0, 0.0, 0, g[6], g[7]])
        for i in range(6):
            into[i] += g[i]
        into[6], into[7] = min(into[6], g[6]), max(into[7], g[7])
    return kept
