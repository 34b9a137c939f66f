"""Gate decisions from the append-only `gate_decisions` audit log, latest first."""

from __future__ import annotations

import json
from typing import Any

from lockgate.services.query.registry import Limit
from lockgate.store import Store

_COLUMNS = ("id, time, release, action, actor, decision, eval_run, policy, baseline, rules, reason, "
            "signature, key_id, tenant")


def _row(row: dict[str, Any]) -> dict[str, Any]:
    try:
        row["rules"] = json.loads(row["rules"]) if row["rules"] else []
    except ValueError:
        pass  # keep the raw text rather than hide the row
    return row


def decisions(store: Store, release: str | None = None, limit: Limit = 50) -> list[dict[str, Any]]:
    """Decisions (and later approvals/overrides) for one release or all, latest first; rules parsed."""
    # The sink stores each audit fact once (keyed by its id), so no FINAL is needed here.
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


def consecutive_errors(store: Store, release: str, exclude_run: str = "", scan: int = 50) -> int:
    """How many of the release's latest gate decisions in a row had an enforced rule in ERROR."""
    rows = store.rows(
        "SELECT eval_run, rules FROM gate_decisions WHERE release = {release:String} AND action = 'decided' "
        "AND eval_run != {run:String} ORDER BY time DESC, id DESC LIMIT {scan:UInt32}",
        {"release": release, "run": exclude_run, "scan": scan},
    )
    count = 0
    for row in rows:
        try:
            rules = json.loads(row["rules"]) if row["rules"] else []
        except ValueError:
            rules = []
        if not any(r.get("verdict") == "ERROR" and not r.get("dry_run") for r in rules):
            break
        count += 1
    return count


def release_artifacts(store: Store, release: str) -> dict[str, str] | None:
    """The artifacts (`kind/name` -> hash) a release was registered with, or None if it never was."""
    if not release:
        return None
    rows = store.rows(
        "SELECT artifacts FROM releases WHERE release = {release:String} ORDER BY time DESC LIMIT 1",
        {"release": release},
    )
    return dict(rows[0]["artifacts"]) if rows else None
