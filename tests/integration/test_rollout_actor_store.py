"""Who made a route change, as `rollout_events` keeps it (migration 018) and `rollout_history` reads it."""

from __future__ import annotations

import pytest

from lockgate.contracts import RolloutState
from lockgate.services.query.rollouts import rollout_history
from lockgate.store import open_store
from lockgate.store.migrate import _statements, apply_migrations, migration_files
from lockgate.store.tables import ROLLOUT_EVENTS

pytestmark = pytest.mark.timeout(60)


def test_history_names_the_operator_the_router_or_unknown_for_rows_stored_before(chdb_url: str, unique: str) -> None:
    store = open_store(chdb_url, unique, migrate=False)
    try:
        # The table as 001 made it, with a row an operator's start stored before the actor was kept.
        core = next(sql for version, _, sql in migration_files() if version == 1)
        store.command(next(s for s in _statements(core) if "TABLE IF NOT EXISTS rollout_events" in s))
        store.command("INSERT INTO rollout_events (id, time, deployment, stable_release, canary_release, phase, "
                      "reason) VALUES ('old', now64(6), 'web', 'r0', 'r1', 'idle', 'canary r1 started at 0%')")
        assert "018_rollout_actor.sql" in apply_migrations(store)
        new = [RolloutState(deployment="web", stable_release="r0", canary_release="r2", reason="gate PASS"),
               RolloutState(deployment="web", stable_release="r0", canary_release="r2", reason="canary r2 started",
                            actor="apikey:k1(operator@default/shop)")]
        store.insert_columns(ROLLOUT_EVENTS.name, ROLLOUT_EVENTS.columns, ROLLOUT_EVENTS.data(new), token=None)
        actors = {r["reason"]: r["actor"] for r in rollout_history(store, "web")}
        assert actors == {"canary r1 started at 0%": "unknown", "gate PASS": "router",
                          "canary r2 started": "apikey:k1(operator@default/shop)"}
    finally:
        store.command(f"DROP DATABASE IF EXISTS {unique}")
