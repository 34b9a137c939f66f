"""A router replica cut off from NATS serves stable only once the loss outlasts `router_cut_off_s`: it would not
hear a BLOCK of the canary, nor another replica's abort. Back on the bus, it reloads its routes and serves what
was decided meanwhile. On a real nats-server with auth on, one replica partitioned by a relay."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from lockgate import credentials
from lockgate.bus import Bus
from lockgate.contracts import GateDecided
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate.subjects import Subjects
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import Relay, Replicas, admin_headers, gate_decided
from tests.integration.test_router_drift_replay import Stack, _rollout, stack

pytestmark = pytest.mark.timeout(90)
__all__ = ["stack"]  # the fixture, imported


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(SimConfig(models={"m": ModelSpec(default="hi")})) as s:
        yield s


async def _releases(router: Any, n: int, headers: dict[str, str] | None = None) -> set[str]:
    """The releases that answered n requests of distinct users through `router`."""
    seen = set()
    async with aiohttp.ClientSession(headers=admin_headers(router.ctx.settings.home)) as http:
        for i in range(n):
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": f"user-{i}"}
            async with http.post(f"{router.url}/v1/chat/completions", json=body, headers=headers or {}) as resp:
                assert resp.status == 200, await resp.text()
                seen.add(resp.headers["x-lockgate-release"])
    return seen


async def _health(router: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{router.url}/healthz") as resp:
        return dict(await resp.json())


@pytest.mark.parametrize("partition", ["lost", "unanswered"])
async def test_a_replica_cut_off_from_the_bus_stops_serving_the_canary_until_it_has_caught_up(
        stack: Stack, sim: SimServer, partition: str) -> None:
    # Before: router-b, cut off, kept sending half its users to r2 after the gate BLOCKed it (router-a aborted
    # the canary), 5 s and 35 s later alike, until its connection came back. "unanswered" (probe p2): with
    # nats-server hung (SIGSTOP) for 28 s, the replicas said the bus was unresponsive within 4 s yet kept the canary
    # at its weight, since a connection that stays open counts as lost only after about two minutes of unanswered
    # pings. Here router-b's connection is dropped ("lost"), or stays open with nothing coming back ("unanswered").
    stack.settings = stack.settings.replace(stable_upstream=sim.url, canary_upstream=sim.url)
    # Trusted before the replicas start: a key trusted while they run is read on its file's change, and a BLOCK
    # verified before that waits (the canary at 0%, not aborted).
    signer = Signer.generate()
    trust_key(trust_file_path(stack.settings), signer.public)
    a = await stack.replica("router-a")
    await _rollout(stack, a)  # r2 at 50% against r1
    relay, partitioned = Relay(int(stack.settings.nats_url.rpartition(":")[2])), Replicas()
    try:
        bus = Bus(f"nats://127.0.0.1:{await relay.start()}", Subjects(stack.settings.prefix), name="router-b",
                  auth=credentials.for_identity(stack.settings, "router"), manage_topology=False)
        await bus.connect()
        b = await partitioned.router(bus, stack.settings.replace(router_cut_off_s=0.5), stack.store)
        assert await _releases(b, 40) == {"r1", "r2"}
        assert (await _health(b))["serving"] == "all"

        if partition == "lost":
            relay.cut()  # router-b alone loses the server, which stays up for router-a
            await bus.wait_state("reconnecting", timeout_s=10)
        else:
            relay.hang()
        await b.rollouts.wait_for(lambda _: b.rollouts.cut_off, timeout=20)  # once the bound is over
        health = await _health(b)
        seen = "reconnecting" if partition == "lost" else "unresponsive"
        assert (health["status"], health["bus"], health["serving"]) == ("degraded", seen, "stable_only"), health
        await gate_decided(stack.named["admin"], signer.sign(GateDecided(release="r2", rules=[], decision="BLOCK",
                                                                         reason="toxicity")))
        await a.rollouts.wait_for(lambda r: r["chat"].phase == "aborted", timeout=10)
        await a.rollouts.flush()
        assert b.rollouts.route("chat").weight == 50.0  # b cannot know
        assert await _releases(b, 40) == {"r1"}  # ... yet sends nobody to the BLOCKed canary

        relay.heal()
        relay.release()
        await b.rollouts.wait_for(lambda _: not b.rollouts.cut_off, timeout=30)  # back, routes reloaded
        route = b.rollouts.route("chat")
        assert (route.phase, route.weight) == ("aborted", 0.0), route.reason
        assert (await _health(b))["serving"] == "all" and await _releases(b, 40) == {"r1"}
    finally:
        relay.release()
        await partitioned.close()  # through the relay, while it still relays
        await relay.close()


async def test_a_replica_cut_off_past_the_refuse_bound_refuses_governed_requests_until_it_is_back(
        stack: Stack, sim: SimServer) -> None:
    # The residual of serving stable only (probe p3): a stable the gate BLOCKs, or a person rejects, while a replica
    # is cut off kept serving there for the whole cut. An operator who puts enforcement first sets
    # router_cut_off_refuse_s: past it the replica refuses, and its clients retry on another replica.
    stack.settings = stack.settings.replace(stable_upstream=sim.url, canary_upstream=sim.url)
    a = await stack.replica("router-a")
    await _rollout(stack, a)
    relay, partitioned = Relay(int(stack.settings.nats_url.rpartition(":")[2])), Replicas()
    try:
        bus = Bus(f"nats://127.0.0.1:{await relay.start()}", Subjects(stack.settings.prefix), name="router-b",
                  auth=credentials.for_identity(stack.settings, "router"), manage_topology=False)
        await bus.connect()
        b = await partitioned.router(bus, stack.settings.replace(router_cut_off_s=0.5, router_cut_off_refuse_s=3),
                                     stack.store)
        assert await _releases(b, 10) == {"r1", "r2"}

        relay.cut()
        await bus.wait_state("reconnecting", timeout_s=10)
        await b.rollouts.wait_for(lambda _: b.rollouts.cut_off, timeout=20)
        assert (await _health(b))["serving"] == "stable_only"  # within the refuse bound: stable
        await b.rollouts.wait_for(lambda _: b.rollouts.refusing, timeout=20)
        assert (await _health(b))["serving"] == "none"
        async with aiohttp.ClientSession(headers=admin_headers(b.ctx.settings.home)) as http:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "u"}
            async with http.post(f"{b.url}/v1/chat/completions", json=body) as resp:
                error = (await resp.json())["error"]
                assert (resp.status, error["code"], error["type"]) == (503, "cut_off_from_bus", "service_unavailable")
                assert "cut off from lockgate's bus for more than 3.5 s" in error["message"]
                assert "another replica serves it" in error["message"]
        assert sim.requests == {"m": 10}  # nothing reached the upstream since

        relay.heal()
        await b.rollouts.wait_for(lambda _: not b.rollouts.cut_off, timeout=30)
        assert not b.rollouts.refusing and await _releases(b, 10) == {"r1", "r2"}
    finally:
        await partitioned.close()
        await relay.close()
