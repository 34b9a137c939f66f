"""A release whose upstream never answers a share of its calls is not promoted (nor verified after a blue-green
promotion) on its fast answers: a look counts its calls still in flight past router_unanswered_s as failed, before any
timeout ends them. On the real nats-server, chDB and the simulator, through the router's HTTP API (probe p26 F1)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from lockgate.server.service import ServiceContext
from lockgate.services.router.domain import Route
from lockgate.signing import Signer
from lockgate_dev.sim import SimServer
from tests.helpers import ChatUpstream
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import STABLE, _pass, _start, _traffic_until, serving

http, keys, signer = analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)

UNANSWERED = "unanswered for longer than 0.2 s, still in flight, counted as failed"
_ANSWER = msgspec.json.encode({
    "id": "c1", "object": "chat.completion", "created": 0, "model": "hangs",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hangs says hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})


class HangingCanary(ChatUpstream):
    """The canary's upstream: it answers at once, but every third call never (until `released` is set, as the test
    ends; the endpoint's first-byte timeout is 60 s). `parked` gets an item as each call starts to hang."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.parked: asyncio.Queue[None] = asyncio.Queue()
        self.released = asyncio.Event()

    async def chat(self, request: web.Request) -> web.Response:
        await request.read()
        self.calls += 1
        if self.calls % 3 == 0:
            self.parked.put_nowait(None)
            await self.released.wait()
        return web.Response(body=_ANSWER, content_type="application/json")


@pytest.fixture
async def hanging(context: ServiceContext, run_services: Any, signer: Signer) -> AsyncIterator[Any]:
    """The router stack with canary release `hangs` on HangingCanary, and router_unanswered_s at 0.2 s."""
    async with SimServer(STABLE) as stable, HangingCanary() as canary:
        router = await serving(context, run_services, signer, stable.url, canary.url, ("hangs",),
                               router_unanswered_s=0.2)
        router.canary_upstream = canary
        try:
            yield router
        finally:
            canary.released.set()  # the hung calls answer, and their requests end before the stack stops


async def _until(http: aiohttp.ClientSession, router: Any, done: Callable[[Route], bool],
                 limit: int = 6000) -> tuple[Route, int, list[asyncio.Task[int]]]:
    """Send requests from distinct users one after another, a next one as soon as the one before was answered or
    its call began to hang, until `done(route)` or `limit` requests, then let the hung calls answer: (the route
    then, requests sent, those that hung)."""
    url = f"{router.url}/v1/chat/completions"
    parked: asyncio.Queue[None] = router.canary_upstream.parked
    hanging: list[asyncio.Task[int]] = []

    async def one(session: aiohttp.ClientSession, i: int) -> int:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": f"user-{i}"}
        async with session.post(url, json=body) as resp:
            await resp.read()
            return resp.status

    sent = 0
    # A connection each, however many hang (a session's default 100 left the next request waiting for one, until the
    # endpoint's 60 s first-byte timeout ended a hung call).
    async with aiohttp.ClientSession(headers=http.headers, connector=aiohttp.TCPConnector(limit=0)) as session:
        while not done(router.rollouts.route("chat")) and sent < limit:
            request, hung = asyncio.create_task(one(session, sent)), asyncio.create_task(parked.get())
            finished, _ = await asyncio.wait({request, hung}, return_when=asyncio.FIRST_COMPLETED)
            if hung in finished:
                hanging.append(request)
            else:
                hung.cancel()
                assert request.result() == 200
            sent += 1
        route = router.rollouts.route("chat")
        await _answered(router, hanging)  # before the session closes
    return route, sent, hanging


async def _answered(router: Any, hanging: list[asyncio.Task[int]]) -> None:
    """Let the hung calls answer, and their requests end."""
    router.canary_upstream.released.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(*hanging, return_exceptions=True), timeout=30)


async def test_a_canary_that_never_answers_a_third_of_its_calls_is_aborted_before_they_time_out(
        hanging: Any, signer: Signer, http: aiohttp.ClientSession) -> None:
    """Found by a probe (p26 F1): a canary whose upstream never answered 30% of its calls was promoted with an
    error_rate of 0 a minute after it started, before the first of them timed out: a call in flight has no event, so
    the looks judged its fast answers only. Now a call of its arm unanswered past router_unanswered_s counts in the
    look as failed, and the canary is aborted at its first step, its reason naming them."""
    router = hanging
    analysis = {"metrics": [{"name": "error_rate", "max_increase": 0.05}], "min_sample": 30, "failure_limit": 0,
                "inconclusive_limit": 1000}
    await _start(http, router, "hangs", {"steps": [50, 100], "interval_s": 1.0, "analysis": analysis})
    await _pass(router, signer, "hangs")
    route, sent, hung = await _until(http, router, lambda r: r.phase != "progressing")
    assert route.phase == "aborted", f"{route.phase} after {sent} requests ({len(hung)} hung): {route.reason}"
    assert route.reason.startswith("aborted hangs: analysis failed at step 1 (50%): error_rate "), route.reason
    assert UNANSWERED in route.reason, route.reason


async def test_a_blue_green_release_that_never_answers_a_third_of_its_calls_is_not_verified(
        hanging: Any, signer: Signer, http: aiohttp.ClientSession) -> None:
    """Probe p26 F1: a blue-green release whose upstream never answered 30% of its calls was verified by its
    post-promotion analysis (and made known-good) 20 s after its promotion, 41 s before the first of them timed out.
    Now its calls unanswered past router_unanswered_s count as failed, and it is rolled back."""
    router = hanging
    analysis = {"metrics": [{"name": "error_rate", "max_increase": 0.05, "max": 0.1}], "min_sample": 30,
                "failure_limit": 0, "inconclusive_limit": 1000}
    await _start(http, router, "hangs", {"interval_s": 0.5, "blue_green": {"post_promotion_analysis": analysis}})
    await _pass(router, signer, "hangs")
    await _traffic_until(http, router, lambda r: False, limit=80)  # the old release's evidence
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/promote") as resp:
        assert resp.status == 200 and (await resp.json())["verifying"]
    route, sent, hung = await _until(http, router, lambda r: r.phase != "promoted" or not r.verifying)
    assert route.phase == "aborted", f"{route.phase} after {sent} requests ({len(hung)} hung): {route.reason}"
    assert route.stable.release == "r1" and route.reason.startswith(
        "rolled back hangs: post-promotion analysis failed: error_rate "), route.reason
    assert UNANSWERED in route.reason, route.reason
