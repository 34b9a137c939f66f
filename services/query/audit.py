"""The hash-chained audit log (`audit_log`) in chain order, a page at a time."""

from __future__ import annotations

from typing import Any

from lockgate.services.query.registry import Limit
from lockgate.store import Store
from lockgate.store.tables import AUDIT_LOG

_COLUMNS = ", ".join(AUDIT_LOG.columns)


def audit_log(store: Store, after_seq: int = 0, limit: Limit = 500) -> list[dict[str, Any]]:
    """Rows with seq > after_seq, ordered by seq (page with the last seq seen; `ask_pages` does)."""
    # Every row, duplicates and all: `audit verify` must see exactly what is stored, so no FINAL or DISTINCT.
    return store.rows(
        f"SELECT {_COLUMNS} FROM audit_log WHERE seq > {{after:UInt64}} ORDER BY seq LIMIT {{limit:UInt32}}",
        {"after": max(0, int(after_seq)), "limit": max(0, min(int(limit), 10_000))},
    )
