"""Versioned SQL migrations in `migrations/NNN_name.sql`, applied in order, safe to run twice."""

from __future__ import annotations

import re
from importlib import resources

from lockgate.store.client import Store

_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def migration_files() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) for every shipped migration, in order."""
    out = []
    for entry in resources.files("lockgate.store.migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            out.append((int(m.group(1)), entry.name, entry.read_text()))
    return sorted(out)


def _statements(sql: str) -> list[str]:
    lines = [ln for ln in sql.splitlines() if not ln.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def apply_migrations(store: Store) -> list[str]:
    """Apply pending migrations; returns the names applied now."""
    store.command(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
        "applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = MergeTree ORDER BY version"
    )
    done = {r["version"] for r in store.rows("SELECT version FROM schema_migrations")}
    applied = []
    for version, name, sql in migration_files():
        if version in done:
            continue
        # Every statement is IF NOT EXISTS, so a crash mid-file is repaired by re-running it.
        for stmt in _statements(sql):
            store.command(stmt)
        store.insert_rows("schema_migrations", ["version", "name"], [[version, name]], token=f"migration-{version}")
        applied.append(name)
    return applied
