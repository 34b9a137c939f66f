"""A router replica measures its clock against the NATS server's and reports itself degraded when it is off: rollout
times are written with one replica's clock and compared with another's (p5: a replica 120 s behind started a
rollout that the other judged on an aborted attempt's events, skipping its initial delay). On a real nats-server with
auth on, the replica reading the server's time as the router identity."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from lockgate.server.apikeys import bootstrap
from lockgate.services.router import clock
from tests.integration.test_router_drift_replay import Stack, stack

pytestmark = pytest.mark.timeout(60)
__all__ = ["stack"]  # the fixture, imported


async def _health(router: Any) -> dict[str, Any]:
    await router.clock_checked.wait_for(1, timeout_s=10)
    async with aiohttp.ClientSession() as http, http.get(f"{router.url}/healthz") as resp:
        assert resp.status == 200  # degraded, never unready: it still serves
        return dict(await resp.json())


async def test_a_replica_whose_clock_is_off_the_servers_reports_itself_degraded(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    bootstrap(stack.settings.home)  # a router without a key is not ready (503), whatever its clock
    health = await _health(await stack.replica("router-a"))
    assert (health["status"], health["clock_skewed"]) == ("ok", False), health
    assert abs(health["clock_offset_s"]) < clock.MAX_SKEW_S

    monkeypatch.setattr(clock, "now", lambda: time.time() - 120)  # a replica 120 s behind (no NTP, a resumed VM)
    health = await _health(await stack.replica("router-b"))
    assert (health["status"], health["clock_skewed"]) == ("degraded", True), health
    assert -121 < health["clock_offset_s"] < -119
