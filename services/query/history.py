"""What served when: a deployment's rollout history (`rollout_events`, one row per route change) read as
"which releases took traffic, with which weights, at time T"."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from lockgate.provenance.openlineage import weights
from lockgate.services.query.registry import Limit
from lockgate.store import Store


def served_at(rows: Iterable[dict[str, Any]], at: datetime | None) -> dict[str, Any] | None:
    """The state in force at `at` (None: now): the last change at or before it, or None if none was yet.

    Pure. A change redelivered under the same id counts once; rows at the same instant are ordered by id
    (UUIDv7, so by the router's own order).
    """
    latest: dict[str, Any] | None = None
    for row in rows:
        if at is not None and row["time"] > at:
            continue
        if latest is None or (row["time"], row["id"]) > (latest["time"], latest["id"]):
            latest = row
    if latest is None:
        return None
    return {"since": latest["time"], "phase": latest["phase"], "stable_release": latest["stable_release"],
            "canary_release": latest["canary_release"], "weights": weights(latest), "reason": latest["reason"],
            "decision_id": latest["decision_id"]}


def serving_history(store: Store, deployment: str, at: datetime | None = None, limit: Limit = 50) -> dict[str, Any]:
    """{deployment, at, serving: the state in force at `at` (or now), history: the changes up to then,
    newest first}."""
    cond = "AND time <= {at:DateTime64(6, 'UTC')}" if at is not None else ""
    rows = store.rows(
        "SELECT id, time, stable_release, canary_release, canary_weight, phase, step, reason, decision_id "
        f"FROM rollout_events WHERE deployment = {{d:String}} {cond} "
        "ORDER BY time DESC, id DESC LIMIT 1 BY id LIMIT {n:UInt32}",
        {"d": deployment, "at": at, "n": max(1, int(limit))},
    )
    history = [{**r, "weights": weights(r)} for r in rows]
    return {"deployment": deployment, "at": at, "serving": served_at(rows, None), "history": history}
