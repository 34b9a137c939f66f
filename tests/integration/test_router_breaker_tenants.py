"""A breaker counts the calls of one release of one tenant: another tenant's calls to the same model on the same
endpoint, failing as often as that tenant likes, neither divert a canary's requests, nor hold its steps, nor are
charged to it as failures. On the real nats-server, chDB and the router's HTTP API, against an upstream that fails
the prompts that say BOOM (as a self-hosted model server may fail some inputs).

Found by a probe (p27 F3, F3b): the breakers were per endpoint and model, shared by every tenant. Tenant acme,
sending BOOM to its own deployment on the canary's endpoint and model, opened the breaker tenant default's canary
used: the canary's rollout was held at its step for as long as acme went on, and, once the canary had failed one
call of its own, its requests diverted by that breaker were charged as its failures and its good canary aborted."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lockgate.contracts import GateDecided
from lockgate.server.apikeys import KeyStore, bootstrap
from lockgate.server.service import ServiceContext
from lockgate.store import Store
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import judged, register_model_release, store_decision
from tests.integration.test_rollout_analysis import _pass, _start
from tests.integration.test_router_breaker_hold import HELD, _arms, _replicas
from tests.integration.test_router_resilience import FakeLLM

pytestmark = pytest.mark.timeout(120)

STABLE = SimConfig(models={"m": ModelSpec(default="stable says hi")}, seed=3)
# default's canary `turns` passes on its error rate with its one failure among at least ten answers (a bound of its
# own: at 100% no stable answers to compare with).
ERRORS = {"steps": [50, 100], "interval_s": 0.2,
          "analysis": {"metrics": [{"name": "error_rate", "max": 0.2}], "min_sample": 10,
                       "inconclusive_limit": 1000}}


def _boom(_: str, body: dict[str, Any]) -> web.Response:
    """The shared upstream's answer: a 500 to a prompt saying BOOM, a chat answer to any other."""
    if any("BOOM" in str(m.get("content")) for m in body["messages"]):
        return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=500)
    return web.json_response({"id": "c1", "object": "chat.completion", "created": 1, "model": body["model"],
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": "canary says hi"},
                                           "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}})


@pytest.fixture
async def http(context: ServiceContext) -> AsyncIterator[aiohttp.ClientSession]:
    keys = bootstrap(context.settings.home, tenant="default", app="shop")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as s:
        yield s


async def _ask(http: aiohttp.ClientSession, router: Any, user: str, prompt: str = "hi") -> str:
    """One request of default's `user`; the release that answered it (shown to the admin's key): the canary's once
    promoted is stable's, so a request answered as the promotion happens is told by its release."""
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    async with http.post(f"{router.url}/v1/chat/completions", json=body, headers={"x-lockgate-user": user}) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["x-lockgate-release"]


async def _acme(router: Any, key: str, prompt: str) -> tuple[int, str]:
    """One request of acme's app key to acme's own deployment `ad`: its status and error type."""
    body = {"model": "ad", "messages": [{"role": "user", "content": prompt}]}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s, s.post(
            f"{router.url}/v1/chat/completions", json=body, headers={"x-lockgate-deployment": "ad"}) as resp:
        got = await resp.json()
        return resp.status, (got.get("error") or {}).get("type", "")


async def test_another_tenants_failing_calls_on_the_same_model_neither_hold_nor_abort_a_canary(
        context: ServiceContext, store: Store, tmp_path: Any, http: aiohttp.ClientSession) -> None:
    async with SimServer(STABLE) as stable, FakeLLM("shared", ("answer", _boom)) as shared:
        # The canary endpoint's breaker opens after three failed calls in a row, for an hour.
        replicas, signer = await _replicas(context, store, tmp_path, shared.url, stable.url, cooldown_s=3600.0)
        try:
            bus = context.bus
            # acme's release on the very endpoint and model of default's canary `turns`, serving acme's `ad`.
            await register_model_release(bus, "a-rel", "turns", "canary", tenant="acme")
            await store_decision(bus, signer.sign(GateDecided(release="a-rel", rules=[], decision="PASS",
                                                              tenant="acme", artifacts=await judged(bus, "a-rel"))))
            router = await replicas.start()
            keys = KeyStore(context.settings.home)
            operator, _ = keys.create("acme", "web", "operator", deployments=["ad"])
            app, _ = keys.create("acme", "web")
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {operator}"}) as acme_http, \
                    acme_http.put(f"{router.url}/lockgate/v1/deployments/ad", json={"stable_release": "a-rel"}) as r:
                assert r.status == 200, await r.text()
            await _start(http, router, "turns", ERRORS)
            await _pass(router, signer, "turns")
            canary, stable_users = _arms(router, router.rollouts.route("chat"), 100)

            # The canary fails one call of its own (a transient 5xx any upstream has now and then): stable answers.
            assert await _ask(http, router, canary[0], "BOOM") == "r1"
            # acme fails its own calls until its breaker opens (three in a row): then it is refused without a call.
            got = [await _acme(router, app, "BOOM")]
            while got[-1] != (502, "upstream_circuit_open") and len(got) < 10:
                got.append(await _acme(router, app, "BOOM"))
            assert got[-1] == (502, "upstream_circuit_open") and set(got[:-1]) == {(502, "upstream_error")}, got
            calls = shared.calls

            # Before: acme's breaker was the canary's, which diverted its requests to stable from now on, held its
            # step and charged each diversion as its failure, aborting it. Now they are the canary's to answer.
            users, others = itertools.cycle(canary[1:]), itertools.cycle(stable_users)
            while (route := router.rollouts.route("chat")).phase == "progressing":
                assert HELD not in route.reason, route.reason
                assert await _ask(http, router, next(users)) == "turns", route.reason
                await _ask(http, router, next(others))
            assert (route.phase, route.stable.release) == ("promoted", "turns"), route.reason
            assert shared.calls > calls
            # Its one failure is all it was charged with.
            sample = router.rollouts.evidence.sample("chat", "turns", route.started_at)
            assert sample.errors == 1, (sample.n, sample.errors)
            # acme's own breaker is still open: its failing calls keep off the upstream.
            assert await _acme(router, app, "hi") == (502, "upstream_circuit_open")
        finally:
            await replicas.close()


async def test_one_releases_failing_calls_on_the_same_model_never_divert_another_releases_canary(
        context: ServiceContext, store: Store, tmp_path: Any, http: aiohttp.ClientSession) -> None:
    # The same within one tenant: its release `other`, on the canary's endpoint and model and serving deployment
    # `side`, fails its calls until its breaker opens; the canary `turns`, which failed none, is not held.
    async with SimServer(STABLE) as stable, FakeLLM("shared", ("answer", _boom)) as shared:
        replicas, signer = await _replicas(context, store, tmp_path, shared.url, stable.url, cooldown_s=3600.0)
        try:
            bus = context.bus
            await register_model_release(bus, "other", "turns", "canary")
            await store_decision(bus, signer.sign(GateDecided(release="other", rules=[], decision="PASS",
                                                              artifacts=await judged(bus, "other"))))
            router = await replicas.start()
            async with http.put(f"{router.url}/lockgate/v1/deployments/side", json={"stable_release": "other"}) as r:
                assert r.status == 200, await r.text()
            await _start(http, router, "turns", {"steps": [50, 100], "interval_s": 0.5})
            await _pass(router, signer, "turns")
            body = {"model": "m", "messages": [{"role": "user", "content": "BOOM"}]}
            for _ in range(4):
                async with http.post(f"{router.url}/v1/chat/completions", json=body,
                                     headers={"x-lockgate-deployment": "side"}) as resp:
                    assert resp.status == 502, await resp.text()
            assert shared.calls == 3  # `other`'s breaker opened after three: the fourth made no call
            canary, _ = _arms(router, router.rollouts.route("chat"), 50)
            users = itertools.cycle(canary)
            while (route := router.rollouts.route("chat")).phase == "progressing":
                assert HELD not in route.reason, route.reason
                assert await _ask(http, router, next(users)) == "turns", route.reason
            assert (route.phase, route.stable.release) == ("promoted", "turns"), route.reason
        finally:
            await replicas.close()
