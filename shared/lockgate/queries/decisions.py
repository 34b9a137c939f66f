"""Gate decisions from the append-only `gate_decisions` audit log, latest first."""

from __future__ import annotations

import json
from typing import Any

from lockgate.store import Store

_COLUMNS = ("id, time, release, action, actor, decision, eval_run, policy, baseline, rules, reason, "
            "signature, key_id, tenant")


def _row(row: dict[str, Any]) -> dict[str, Any]:
    try:
        row["rules"] = json.loads(row["rules"]) if row["rules"] else []
    except ValueError:
        pass  # keep the raw text rather than hide the row
    return row


def decisions(store: Store, release: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Decisions (and later approvals/overrides) for one release or all, latest first; rules parsed."""
    # Rows are deduplicated at insert (token per eval run), so no FINAL is needed here.
    where = "WHERE release = {release:String}" if release else ""
    rows = store.rows(
        f"SELECT {_COLUMNS} FROM gate_decisions {where} ORDER BY time DESC, id DESC LIMIT {{limit:UInt32}}",
        {"release": release or "", "limit": max(0, int(limit))},
    )
    return [_row(r) for r in rows]


def latest_decision(store: Store, release: str) -> dict[str, Any] | None:
    """The most recent decision row for `release`, or None if it was never gated."""
    rows = decisions(store, release, limit=1)
    return rows[0] if rows else None
