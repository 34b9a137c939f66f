"""A canary whose streams never send a token, only SSE keep-alives (`: keep-alive` comments, as OpenRouter's
`: OPENROUTER PROCESSING` and other queueing gateways send), is judged as a silent one: its streams are unanswered, and
it is aborted. On the real nats-server, chDB and the simulator, through the router's HTTP API (probe p41 F1)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from lockgate.server.service import ServiceContext
from lockgate.signing import Signer
from lockgate_dev.sim import SimServer
from tests.helpers import ChatUpstream
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import (
    STABLE,
    _impatient_until,
    _pass,
    _start,
    aborted_on_hang_ups,
    serving,
)

http, keys, signer = analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)

_ANSWER = msgspec.json.encode({
    "id": "c1", "object": "chat.completion", "created": 0, "model": "queued",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "queued says hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})


# An answer's first event: its role, no token yet.
_ROLE = b'data: {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "queued", ' \
        b'"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}\n\n'


class QueuedCanary(ChatUpstream):
    """The canary's upstream: a non-streamed request is answered at once; a stream is queued for ever (after its
    `first` event, if any), a keep-alive comment every 50 ms (more often than router_unanswered_s) and never a token,
    until the router closes it."""

    def __init__(self, first: bytes = b"") -> None:
        super().__init__()
        self.first = first

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=_ANSWER, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            if self.first:
                await resp.write(self.first)
            for _ in range(1200):  # a minute, the endpoint's first-byte timeout
                await resp.write(b": keep-alive\n\n")
                await asyncio.sleep(0.05)  # the gateway's pace, not synchronisation
        return resp


@pytest.fixture(params=[b""], ids=["no-event"])
async def queued(context: ServiceContext, run_services: Any, signer: Signer, request: Any) -> AsyncIterator[Any]:
    """The router stack with canary release `queued` on QueuedCanary (its streams' first event `request.param`), and
    router_unanswered_s at 0.2 s."""
    async with SimServer(STABLE) as stable, QueuedCanary(request.param) as canary:
        yield await serving(context, run_services, signer, stable.url, canary.url, ("queued",),
                            router_unanswered_s=0.2)


@pytest.mark.parametrize("queued", [b"", _ROLE], ids=["no-event", "role-event"], indirect=True)
async def test_a_canary_whose_streams_send_only_keep_alives_is_aborted(
        queued: Any, signer: Signer, http: aiohttp.ClientSession) -> None:
    """Found by a probe (p41 F1): a canary whose streams sent `: keep-alive` every 0.25 s and never a token was paused
    at its weight for ever: each hang-up of a client was recorded `client_disconnected` (left out of every metric) and
    the looks counted none of its calls in flight as unanswered, since bytes kept coming. Now keep-alives are no
    answer: its hang-ups are `upstream_unanswered` and its calls in flight unanswered, and it is aborted. So too after
    a stream's first event (its role): the wait for the next data goes on across keep-alives (before, every hang-up
    was `client_disconnected`, the latest line the router wrote or waited for a keep-alive)."""
    await aborted_on_hang_ups(http, queued, signer, "queued", streams=lambda i: True)


async def test_a_canary_whose_streams_hang_with_keep_alives_is_not_promoted_on_its_other_answers(
        queued: Any, signer: Signer, http: aiohttp.ClientSession) -> None:
    """Probe p41 F1: a canary that answered non-streamed requests well, but whose streams sent only keep-alives, was
    promoted to 100% with every streamed request failing (its streams' hang-ups the clients' own, left out). Now they
    are its failures, and it is aborted."""
    router = queued
    analysis = {**analysis_tests.ERRORS, "min_sample": 20}
    await _start(http, router, "queued", {"steps": [50, 100], "interval_s": 0.5, "analysis": analysis})
    await _pass(router, signer, "queued")
    sent, hung = await _impatient_until(http, router, lambda r: r.phase in ("aborted", "promoted"),
                                        streams=lambda i: i % 2 == 0)
    route = router.rollouts.route("chat")
    assert route.phase == "aborted", f"{route.phase} after {sent} requests ({hung} hung): {route.reason}"
    assert route.stable.release == "r1" and hung >= 10
