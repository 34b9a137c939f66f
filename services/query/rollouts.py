"""Rollout history: every route change the router announced, newest first."""

from __future__ import annotations

from typing import Any

from lockgate.store import Store


def rollout_history(store: Store, deployment: str, limit: int = 50) -> list[dict[str, Any]]:
    """{time, phase, stable_release, canary_release, canary_weight, step, reason, decision_id} of a deployment."""
    return store.rows(
        "SELECT time, phase, stable_release, canary_release, canary_weight, step, reason, decision_id "
        "FROM rollout_events WHERE deployment = {d:String} ORDER BY time DESC, id LIMIT {n:UInt32}",
        {"d": deployment, "n": max(0, int(limit))},
    )
