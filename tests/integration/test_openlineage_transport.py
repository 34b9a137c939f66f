"""The OpenLineage HTTP transport against a real HTTP server on loopback (a stand-in for Marquez): events
arrive in order, a 5xx is retried, a 4xx is dropped and counted, an endpoint that is down never blocks or
fails the caller, and a full queue drops (counted) instead of growing."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from lockgate.provenance.transport import HttpTransport
from lockgate.retry import RetryPolicy
from tests.helpers import served

pytestmark = pytest.mark.timeout(30)
FAST = RetryPolicy(attempts=3, initial_s=0.001, max_s=0.01)


def _event(n: int) -> dict[str, Any]:
    return {"eventType": "START", "run": {"runId": f"00000000-0000-0000-0000-{n:012d}"}}


@pytest.fixture
async def receiver() -> AsyncIterator[dict[str, Any]]:
    """A Marquez-like endpoint; `answers` (a list of statuses) is consumed one per request, then 201."""
    state: dict[str, Any] = {"got": [], "answers": [], "requests": 0}

    async def lineage(request: web.Request) -> web.Response:
        state["requests"] += 1
        status = state["answers"].pop(0) if state["answers"] else 201
        if status < 300:
            state["got"].append(await request.json())
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/api/v1/lineage", lineage)
    async with served(app) as url:
        state["url"] = f"{url}/api/v1/lineage"
        yield state


async def test_events_arrive_in_order_and_a_5xx_is_retried(receiver: dict[str, Any]) -> None:
    receiver["answers"] = [503]
    transport = HttpTransport(receiver["url"], policy=FAST)
    transport.start()
    for n in range(5):
        transport.post(_event(n))
    await transport.close()
    assert receiver["got"] == [_event(n) for n in range(5)]
    assert receiver["requests"] == 6 and transport.sent == 5 and transport.dropped == 0


async def test_a_refused_event_is_dropped_and_counted_without_retries(receiver: dict[str, Any]) -> None:
    receiver["answers"] = [400]
    transport = HttpTransport(receiver["url"], policy=FAST)
    transport.start()
    transport.post(_event(1))
    transport.post(_event(2))
    await transport.close()
    assert receiver["got"] == [_event(2)] and receiver["requests"] == 2 and transport.dropped == 1


async def test_an_endpoint_that_is_down_never_blocks_or_fails_the_caller() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    transport = HttpTransport(f"http://127.0.0.1:{port}/api/v1/lineage", policy=FAST, capacity=3)
    for n in range(5):  # before start: buffered up to capacity, the rest dropped at once
        transport.post(_event(n))
    assert transport.dropped == 2
    transport.start()
    await transport.close()
    assert transport.sent == 0 and transport.dropped == 5
