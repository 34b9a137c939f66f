"""A router that (re)starts mid-canary reads back the served events and must count the requests an open breaker
diverted from a failing canary as the live routers did: as the canary's failures once it has failed a call of its
own. The read-back is not in time order (the events the inference stream still holds, the newest, come before the
rest from the record, and live ones arrive meanwhile). On the real nats-server, chDB and the simulator."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from lockgate.contracts import InferenceEvent
from lockgate.server.service import ServiceContext
from lockgate.services.router.domain import bucket
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate.store import Store
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import chat_releases, served_events
from tests.integration import test_router_evidence_replay as replay_tests
from tests.integration.test_rollout_analysis import _pass, _start
from tests.integration.test_router_evidence_replay import Stack, _consume_as_the_other_readers

http = replay_tests.http  # the admin's API session of the evidence replay tests (a fixture)

pytestmark = pytest.mark.timeout(120)

STABLE = SimConfig(models={"m": ModelSpec(default="stable says hi")}, seed=3)
CANARY = SimConfig(models={"dead": ModelSpec(default="dead canary", error_rate=1.0)}, seed=3)
# Looked at in an hour: nothing is judged while the test runs, only the evidence each replica holds.
QUIET = {"steps": [50, 100], "interval_s": 3600,
         "analysis": {"metrics": [{"name": "error_rate", "max_increase": 0.01}], "min_sample": 100}}


@pytest.fixture
async def stack(context: ServiceContext, store: Store, tmp_path: Any) -> AsyncIterator[tuple[Stack, Signer]]:
    """Replicas of a router whose canary endpoint fails every call: no retry, and three failures in a row open the
    canary model's breaker for an hour (its requests are then diverted to stable without a call)."""
    signer = Signer.generate()
    trust_key(trust_file_path(context.settings), signer.public)
    async with SimServer(STABLE) as stable, SimServer(CANARY) as canary:
        await chat_releases(context, signer, stable.url, canary.url, ("dead",))
        path = tmp_path / "endpoints.yaml"
        path.write_text(json.dumps({"endpoints": {  # JSON is YAML
            "default": {"url": stable.url},
            "canary": {"url": canary.url, "retry": {"attempts": 1},
                       "breaker": {"consecutive_failures": 3, "cooldown_s": 3600}}}}))
        context.settings = context.settings.replace(endpoints_file=str(path))
        s = Stack(context, store)
        try:
            yield s, signer
        finally:
            await s.close()


async def _ask(http: aiohttp.ClientSession, router: Any, users: list[str]) -> None:
    """One request from each of `users` (all on the canary's arm), in turn: each is answered by stable."""
    for user in users:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(f"{router.url}/v1/chat/completions", json=body,
                             headers={"x-lockgate-user": user}) as resp:
            assert (resp.status, resp.headers["x-lockgate-variant"]) == (200, "stable"), await resp.text()


def _diverted(e: InferenceEvent) -> bool:
    return e.attributes.get("lockgate.fallback_reason") == "breaker_open"


async def test_a_restarted_replica_counts_the_diversions_of_a_failing_canary_as_the_live_one_does(
        stack: tuple[Stack, Signer], http: aiohttp.ClientSession, run_services: Callable[..., Any]) -> None:
    # Before: the restarted replica read the diversions still in the stream before the canary's failures in the
    # record, and counted a diversion as a failure only after a failure it had read: the canary's 20 diversions
    # were stable's successes alone, and it judged the canary on 3 requests, where the live replica had 23 failures.
    replicas, signer = stack
    sink = (await run_services("sink", "query"))["sink"]
    live = await replicas.start()
    bus = replicas.context.bus
    served = await bus.nc.subscribe(bus.subjects.served_all)
    await _start(http, live, "dead", QUIET)
    await _pass(live, signer, "dead")
    route = live.rollouts.route("chat")
    assert route.weight == 50
    salt = live.rollouts.sticky_salt(route)
    users = [u for u in (f"user-{i}" for i in range(200)) if bucket("chat", u, salt) < 5000][:23]

    # The canary fails three calls (each answered by stable): its breaker opens. Stored, and then taken by every
    # reader of the stream: these events are in the record only.
    await _ask(http, live, users[:3])
    first = await served_events(served, 6)
    assert sorted((e.release, e.status) for e in first) == [("dead", "error")] * 3 + [("r1", "ok")] * 3
    await _consume_as_the_other_readers(bus, sink.handlers.events, 6)
    # Then its requests are diverted to stable without a call: stored, and still in the stream (the sink took them,
    # the other readers not yet), where a starting replica reads first.
    await _ask(http, live, users[3:])
    then = await served_events(served, 20)
    assert all(_diverted(e) and e.release == "r1" for e in then)
    await sink.handlers.events.wait_for(26)

    restarted = await replicas.start()
    async with asyncio.timeout(30):
        await restarted.rollouts.replayed.wait()
    views = {name: (r.rollouts.evidence.sample("chat", "dead", route.started_at),
                    r.rollouts.evidence.sample("chat", "r1", route.started_at))
             for name, r in (("live", live), ("restarted", restarted))}
    counts = {name: ((c.n, c.errors), (s.n, s.errors)) for name, (c, s) in views.items()}
    # The live rule: 3 failed calls, then 20 diversions counted as failures too; stable answered all 23.
    assert counts["live"] == ((23, 23), (23, 0)), counts
    assert counts["restarted"] == counts["live"], counts
