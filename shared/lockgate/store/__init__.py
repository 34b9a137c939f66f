"""ClickHouse access: one client factory for chdb:// and http(s)://, migrations, idempotent inserts."""

from __future__ import annotations

from lockgate.limits import EventLimits
from lockgate.store.client import Store
from lockgate.store.migrate import apply_migrations
from lockgate.store.retention import apply_retention, parse_retention

__all__ = ["Store", "open_store"]


def open_store(url: str, database: str = "lockgate", *, migrate: bool = True, retention: str | None = None,
               event_past_s: float = EventLimits.past_s) -> Store:
    """Open a database and bring its schema up to date; with `retention` (the setting), set each table's TTL, which
    the deduplicated tables' must keep longer than `event_past_s` (the setting `event_time_past_s`)."""
    # a bad setting fails before any DDL
    days = parse_retention(retention, event_past_s) if retention is not None else None
    store = Store(url, database)
    if migrate:
        apply_migrations(store)
    if days is not None:
        apply_retention(store, days)
    return store
