"""Canary analysis judged per API key, through the real router, nats-server and chDB: one caller's successful
requests aimed at the canary cannot dilute the failures the other callers' requests see.

Found by a probe: with one valid key, a caller sent successful requests from users that hash to the canary;
pooled with everyone's, about 12x the real canary traffic made a canary failing 20% of real requests pass."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from lockgate.server.apikeys import Bootstrap, KeyStore
from lockgate.server.service import ServiceContext
from lockgate.services.router.domain import bucket
from lockgate.signing import Signer
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import sink_stored
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import _pass, _start, serving

http, keys, signer = analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)

ANALYSIS = {"metrics": [{"name": "error_rate", "max_increase": 0.01}], "min_sample": 100, "failure_limit": 0,
            "inconclusive_limit": 1000}
_ANSWER = msgspec.json.encode({
    "id": "c1", "object": "chat.completion", "created": 0, "model": "picky",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "picky canary"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
_ERROR = msgspec.json.encode({"error": {"message": "cannot answer that", "type": "server_error"}})


class PickyCanary:
    """A canary upstream that answers every prompt but `tricky`, which it answers with an error body (HTTP 200:
    the router's `upstream_error`, a failure of the release, not retried): a release that breaks on some of
    its real users' prompts and on none of the prompts a caller who knows it chooses."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        tricky = body["messages"][-1]["content"] == "tricky"
        return web.Response(body=_ERROR if tricky else _ANSWER, content_type="application/json")

    async def __aenter__(self) -> PickyCanary:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def router(context: ServiceContext, run_services: Any, signer: Signer) -> AsyncIterator[Any]:
    stable_sim = SimServer(SimConfig(models={"m": ModelSpec(default="stable says hi")}, seed=3))  # never fails
    async with stable_sim as stable, PickyCanary() as canary:
        router = await serving(context, run_services, signer, stable.url, canary.url, ("picky",))
        yield router


def _users(prefix: str, canary: bool, n: int) -> list[str]:
    """n user ids that the 50% step sends to the canary (or to stable)."""
    found = (u for u in (f"{prefix}-{i}" for i in range(100 * n)) if (bucket("chat", u) < 5000) == canary)
    return [next(found) for _ in range(n)]


async def _send(router: Any, key: str, users: list[str], prompts: list[str], variant: str) -> None:
    """One request per user (prompts[i] from users[i]) with `key`, 50 at a time; each served by `variant`."""
    url = f"{router.url}/v1/chat/completions"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        async def one(user: str, prompt: str) -> None:
            body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
            async with session.post(url, json=body, headers={"x-lockgate-user": user}) as resp:
                await resp.read()
                assert resp.headers["x-lockgate-variant"] == variant
                assert resp.status == (502 if prompt == "tricky" else 200)

        for i in range(0, len(users), 50):
            await asyncio.gather(*(one(u, p) for u, p in zip(users[i:i + 50], prompts[i:i + 50], strict=True)))


async def test_one_key_flooding_the_canary_with_good_requests_cannot_get_a_failing_canary_promoted(
        router: Any, http: aiohttp.ClientSession, signer: Signer, keys: Bootstrap) -> None:
    store = KeyStore(router.ctx.settings.home)
    # Of the releases' tenant (chat_releases: `default`), as `keys` is: only its keys are served `chat`.
    real, real_key = store.create("default", "shop", description="the application's real traffic")
    mallory, mallory_key = store.create("default", "shop", description="a caller who floods the canary")
    await _start(http, router, "picky", {"steps": [50, 100], "interval_s": 0.1, "analysis": ANALYSIS})
    await _pass(router, signer, "picky")

    # Looks wait while stable has fewer than min_sample requests, so every canary request below is in the first
    # look that judges: mallory's 1,500 good ones (12.5x the real canary traffic), then the real callers' 120, of
    # which 12 fail (10%; pooled with mallory's, 0.74%: under stable's 0% + 1%). Then stable's real traffic.
    await _send(router, mallory, _users("mallory", True, 1500), ["hi"] * 1500, "canary")
    await _send(router, real, _users("user", True, 120), ["tricky" if i % 10 == 0 else "hi" for i in range(120)],
                "canary")
    await _send(router, real, _users("user", False, 120), ["hi"] * 120, "stable")
    await router.rollouts.wait_for(lambda r: r["chat"].phase != "progressing" or r["chat"].weight > 50, timeout=30)

    route = router.rollouts.route("chat")
    assert route.phase == "aborted", f"not aborted: {route.phase} at {route.weight:g}%: {route.reason}"
    assert route.reason.startswith(f"aborted picky: analysis failed at step 1 (50%): error_rate 0.1 > threshold "
                                   f"0.01 on API key {real_key.id} (stable 0; 120 canary vs ")  # stable's count: however many had arrived
    assert route.analysis is not None and route.analysis.last is not None
    assert route.analysis.last.canary_n == 1620  # every canary request was in the look, mallory's too
    (failed,) = route.analysis.last.metrics
    assert (failed.verdict, failed.group, failed.canary_n) == ("FAILED", f"API key {real_key.id}", 120)

    # The stored events name the key that sent them, and the signed analysis record the key that failed.
    await router.rollouts.flush()
    await sink_stored(router.sink.handlers, analysis_runs=route.analysis.look)
    await router.sink.handlers.events.wait_for(1740, 30)
    db = router.sink.ctx.store
    by_key = db.rows("SELECT key_id, count() AS n FROM inference_events WHERE variant = 'canary' GROUP BY key_id "
                     "ORDER BY n")
    assert by_key == [{"key_id": real_key.id, "n": 120}, {"key_id": mallory_key.id, "n": 1500}]
    (record,) = db.rows("SELECT metrics FROM analysis_runs WHERE phase = 'Failed'")
    (metric,) = msgspec.json.decode(record["metrics"])
    assert metric["why"] == f"significantly above threshold; judged on API key {real_key.id}"
