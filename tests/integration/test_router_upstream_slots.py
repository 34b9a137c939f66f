"""The router's upstream calls in flight are bounded per endpoint, and within an endpoint per tenant, with a bounded
wait for a slot: one tenant's calls to a slow upstream of its own take neither another endpoint's slots nor all of a
shared endpoint's, and a request that gets no slot is the router's 503 (`router_busy`, Retry-After), no evidence of
the release. On the real nats-server, chDB and the router's HTTP API, against an upstream that holds the calls whose
prompt says SLOW (as a long generation does) and answers the others at once.

Found by a probe (p37 F1): one pool of 1000 slots served every tenant, endpoint and release, and its wait had no
bound. acme's app key kept 1000 calls in flight to its own slow upstream; bravo's requests to a healthy one waited for
a slot until their first-byte timeout, were recorded as its upstream's silence (`upstream_unanswered`), and bravo's
canary was aborted on an error rate of 1. The tests use a pool of a few slots, not 1000."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from lockgate.contracts import GateDecided
from lockgate.contracts.inference import ROUTER_BUSY
from lockgate.server.apikeys import KeyStore, bootstrap
from lockgate.server.service import ServiceContext
from lockgate.services.router.evidence import Evidence
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate.store import Store
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import (
    ChatUpstream,
    chat_releases,
    judged,
    register_model_release,
    served_events,
    store_decision,
)
from tests.integration.test_rollout_analysis import _pass, _start
from tests.integration.test_router_breaker_hold import _arms
from tests.integration.test_router_evidence_replay import Stack

pytestmark = pytest.mark.timeout(120)

STABLE = SimConfig(models={"m": ModelSpec(default="stable says hi")}, seed=3)
# The canary passes on its error rate alone (as bravo's in the probe: an absolute bound, which an arm failing every
# request it cannot get a slot for exceeds at once).
ERRORS = {"steps": [50, 100], "interval_s": 0.2,
          "analysis": {"metrics": [{"name": "error_rate", "max": 0.2}], "min_sample": 10,
                       "inconclusive_limit": 1000}}
_COMPLETION = msgspec.json.encode({
    "id": "c1", "object": "chat.completion", "created": 0, "model": "turns",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "canary says hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}})


class _Slow(ChatUpstream):
    """Holds each call whose prompt says SLOW until the test ends (`holding` of them now); answers the others."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = 0
        self.answered = 0
        self._seen = asyncio.Condition()
        self._release = asyncio.Event()

    async def held(self, n: int) -> None:
        """Wait until `n` calls are held."""
        async with self._seen:
            await self._seen.wait_for(lambda: self.holding >= n)

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        if any("SLOW" in str(m.get("content")) for m in body["messages"]):
            async with self._seen:
                self.holding += 1
                self._seen.notify_all()
            await self._release.wait()
        self.answered += 1
        return web.Response(body=_COMPLETION, content_type="application/json")

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        await super().__aexit__(*exc)


@pytest.fixture
async def http(context: ServiceContext) -> AsyncIterator[aiohttp.ClientSession]:
    keys = bootstrap(context.settings.home, tenant="default", app="shop")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as s:
        yield s


@pytest.fixture
async def stack(context: ServiceContext, store: Store) -> AsyncIterator[Stack]:
    replicas = Stack(context, store)
    yield replicas
    await replicas.close()


async def _stack(context: ServiceContext, stack: Stack, tmp_path: Any, endpoints: dict[str, Any], acme_endpoint: str,
                 slots: int, share: float) -> tuple[Any, Signer, str]:
    """A router with these endpoints and slots: tenant default's `chat` (stable r1 on `default`, canary `turns` on
    `canary`), and tenant acme's `ad` served by its release a-rel on `acme_endpoint`. Returns the router, the signer
    and acme's app key."""
    signer = Signer.generate()
    trust_key(trust_file_path(context.settings), signer.public)
    await chat_releases(context, signer, endpoints["default"]["url"], endpoints["canary"]["url"], ("turns",))
    path = tmp_path / "endpoints.yaml"
    path.write_text(json.dumps({"endpoints": endpoints}))  # JSON is YAML
    context.settings = context.settings.replace(endpoints_file=str(path), router_endpoint_slots=slots,
                                                router_tenant_slot_share=share)
    bus = context.bus
    await register_model_release(bus, "a-rel", "turns", acme_endpoint, tenant="acme")
    await store_decision(bus, signer.sign(GateDecided(release="a-rel", rules=[], decision="PASS", tenant="acme",
                                                      artifacts=await judged(bus, "a-rel"))))
    router = await stack.start()
    keys = KeyStore(context.settings.home)
    operator, _ = keys.create("acme", "web", "operator", deployments=["ad"])
    app, _ = keys.create("acme", "web")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {operator}"}) as acme_http, \
            acme_http.put(f"{router.url}/lockgate/v1/deployments/ad", json={"stable_release": "a-rel"}) as resp:
        assert resp.status == 200, await resp.text()
    return router, signer, app


async def _acme(router: Any, key: str) -> tuple[int, dict[str, Any], str | None]:
    """One SLOW request of acme's app key to its deployment `ad`: status, error body and Retry-After."""
    body = {"model": "ad", "messages": [{"role": "user", "content": "SLOW: a long generation"}]}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s, s.post(
            f"{router.url}/v1/chat/completions", json=body, headers={"x-lockgate-deployment": "ad"}) as resp:
        got = await resp.json()
        return resp.status, got.get("error") or {}, resp.headers.get("Retry-After")


async def _ask(http: aiohttp.ClientSession, router: Any, user: str) -> tuple[int, str]:
    """One request of tenant default's `user` to `chat`: its status and the release that answered."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(f"{router.url}/v1/chat/completions", json=body, headers={"x-lockgate-user": user}) as resp:
        text = await resp.text()
        return resp.status, resp.headers.get("x-lockgate-release", text)


async def test_one_tenants_slow_calls_hold_only_its_share_of_a_shared_endpoint_and_anothers_canary_is_promoted(
        context: ServiceContext, stack: Stack, tmp_path: Any, http: aiohttp.ClientSession) -> None:
    async with SimServer(STABLE) as stable, _Slow() as shared:
        # Four slots on each endpoint, two of them at most for one tenant. acme's release shares the endpoint of
        # default's canary; its calls get no answer (a long generation) for as long as the test runs.
        timeouts = {"connect_s": 0.3, "first_byte_s": 5}
        router, signer, acme = await _stack(
            context, stack, tmp_path, {"default": {"url": stable.url, "timeouts": timeouts},
                                       "canary": {"url": shared.url, "retry": {"attempts": 1}, "timeouts": timeouts}},
            "canary", slots=4, share=0.5)
        bus = context.bus
        sub = await bus.nc.subscribe(bus.subjects.served("web", "acme"))
        await _start(http, router, "turns", ERRORS)
        await _pass(router, signer, "turns")

        # acme sends four at once: two are held by the upstream, the other two find its share taken and are answered
        # 503 once they have waited the endpoint's connect_s, the router's own refusal (before: all four took the
        # pool's slots, and default's requests waited for one until their first-byte timeout).
        held = [asyncio.create_task(_acme(router, acme)) for _ in range(4)]
        await shared.held(2)
        refused = []
        for first in asyncio.as_completed(held):
            refused.append(await first)
            if len(refused) == 2:
                break
        for status, error, retry_after in refused:
            assert (status, error.get("type"), error.get("code"), retry_after) == (
                503, ROUTER_BUSY, "upstream_connections_full", "1"), (status, error)
            assert "the router's connections to endpoint canary are all in use for your tenant" in error["message"]
            assert shared.url.split("//")[1] not in error["message"]
        assert shared.holding == 2 and sum(not t.done() for t in held) == 2

        # Their events say `router_busy`, and are no evidence of acme's release: no request, no error.
        busy = [e for e in await served_events(sub, 2) if e.error_type == ROUTER_BUSY]
        assert len(busy) == 2 and all(e.client_failed and e.release == "a-rel" for e in busy), busy
        evidence = Evidence(lambda _: None)
        for e in busy:
            evidence.add(e)
        sample = evidence.sample("ad", "a-rel", 0.0)
        assert (sample.n, sample.errors, sample.refused) == (0, 0, 0)
        ok = msgspec.structs.replace(busy[0], status="ok", error_type="")
        evidence.add(ok)  # an answer of the same release counts
        assert evidence.sample("ad", "a-rel", 0.0).n == 1

        # default's canary, on the same endpoint, has the two slots acme cannot take: served and promoted.
        canary, stable_users = _arms(router, router.rollouts.route("chat"), 100)
        users, others = itertools.cycle(canary), itertools.cycle(stable_users)
        while (route := router.rollouts.route("chat")).phase == "progressing":
            assert await _ask(http, router, next(users)) == (200, "turns"), route.reason
            assert (await _ask(http, router, next(others)))[0] == 200, route.reason
        assert (route.phase, route.stable.release) == ("promoted", "turns"), route.reason
        assert router.rollouts.evidence.sample("chat", "turns", route.started_at).errors == 0
        assert shared.holding == 2  # acme's calls are held still
        await sub.unsubscribe()
        for t in held:
            t.cancel()


async def test_a_slow_endpoint_with_every_slot_held_takes_none_of_another_endpoints(
        context: ServiceContext, stack: Stack, tmp_path: Any, http: aiohttp.ClientSession) -> None:
    async with SimServer(STABLE) as stable, _Slow() as slow:
        # Two slots on each endpoint, all of them for one tenant if it likes: acme fills those of its own slow one.
        timeouts = {"connect_s": 0.3, "first_byte_s": 5}
        router, _, acme = await _stack(
            context, stack, tmp_path, {"default": {"url": stable.url, "timeouts": timeouts},
                                       "canary": {"url": stable.url, "timeouts": timeouts},
                                       "slow": {"url": slow.url, "retry": {"attempts": 1}, "timeouts": timeouts}},
            "slow", slots=2, share=1.0)
        async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json={"stable_release": "r1"}) as resp:
            assert resp.status == 200, await resp.text()
        held = [asyncio.create_task(_acme(router, acme)) for _ in range(2)]
        await slow.held(2)
        # Another tenant's requests to another endpoint are served at once (before: they waited for one of the
        # pool's slots, all held by acme, until their first-byte timeout, and failed as their upstream's silence).
        for user in ("u1", "u2", "u3"):
            assert await _ask(http, router, user) == (200, "r1")
        # A third of acme's finds every slot of its endpoint in use: the router's 503 after connect_s.
        status, error, retry_after = await _acme(router, acme)
        assert (status, error.get("type"), retry_after) == (503, ROUTER_BUSY, "1"), error
        assert "the router's connections to endpoint slow are all in use (2 of 2" in error["message"]
        assert slow.holding == 2 and not any(t.done() for t in held)
        for t in held:
            t.cancel()
