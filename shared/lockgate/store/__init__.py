"""ClickHouse access: one client factory for chdb:// and http(s)://, migrations, idempotent inserts."""

from __future__ import annotations

from lockgate.store.client import Store
from lockgate.store.migrate import apply_migrations
from lockgate.store.retention import apply_retention, parse_retention

__all__ = ["Store", "open_store"]


def open_store(url: str, database: str = "lockgate", *, migrate: bool = True, retention: str | None = None) -> Store:
    """Open a database and bring its schema up to date; with `retention` (the setting), set each table's TTL."""
    days = parse_retention(retention) if retention is not None else None  # a bad setting fails before any DDL
    store = Store(url, database)
    if migrate:
        apply_migrations(store)
    if days is not None:
        apply_retention(store, days)
    return store
