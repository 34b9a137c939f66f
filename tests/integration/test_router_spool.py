"""A `lockgate serve router` killed -9 while the events of the requests it served wait for the bus:
the next router started on the same home takes its spool over and publishes them, each exactly once.

Real processes (the router, as in test_budget_router_kill.py), a real nats-server and the sink on chDB.
The inference stream is deleted first, so no event can be acknowledged before the kill (the outage of
test_router.py's `test_events_wait_out_an_inference_stream_outage_of_any_length`). Without the spool
(LOCKGATE_ROUTER_SPOOL=false) the served events are lost and this test fails at the sink's wait.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.server.apikeys import bootstrap
from lockgate.store import Store
from lockgate_dev.cluster import ServiceProcess
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer

pytestmark = pytest.mark.timeout(300)

MODEL = "sim-good"
N = 30  # requests served while the stream is away
_events = Codec(list[InferenceEvent])


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(SimConfig(models={MODEL: ModelSpec(default="fine, thanks")})) as s:
        yield s


async def _health(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as resp:
        assert resp.status == 200
        return await resp.json()


async def _stored_ids(bus: Bus) -> Counter[str]:
    """How many times each router event is on the inference stream, by event id."""
    stream = bus.subjects.streams["inference"].name
    return Counter(e.id for _, _, data in [m async for m in bus.stored_since(stream, bus.subjects.served("shop", "acme"), 0)]
                   for e in _events.decode(data))


async def test_events_a_killed_router_left_are_published_once_by_the_next_on_its_spool(
        settings: Settings, bus: Bus, store: Store, run_services: Any, sim: SimServer) -> None:
    keys = bootstrap(settings.home, tenant="acme", app="shop")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LOCKGATE_NATS_URL": settings.nats_url,
           "LOCKGATE_PREFIX": settings.prefix, "LOCKGATE_HOME": settings.home,
           "LOCKGATE_CLICKHOUSE_URL": settings.clickhouse_url, "LOCKGATE_DATABASE": settings.database,
           "LOCKGATE_STABLE_UPSTREAM": sim.url, "LOCKGATE_DEPLOYMENT": "chat", "LOCKGATE_PASSTHROUGH": "true"}
    routers = [ServiceProcess(f"router-{n}", ["serve", "router", "--router-port", "0"], env) for n in range(3)]
    spool = Path(settings.home) / "spool" / "router-0"  # {home}/spool/router-<port>: the first free one
    try:
        first = routers[0]
        first.start()
        await asyncio.to_thread(first.wait_ready, 120)
        # The stream taking the router's events goes away: nothing it serves from now on is acknowledged.
        await bus.js.delete_stream(bus.subjects.streams["inference"].name)
        client = openai.AsyncOpenAI(base_url=f"{first.endpoints['router']}/v1", api_key=keys.app_key, max_retries=0)
        for i in range(N):
            answer = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}])
            assert answer.choices[0].message.content
        await client.close()
        health = await _health(first.endpoints["router"])
        # Written down, not published; none given up on (failed), nor sent and given up on (unconfirmed).
        assert (health["events_spooled"], health["events_failed"], health["events_unconfirmed"]) == (N, 0, 0)
        first.kill()  # kill -9: the in-memory outbox is gone
        assert first.proc is not None and first.proc.returncode == -9
        left = Path(settings.home) / "left-by-the-kill"
        shutil.copytree(spool, left)  # the spool as the kill left it, for the replay below

        # The stream is back; the next router on this home takes the dead one's spool and publishes it first.
        await bus.ensure_topology()
        sink = (await run_services("sink"))["sink"].handlers
        second = routers[1]
        second.start()
        await asyncio.to_thread(second.wait_ready, 120)
        await sink.events.wait_for(N, 60)
        assert await asyncio.to_thread(second.stop) == 0
        assert not list(spool.glob("*.seg"))  # all acknowledged: nothing left to publish again
        on_stream = await _stored_ids(bus)
        assert len(on_stream) == N and set(on_stream.values()) == {1}, on_stream
        assert store.scalar("SELECT count() FROM inference_events") == N
        assert store.scalar("SELECT uniqExact(id) FROM inference_events") == N
        assert sorted(r["prompt"] for r in store.rows("SELECT prompt FROM inference_events")) == sorted(
            f"q{i}" for i in range(N))

        # A router that died after the acks but before it wrote them down publishes the events again:
        # harmless, JetStream drops the same message id within its duplicate window (and the sink stores
        # one row per tenant and id beyond it: test_sink.py's resent-event tests).
        for f in left.iterdir():
            shutil.copy2(f, spool / f.name)
        third = routers[2]
        third.start()
        await asyncio.to_thread(third.wait_ready, 120)
        assert await asyncio.to_thread(third.stop) == 0  # its close flushes: the events were re-published
        assert not list(spool.glob("*.seg"))  # ... and acknowledged
        assert await _stored_ids(bus) == on_stream
        assert store.scalar("SELECT count() FROM inference_events") == N
        assert store.scalar("SELECT uniqExact(id) FROM inference_events") == N
    finally:
        for p in routers:
            p.stop()
