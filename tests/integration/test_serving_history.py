"""`lockgate history DEPLOYMENT --at T`: what served at any past time, from the rollout events the router
published and the sink stored, asked through the query service as the CLI does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner

from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.contracts import RolloutState
from tests.helpers import sink_stored

pytestmark = pytest.mark.timeout(90)

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _history(settings: Settings, *args: str) -> dict[str, Any]:
    from lockgate.cli.main import cli

    env = {"LOCKGATE_NATS_URL": settings.nats_url, "LOCKGATE_PREFIX": settings.prefix,
           "LOCKGATE_DATABASE": settings.database, "LOCKGATE_CLICKHOUSE_URL": settings.clickhouse_url,
           "LOCKGATE_HOME": settings.home}
    result = CliRunner().invoke(cli, ["history", "checkout", *args, "--json"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


async def test_what_served_at_a_time_over_a_rollout_that_changed_twice(
    run_services: Callable[..., Any], bus: Bus, settings: Settings
) -> None:
    svcs = await run_services("sink", "query")
    changes = [
        RolloutState(time=T0, deployment="checkout", stable_release="rel-1", phase="idle"),
        RolloutState(time=T0 + timedelta(minutes=10), deployment="checkout", stable_release="rel-1",
                     canary_release="rel-2", canary_weight=25.0, phase="progressing"),
        RolloutState(time=T0 + timedelta(minutes=20), deployment="checkout", stable_release="rel-2",
                     phase="promoted"),
        RolloutState(time=T0, deployment="elsewhere", stable_release="other", phase="idle"),
    ]
    for change in changes:
        await bus.publish(bus.subjects.rollout(change.deployment), change)
    await bus.publish(bus.subjects.rollout("checkout"), changes[1])  # a redelivery counts once
    await sink_stored(svcs["sink"].handlers, rollout_events=4)

    def at(minutes: int) -> dict[str, Any]:
        return (T0 + timedelta(minutes=minutes)).isoformat()  # type: ignore[return-value]

    before = await asyncio.to_thread(_history, settings, "--at", at(-1))
    assert before["serving"] is None and before["history"] == []
    first = await asyncio.to_thread(_history, settings, "--at", at(5))
    assert first["serving"]["weights"] == {"rel-1": 100.0} and len(first["history"]) == 1
    canary = await asyncio.to_thread(_history, settings, "--at", at(15))
    assert canary["serving"]["weights"] == {"rel-1": 75.0, "rel-2": 25.0}
    assert [h["phase"] for h in canary["history"]] == ["progressing", "idle"]  # newest first, each change once
    exact = await asyncio.to_thread(_history, settings, "--at", at(20))  # a change at T is in force at T
    assert exact["serving"]["weights"] == {"rel-2": 100.0}
    # An offset is honoured: 10:15 at +01:00 is 09:15 UTC, while the canary served.
    offset = await asyncio.to_thread(_history, settings, "--at", "2026-12-01T10:15:00+01:00")
    assert offset["serving"]["weights"] == canary["serving"]["weights"]
    now = await asyncio.to_thread(_history, settings)
    assert now["serving"]["stable_release"] == "rel-2" and len(now["history"]) == 3
