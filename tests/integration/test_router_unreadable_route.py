"""A route record made unreadable keeps whose the deployment is and what it serves (probe p1, F4 and F5).

On a stack run as `lockgate up` runs it (its own nats-server, a user per identity), the CLI's viewer NATS role aims
a JetStream API answer at a deployment's key in the routes bucket (`$KV.<routes>.<deployment>` as the reply
subject): the answer is stored as the deployment's route, which no router can read. Before, the documented repair
(`lockgate rollout start D --stable R`) rebuilt the deployment from nothing, so an operator key gave it any release
the gate allowed at 100% (another app's, PASSed under a lax policy), and on a replica restarted since (it holds no
route for the key) another tenant's operator key took the deployment over. Now every replica takes the key's last
readable revision (its KV history) for the deployment's route: its tenant, app and releases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from lockgate import credentials
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.server.apikeys import KeyStore
from lockgate.server.runtime import Runtime
from lockgate.subjects import token
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import Replicas, admin_headers, register_model_release, store_pass

pytestmark = pytest.mark.timeout(120)
URL = "/lockgate/v1/deployments/shop-web"
HI = [{"role": "user", "content": "hi"}]


class Stack:
    """The runtime, its router, a replica started after the route was made unreadable, and the keys."""

    def __init__(self, runtime: Runtime, replicas: Replicas) -> None:
        self.runtime, self.replicas = runtime, replicas
        self.router: Any = runtime.services["router"]
        self.restarted: Any = None
        home = runtime.settings.home
        store = KeyStore(home)
        self.admin = admin_headers(home)
        self.owner = _bearer(store.create("default", "shop", "operator")[0])  # the deployment's tenant and app
        self.other_tenant = _bearer(store.create("acme", "shopx", "operator")[0])
        self.app_key = store.create("default", "shop", "app")[0]
        self.admin_key = self.admin["Authorization"].removeprefix("Bearer ")

    async def restart(self) -> Any:
        """A router replica started now, on its own `router` NATS user (a crash, a deploy, `up` again)."""
        s = self.runtime.settings
        bus = Bus(s.nats_url, self.runtime.ctx.bus.subjects, name="router-restarted",
                  auth=credentials.for_identity(s, "router"), manage_topology=False)
        await bus.connect()
        self.restarted = await self.replicas.router(bus, s, self.runtime.ctx.store)
        return self.restarted


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    """`shop-web` (tenant default, app shop) serving shop-v1; shop-v2 of the same app, shopx-lax of app shopx and
    acme-rel of tenant acme registered, each with a PASS (uncovered apps pass under whatever policy an eval names)."""
    async with SimServer(SimConfig(models={"m": ModelSpec(default="shop answers"),
                                           "sim-bad": ModelSpec(default="blocked content")})) as sim:
        runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", stable_upstream=sim.url,
                                           canary_upstream=sim.url, deployment="chat"), services=["router"])
        await runtime.start()
        replicas = Replicas()
        try:
            bus = runtime.ctx.bus
            for release, model, app, tenant in (("shop-v1", "m", "shop", "default"), ("shop-v2", "m", "shop", "default"),
                                                 ("shopx-lax", "sim-bad", "shopx", "default"),
                                                 ("acme-rel", "sim-bad", "shopx", "acme")):
                await register_model_release(bus, release, model, "default", app=app, tenant=tenant)
                await store_pass(bus, release, runtime.settings)
            s = Stack(runtime, replicas)
            async with aiohttp.ClientSession() as http:
                await _put(http, s.router, s.owner, {"stable_release": "shop-v1"}, 200)
            yield s
        finally:
            await replicas.close()
            await runtime.stop()


async def _put(http: aiohttp.ClientSession, router: Any, who: dict[str, str], body: dict[str, Any],
               status: int) -> dict[str, Any]:
    async with http.put(f"{router.url}{URL}", json=body, headers=who) as resp:
        assert resp.status == status, await resp.text()
        return await resp.json()


async def _get(http: aiohttp.ClientSession, router: Any, who: dict[str, str], status: int = 200) -> dict[str, Any]:
    async with http.get(f"{router.url}{URL}", headers=who) as resp:
        assert resp.status == status, await resp.text()
        return await resp.json()


async def _make_unreadable(s: Stack, times: int = 1) -> None:
    """What the viewer NATS role can do (`lockgate` CLI's read-only identity): a JetStream API request whose reply
    subject is the route's KV key; the server stores its answer there."""
    runtime = s.runtime
    viewer = Bus(runtime.settings.nats_url, runtime.ctx.bus.subjects, name="test-viewer",
                 auth=credentials.for_identity(runtime.settings, "viewer"), manage_topology=False)
    await viewer.connect()
    routes = await runtime.ctx.bus.kv(runtime.ctx.bus.subjects.kv_routes)
    watcher = await routes.watch(token("shop-web"), include_history=False)
    try:
        # The key's value now: the watch delivers it too, before or after its "that was all" marker (nats.py#842,
        # a CI failure), so an answer is told by its revision, past this one.
        last = (await routes.get(token("shop-web"))).revision
        for _ in range(times):
            await viewer.nc.publish(f"$JS.API.STREAM.INFO.KV_{runtime.ctx.bus.subjects.kv_gates}", b"",
                                    reply=f"$KV.{runtime.ctx.bus.subjects.kv_routes}.{token('shop-web')}")
            entry = await watcher.updates(timeout=5)
            while entry is None or entry.revision <= last:
                entry = await watcher.updates(timeout=5)
            assert entry.value.startswith(b'{"type":"io.nats.jetstream.api.'), entry
            last = entry.revision
    finally:
        await watcher.stop()
        await viewer.close()
    await s.router.rollouts.wait_for(lambda _: "shop-web" in s.router.rollouts.unreadable, timeout=10)


async def _chat(router: Any, key: str) -> Any:
    async with openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=0, timeout=10) as c:
        return await c.chat.completions.with_raw_response.create(
            model="m", messages=HI, extra_headers={"x-lockgate-deployment": "shop-web"})


async def _refused(router: Any, key: str) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await _chat(router, key)
    assert (caught.value.status_code, caught.value.code) == (503, "route_unreadable")


async def test_repairing_an_unreadable_route_keeps_the_deployments_app(stack: Stack) -> None:
    # Before (F4): `PUT shop-web {"stable_release": "shopx-lax"}` answered 200 "first release shopx-lax serves 100%":
    # the shop app's clients got the content shop's required policy BLOCKed, with no canary and no analysis.
    s = stack
    await _make_unreadable(s)
    restarted = await s.restart()
    async with aiohttp.ClientSession() as http:
        for r in (s.router, restarted):
            await _refused(r, s.app_key)
            shown = await _get(http, r, s.owner)  # the last readable revision, marked as not served
            assert shown["stable"]["release"] == "shop-v1" and shown["stable"]["app"] == "shop"
            assert shown["unreadable"]["last_readable_revision"] > 0, shown
            assert "shop-web" in r.rollouts.unreadable
            # Another app's release, alone or as a canary: refused as on the readable route.
            refused = await _put(http, r, s.owner, {"stable_release": "shopx-lax"}, 409)
            assert refused["error"]["code"] == "already_serving"
            assert "its last readable revision" in refused["error"]["message"]
            assert "serves 'shop-v1'" in refused["error"]["message"]
            refused = await _put(http, r, s.owner, {"stable_release": "shop-v1", "canary_release": "shopx-lax"}, 400)
            assert "is of app 'shopx', but 'shop-web' serves app 'shop'" in refused["error"]["message"]
            # Nor another release of its own app at 100% at once: that goes through a canary.
            await _put(http, r, s.owner, {"stable_release": "shop-v2"}, 409)
        assert "shop-web" in s.router.rollouts.unreadable  # nothing was written

        # The repair: the release its last readable revision serves, through the replica restarted since.
        repaired = await _put(http, restarted, s.owner, {"stable_release": "shop-v1"}, 200)
        assert (repaired["stable"]["release"], repaired["phase"]) == ("shop-v1", "promoted")
        assert repaired["reason"].startswith("route restored by ")
        assert "from its last readable revision (" in repaired["reason"]
        await s.router.rollouts.wait_for(lambda _: "shop-web" not in s.router.rollouts.unreadable, timeout=10)
        for r in (s.router, restarted):
            assert "unreadable" not in await _get(http, r, s.owner)
            answer = await _chat(r, s.admin_key)
            assert answer.headers["x-lockgate-release"] == "shop-v1"
            assert answer.parse().choices[0].message.content == "shop answers"
        # And the operator goes on from there: a release of the same app rolls out as a canary.
        started = await _put(http, s.router, s.owner, {"stable_release": "shop-v1", "canary_release": "shop-v2"}, 200)
        assert (started["stable"]["release"], started["canary"]["release"]) == ("shop-v1", "shop-v2")


async def test_a_restarted_router_keeps_an_unreadable_deployment_its_tenants(stack: Stack) -> None:
    # Before (F5): on a replica started after the route was made unreadable, tenant acme's operator key gave
    # shop-web its own release (200); tenant default's clients then got 404, and its operator key too.
    s = stack
    await _make_unreadable(s)
    restarted = await s.restart()
    assert "shop-web" not in restarted.rollouts.routes  # it held nothing for the key until asked
    async with aiohttp.ClientSession() as http:
        for r in (restarted, s.router):
            for body in ({"stable_release": "acme-rel"}, {"stable_release": "acme-rel", "canary_release": "acme-rel"}):
                refused = await _put(http, r, s.other_tenant, body, 404)
                assert refused["error"]["code"] == "deployment_not_found"
            await _get(http, r, s.other_tenant, 404)  # not read either: as a deployment never configured
        assert "shop-web" in s.router.rollouts.unreadable
        repaired = await _put(http, restarted, s.owner, {"stable_release": "shop-v1"}, 200)
        assert (repaired["stable"]["release"], repaired["stable"]["tenant"]) == ("shop-v1", "default")
        await s.router.rollouts.wait_for(lambda _: "shop-web" not in s.router.rollouts.unreadable, timeout=10)
        for r in (restarted, s.router):
            assert (await _chat(r, s.app_key)).parse().choices[0].message.content == "shop answers"
            await _put(http, r, s.other_tenant, {"stable_release": "acme-rel"}, 404)


async def test_with_none_of_its_history_readable_only_an_admin_writes_it_anew(stack: Stack) -> None:
    # The routes bucket keeps 10 revisions a key: as many answers leave nothing readable, and then whose the
    # deployment was is unknown, so no tenant's key may give it a release, its own tenant's included.
    s = stack
    await _make_unreadable(s, times=10)
    restarted = await s.restart()
    async with aiohttp.ClientSession() as http:
        for r in (restarted, s.router):
            await _put(http, r, s.other_tenant, {"stable_release": "acme-rel"}, 404)
            await _put(http, r, s.owner, {"stable_release": "shop-v1"}, 404)
            await _get(http, r, s.owner, 404)
            shown = await _get(http, r, s.admin)
            assert shown["unreadable"]["last_readable_revision"] == 0 and shown["stable"]["release"] == ""
        written = await _put(http, restarted, s.admin, {"stable_release": "shop-v1"}, 200)
        assert "none of whose KV history is readable" in written["reason"]
        await s.router.rollouts.wait_for(lambda _: "shop-web" not in s.router.rollouts.unreadable, timeout=10)
        assert (await _chat(s.router, s.app_key)).parse().choices[0].message.content == "shop answers"
