"""Rollout history: every route change the router announced, and the signed analysis records, newest first."""

from __future__ import annotations

from typing import Any

from lockgate.services.query.registry import Limit
from lockgate.store import Store


def rollout_history(store: Store, deployment: str, limit: Limit = 50) -> list[dict[str, Any]]:
    """{time, phase, stable_release, canary_release, canary_weight, step, actor, reason, decision_id} of a
    deployment. `actor` is who made the change: an operator's API key identity, `router` for a change the router
    made on evidence (the reason says which), `unknown` on rows stored before the actor was kept."""
    return store.rows(
        "SELECT time, phase, stable_release, canary_release, canary_weight, step, "
        "if(actor = '', 'router', actor) AS actor, reason, decision_id "
        "FROM rollout_events WHERE deployment = {d:String} ORDER BY time DESC, id LIMIT {n:UInt32}",
        {"d": deployment, "n": max(0, int(limit))},
    )


def analysis_runs(store: Store, deployment: str, limit: Limit = 20) -> list[dict[str, Any]]:
    """The signed analysis records of a deployment's rollouts (every stored column), newest first."""
    return store.rows(
        "SELECT * FROM analysis_runs WHERE deployment = {d:String} ORDER BY time DESC, id LIMIT {n:UInt32}",
        {"d": deployment, "n": max(0, int(limit))},
    )
