"""A canary whose endpoint breaker is open (its requests answered by stable, without a call) neither advances a step
nor is promoted, whatever its analysis says, on the replica whose breaker it is or on another one that only sees
its diversions in the routers' events; the step waits, saying why, and goes on once the breaker closes. On the real
nats-server, chDB and the simulator, through the router's HTTP API."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from lockgate.codec import Codec
from lockgate.contracts import RolloutState
from lockgate.server.apikeys import bootstrap
from lockgate.server.service import ServiceContext
from lockgate.services.router.domain import Route, bucket
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate.store import Store
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import chat_releases, served_events
from tests.integration.test_rollout_analysis import _pass, _start
from tests.integration.test_router_evidence_replay import Stack

pytestmark = pytest.mark.timeout(120)

_states: Codec[RolloutState] = Codec(RolloutState)
STABLE = SimConfig(models={"m": ModelSpec(default="stable says hi")}, seed=3)
# Judged on latency alone, which its good answers pass (its failures are the breaker's to see): without the hold,
# the look after the breaker opened advanced it to 100%, then promoted it onto a breaker that refuses every call.
LATENCY = {"steps": [50, 100], "interval_s": 0.2,
           "analysis": {"metrics": [{"name": "latency_p95", "max": 5000}], "min_sample": 30,
                        "inconclusive_limit": 1000}}
HEALTHY = 20  # the canary's good answers before it fails: fewer than min_sample, so no look passes on them alone
HELD = "canary's endpoint breaker open since"


def _canary() -> SimConfig:
    """The canary's simulator: it answers well until the test makes it fail every call (`_fail`); a config of its
    own for each test, as `_fail` changes it."""
    return SimConfig(models={"turns": ModelSpec(default="turns says hi")}, seed=3)


def _fail(sim: SimServer, failing: bool) -> None:
    """Make the simulated canary model fail every call (or none): its spec is read on every request."""
    sim.config.models["turns"].error_rate = 1.0 if failing else 0.0


@pytest.fixture
async def http(context: ServiceContext) -> AsyncIterator[aiohttp.ClientSession]:
    keys = bootstrap(context.settings.home, tenant="default", app="shop")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as s:
        yield s


async def _replicas(context: ServiceContext, store: Store, tmp_path: Any, canary_url: str, stable_url: str,
                    cooldown_s: float) -> tuple[Stack, Signer]:
    """Router replicas of `chat` whose canary endpoint is not retried, and whose breaker opens after three failed
    calls in a row for `cooldown_s`."""
    signer = Signer.generate()
    trust_key(trust_file_path(context.settings), signer.public)
    await chat_releases(context, signer, stable_url, canary_url, ("turns",))
    path = tmp_path / "endpoints.yaml"
    path.write_text(json.dumps({"endpoints": {  # JSON is YAML
        "default": {"url": stable_url},
        "canary": {"url": canary_url, "retry": {"attempts": 1},
                   "breaker": {"consecutive_failures": 3, "cooldown_s": cooldown_s}}}}))
    context.settings = context.settings.replace(endpoints_file=str(path))
    return Stack(context, store), signer


async def _ask(http: aiohttp.ClientSession, router: Any, user: str) -> str:
    """One request of `user`; the arm that answered it (shown to the admin's key)."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(f"{router.url}/v1/chat/completions", json=body, headers={"x-lockgate-user": user}) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["x-lockgate-variant"]


def _arms(router: Any, route: Route, n: int) -> tuple[list[str], list[str]]:
    """`n` users the 50% step sends to the canary, and `n` it sends to stable."""
    salt = router.rollouts.sticky_salt(route)
    users = [f"user-{i}" for i in range(20 * n)]
    canary = [u for u in users if bucket("chat", u, salt) < 5000][:n]
    stable = [u for u in users if bucket("chat", u, salt) >= 5000][:n]
    return canary, stable


async def _healthy_then_failing(http: aiohttp.ClientSession, router: Any, sim: SimServer) -> list[str]:
    """At the 50% step: the canary answers `HEALTHY` requests, and stable twice as many (no look passes yet), then
    it fails every call, and its breaker opens after three. Returns the canary's users not asked yet."""
    route = router.rollouts.route("chat")
    assert (route.phase, route.weight) == ("progressing", 50.0)
    canary, stable = _arms(router, route, 400)
    for user in canary[:HEALTHY]:
        assert await _ask(http, router, user) == "canary"
    for user in stable[:2 * HEALTHY]:
        assert await _ask(http, router, user) == "stable"
    _fail(sim, True)
    for user in canary[HEALTHY:HEALTHY + 3]:  # its three failed calls, each answered by stable: the breaker opens
        assert await _ask(http, router, user) == "stable"
    assert router.rollouts.route("chat").weight == 50.0
    return canary[HEALTHY + 3:]


def _passed_held(route: Route) -> bool:
    """True once a look passed and the breaker held the step all the same."""
    last = route.analysis.last if route.analysis is not None else None
    return HELD in route.reason and last is not None and last.verdict == "SUCCESSFUL"


async def test_an_open_breaker_holds_the_canarys_step_and_promotion_until_it_closes(
        context: ServiceContext, store: Store, tmp_path: Any, http: aiohttp.ClientSession) -> None:
    # Found by a probe (p24): a canary was promoted while its endpoint's breaker was open in the router (its requests
    # diverted to stable), and the promoted release then answered 502 to everyone until the cooldown ended.
    async with SimServer(STABLE) as stable, SimServer(_canary()) as sim:
        replicas, signer = await _replicas(context, store, tmp_path, sim.url, stable.url, cooldown_s=2.0)
        try:
            router = await replicas.start()
            bus = router.ctx.bus
            states = await bus.nc.subscribe(bus.subjects.rollout("chat"))
            await _start(http, router, "turns", LATENCY)
            await _pass(router, signer, "turns")
            left = await _healthy_then_failing(http, router, sim)
            users, again = iter(left), itertools.cycle(left)
            # Its requests are diverted to stable now: the look that passes once its sample is full holds the step.
            while (route := router.rollouts.route("chat")).weight == 50.0 and not _passed_held(route):
                assert await _ask(http, router, next(users)) == "stable"
            assert (route.phase, route.weight, route.step) == ("progressing", 50.0, 1), route.reason
            assert HELD in route.reason and " requests to stable" in route.reason, route.reason
            # The diverted requests count as the canary's failures: all but its good answers failed.
            sample = router.rollouts.evidence.sample("chat", "turns", route.started_at)
            assert sample.n >= 30 and sample.errors == sample.n - HEALTHY, (sample.n, sample.errors)

            # The canary recovers: once its breaker closes (a probe after the cooldown), the steps go on.
            _fail(sim, False)
            while (route := router.rollouts.route("chat")).phase == "progressing":
                await _ask(http, router, next(again))
            assert route.phase == "promoted" and route.stable.release == "turns", route.reason
            seen = [_states.decode((await states.next_msg(timeout=10)).data)]
            while seen[-1].phase != "promoted":
                seen.append(_states.decode((await states.next_msg(timeout=10)).data))
            held = [s for s in seen if HELD in s.reason]
            assert held and all(s.canary_weight == 50.0 for s in held), [(s.canary_weight, s.reason) for s in seen]
            # The hold was announced before the next step, and never after it.
            assert seen.index(held[-1]) < next(i for i, s in enumerate(seen) if s.canary_weight == 100.0)
        finally:
            await replicas.close()


async def test_a_replica_holds_the_step_on_the_diversions_another_replicas_breaker_made(
        context: ServiceContext, store: Store, tmp_path: Any, http: aiohttp.ClientSession) -> None:
    # Each replica has breakers of its own. Replica A's is open (for an hour) and diverted the canary's requests;
    # replica B, whose breaker never saw a call fail, decides the step alone once A is gone: the diversions in A's
    # events hold it as A's breaker held A's.
    async with SimServer(STABLE) as stable, SimServer(_canary()) as sim:
        replicas, signer = await _replicas(context, store, tmp_path, sim.url, stable.url, cooldown_s=3600.0)
        try:
            a = await replicas.start()
            b = await replicas.start()
            bus = b.ctx.bus
            served = await bus.nc.subscribe(bus.subjects.served_all)
            await _start(http, a, "turns", LATENCY)
            await _pass(a, signer, "turns")
            await b.rollouts.wait_for(lambda r: r["chat"].weight == 50.0, timeout=10)
            users = await _healthy_then_failing(http, a, sim)
            for user in users[:20]:  # diverted by A's open breaker, without a call
                assert await _ask(http, a, user) == "stable"
            # Every request's events (a failed call is one more) published, so B has them (or soon will).
            events = await served_events(served, 3 * HEALTHY + 3 * 2 + 20)
            assert sum(e.attributes.get("lockgate.fallback_reason") == "breaker_open" for e in events) == 20
            await replicas.stop(a)
            gone = time.time()

            def looked(routes: dict[str, Route]) -> bool:
                r = routes["chat"]
                return r.weight != 50.0 or (r.analysis is not None and r.analysis.at > gone and _passed_held(r)
                                            and "diverted 20 " in r.reason)

            await b.rollouts.wait_for(looked, timeout=20)
            route = b.rollouts.route("chat")
            assert (route.phase, route.weight) == ("progressing", 50.0), route.reason
            # Its analysis passed: the breaker alone holds it.
            assert _passed_held(route) and "diverted 20 requests to stable" in route.reason, route.reason
        finally:
            await replicas.close()


async def test_an_open_breaker_holds_the_step_clock_of_a_canary_without_analysis(
        context: ServiceContext, store: Store, tmp_path: Any, http: aiohttp.ClientSession) -> None:
    # Without an analysis the clock moves the steps; an open breaker holds them all the same.
    async with SimServer(STABLE) as stable, SimServer(_canary()) as sim:
        replicas, signer = await _replicas(context, store, tmp_path, sim.url, stable.url, cooldown_s=3600.0)
        try:
            router = await replicas.start()
            await _start(http, router, "turns", {"steps": [50, 100], "interval_s": 1.0})
            await _pass(router, signer, "turns")
            _fail(sim, True)
            canary, _ = _arms(router, router.rollouts.route("chat"), 3)
            for user in canary:  # three failed calls in a row: the breaker opens (for an hour)
                assert await _ask(http, router, user) == "stable"
            await router.rollouts.wait_for(lambda r: HELD in r["chat"].reason or r["chat"].phase != "progressing",
                                           timeout=20)
            route = router.rollouts.route("chat")
            assert route.phase == "progressing" and route.stable.release == "r1", route.reason
            assert f"{HELD} " in route.reason and "diverted 0 requests to stable" in route.reason, route.reason
        finally:
            await replicas.close()
