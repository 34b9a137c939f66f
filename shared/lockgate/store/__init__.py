"""ClickHouse access: one client factory for chdb:// and http(s)://, migrations, idempotent inserts."""

from lockgate.store.client import Store, open_store

__all__ = ["Store", "open_store"]
