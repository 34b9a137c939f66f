"""Metrics on a real nats-server and chDB: dead letters, and /metrics on a running router."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.contracts import InferenceEvent
from lockgate.server.service import ServiceContext
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import metric_points

pytestmark = pytest.mark.timeout(60)

_events: Codec[list[InferenceEvent]] = Codec(list[InferenceEvent])


async def test_dead_letters_are_counted_by_origin(bus: Bus, metric_reader: InMemoryMetricReader) -> None:
    for origin in ("sink", "sink", "cost"):
        await bus.dead_letter(origin, subject="lg.x", payload=b"not json", reason="invalid event")
    assert metric_points(metric_reader, "lockgate.dead_letters") == {
        (("origin", "sink"),): 2,
        (("origin", "cost"),): 1,
    }


async def _scrape(http: aiohttp.ClientSession, base: str) -> dict[tuple[str, str, str], float]:
    """Router request samples from GET /metrics: (sample name, variant, status) -> value."""
    async with http.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("lockgate_router_requests_total", "lockgate_router_request_duration_seconds_count"):
                out[(sample.name, sample.labels["variant"], sample.labels["status"])] = sample.value
    return out


async def test_router_metrics_move_with_requests(context: ServiceContext, run_services: Any,
                                                 metric_reader: InMemoryMetricReader) -> None:
    config = SimConfig(models={"m": ModelSpec(default="hello"), "broken": ModelSpec(error_rate=1.0)})
    async with SimServer(config) as sim, aiohttp.ClientSession() as http:
        context.settings = context.settings.replace(stable_upstream=sim.url, canary_upstream=sim.url,
                                                    deployment="chat", app="shop")
        router = (await run_services("router"))["router"]
        bus = context.bus
        events = await bus.nc.subscribe(bus.subjects.inference("shop"))
        assert await _scrape(http, router.url) == {}

        async def chat(model: str) -> int:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(f"{router.url}/v1/chat/completions", json=body) as resp:
                await resp.read()
                return resp.status

        async def recorded(n: int) -> None:
            # The router counts a request where it queues its event, after the response is
            # sent: once the events are on the bus, the counters have moved.
            seen = 0
            while seen < n:
                seen += len(_events.decode((await events.next_msg(timeout=10)).data))

        assert [await chat("m") for _ in range(3)] + [await chat("broken")] == [200, 200, 200, 502]
        await recorded(4)
        first = await _scrape(http, router.url)
        assert first[("lockgate_router_requests_total", "stable", "ok")] == 3
        assert first[("lockgate_router_requests_total", "stable", "error")] == 1
        assert first[("lockgate_router_request_duration_seconds_count", "stable", "ok")] == 3

        assert await chat("m") == 200
        await recorded(1)
        second = await _scrape(http, router.url)
        assert second[("lockgate_router_requests_total", "stable", "ok")] == 4
        assert second[("lockgate_router_requests_total", "stable", "error")] == 1

        # The simulator serves the same process's metrics on its own port.
        sim_base = sim.url.removesuffix("/v1")
        assert (await _scrape(http, sim_base))[("lockgate_router_requests_total", "stable", "ok")] == 4
