"""The router's secrets are the router's (probe p10, F9 and F13).

On a stack run as `lockgate up` runs it (its own nats-server, a user per identity), two router replicas on the `router`
NATS user. Before, each rollout's sticky-bucket salt was stored in the route's KV record, which the CLI's viewer,
operator and approver users read whole (`$JS.API.STREAM.MSG.GET` of the routes bucket), and the events' `user_hash`
was sha256 of the raw user id: whoever read the events hashed small integers and known emails and had the ids back.
Now both are keyed with a secret the router alone reads (its own bucket, created once by the first replica): the
record holds no salt, no read role reads the secret, and both replicas split and hash users alike."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import nats.errors
import nats.js.errors
import pytest

from lockgate import credentials
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.server.runtime import Runtime
from lockgate.server.service import ServiceContext
from lockgate.services.router.endpoints import Endpoints
from lockgate.services.router.rollouts import Rollouts
from lockgate.subjects import token
from lockgate.telemetry import Telemetry
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import Replicas, admin_headers, register_model_release, served_events, store_pass

pytestmark = pytest.mark.timeout(120)
USERS = ["73519", "alice.martin@example.com", *(f"user-{i}" for i in range(30))]


@pytest.fixture
async def routers(settings: Settings) -> AsyncIterator[tuple[Runtime, Any, Any]]:
    """The runtime's router and a second replica on its own `router` connection, `shop-web` canarying shop-v2 at 50%
    (started by an admin key on the first replica)."""
    async with SimServer(SimConfig(models={"m": ModelSpec(default="shop answers")})) as sim:
        runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", stable_upstream=sim.url,
                                           canary_upstream=sim.url, deployment="chat",
                                           rollout_step_interval_s=3600), services=["router"])  # held at 50%
        await runtime.start()
        replicas = Replicas()
        try:
            s, bus = runtime.settings, runtime.ctx.bus
            for release in ("shop-v1", "shop-v2"):
                await register_model_release(bus, release, "m", "default", app="shop", tenant="default")
                await store_pass(bus, release, s)
            other = Bus(s.nats_url, bus.subjects, name="router-b", auth=credentials.for_identity(s, "router"),
                        manage_topology=False)
            await other.connect()
            b = await replicas.router(other, s, runtime.ctx.store)
            a = runtime.services["router"]
            body = {"stable_release": "shop-v1", "canary_release": "shop-v2", "initial_weight": 50}
            async with aiohttp.ClientSession(headers=admin_headers(s.home)) as http, \
                    http.put(f"{a.url}/lockgate/v1/deployments/shop-web", json=body) as resp:
                assert resp.status == 200, await resp.text()
            await b.rollouts.wait_for(lambda r: "shop-web" in r and r["shop-web"].weight == 50, timeout=10)
            yield runtime, a, b
        finally:
            await replicas.close()
            await runtime.stop()


async def _reader(runtime: Runtime, role: str) -> Bus:
    s = runtime.settings
    bus = Bus(s.nats_url, runtime.ctx.bus.subjects, name=f"test-{role}", auth=credentials.for_identity(s, role),
              manage_topology=False)
    await bus.connect()
    return bus


async def test_no_read_role_reads_the_routers_secret_nor_a_salt_in_a_route(routers) -> None:
    runtime, a, _ = routers
    subjects = runtime.ctx.bus.subjects
    for role in ("viewer", "operator", "approver"):
        reader = await _reader(runtime, role)
        try:
            # The probe's read: the route record whole, as the CLI's roles read it (`plan`, `status`).
            got = json.loads((await reader.nc.request(
                f"$JS.API.STREAM.MSG.GET.KV_{subjects.kv_routes}",
                json.dumps({"last_by_subj": f"$KV.{subjects.kv_routes}.{token('shop-web')}"}).encode(),
                timeout=5)).data)
            record = base64.b64decode(got["message"]["data"]).decode()
            stored = json.loads(record)
            assert stored["canary"]["release"] == "shop-v2" and stored.get("salt", "") == "", (role, stored)
            salt = a.rollouts.sticky_salt(a.rollouts.route("shop-web"))  # what the replicas split users with
            assert salt and len(a.rollouts.secret) == 32, role
            assert salt not in record and a.rollouts.secret.hex() not in record, role
            # And the secret's bucket: every way a reader reads a bucket, refused by the server (no answer comes).
            bucket = subjects.kv_router_secret
            last = {"last_by_subj": f"$KV.{bucket}.secret"}
            for subject, payload in ((f"$JS.API.STREAM.MSG.GET.KV_{bucket}", last),
                                     (f"$JS.API.DIRECT.GET.KV_{bucket}", last),
                                     (f"$JS.API.CONSUMER.CREATE.KV_{bucket}", {"stream_name": f"KV_{bucket}"})):
                with pytest.raises((TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                    await reader.nc.request(subject, json.dumps(payload).encode(), timeout=1)
                await reader.nc.flush()
                assert reader.refused(subject) is not None, (role, subject)
        finally:
            await reader.close()


async def _arm(http: aiohttp.ClientSession, router: Any, user: str) -> str:
    # An admin key's answer names the arm (an operator debugging); the events say it for every key.
    async with http.post(f"{router.url}/v1/chat/completions", headers={"x-lockgate-deployment": "shop-web"},
                         json={"model": "m", "user": user, "messages": [{"role": "user", "content": "my order?"}]}) \
            as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["x-lockgate-variant"]


async def test_both_replicas_split_and_hash_a_user_alike_with_a_key_no_reader_has(routers) -> None:
    runtime, a, b = routers
    bus = runtime.ctx.bus
    served = await bus.nc.subscribe(bus.subjects.served_all)
    async with aiohttp.ClientSession(headers=admin_headers(runtime.settings.home)) as http:
        arms = {}
        for user in USERS:
            arms[user] = await _arm(http, a, user)
            assert await _arm(http, b, user) == arms[user], user  # sticky across replicas
    assert set(arms.values()) == {"canary", "stable"}
    events = await served_events(served, 2 * len(USERS))
    # The probe's reversal (hashing candidate ids and emails) finds none of them: not one hash is sha256(user)[:16].
    assert not {e.user_hash for e in events} & {hashlib.sha256(u.encode()).hexdigest()[:16] for u in USERS}
    assert a.rollouts.secret == b.rollouts.secret  # one secret, created by whichever replica came first
    hashes: dict[str, set[str]] = {}
    for event in events:
        assert event.user_hash not in USERS
        hashes.setdefault(event.variant, set()).add(event.user_hash)
    (tenant,) = {e.tenant for e in events}
    by_user = {u: a.rollouts.user_hash(tenant, u) for u in USERS}
    assert by_user == {u: b.rollouts.user_hash(tenant, u) for u in USERS}
    assert {e.user_hash for e in events} == set(by_user.values())  # each user one hash, from either replica
    assert all(by_user[u] in hashes[arms[u]] for u in USERS)


async def test_replicas_starting_together_hold_one_secret_which_nobody_replaces(settings: Settings, bus: Bus,
                                                                                 context: ServiceContext) -> None:
    # The first replica's create wins; the other's is refused and it reads the winner's. The bucket keeps a key's
    # first value for good: a later put (a router's, any writer's) is refused, so no split or user hash moves.
    other = Bus(settings.nats_url, bus.subjects, name="router-b")
    await other.connect()
    try:
        one = Rollouts(context, Endpoints(settings))
        two = Rollouts(ServiceContext(bus=other, store=context.store, telemetry=Telemetry(), settings=settings),
                       Endpoints(settings))
        await asyncio.gather(one.load_secret(), two.load_secret())
        assert one.secret == two.secret and len(one.secret) == 32
        kv = await bus.kv(bus.subjects.kv_router_secret)
        with pytest.raises(nats.js.errors.APIError):
            await kv.put("secret", bytes(32))
        assert (await kv.get("secret")).value == one.secret
    finally:
        await other.close()
