"""A `lockgate serve` process's probes on a real nats-server: /readyz follows the bus (503 while it is
away, 200 once the connection is back), /livez answers throughout."""

from __future__ import annotations

import socket
from pathlib import Path

import aiohttp
import pytest
from nats.js.api import DiscardPolicy

from lockgate.config import Settings
from lockgate.server.natsserver import NatsServer
from lockgate.server.runtime import Runtime

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_readiness_follows_the_bus_and_liveness_does_not(settings: Settings, tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "js")
    await server.start()
    again = NatsServer(tmp_path / "js", port=server.port)
    runtime = Runtime(settings.replace(nats_url=server.url, health_port=_free_port()), services=["drift"],
                      embedded_nats=False)
    await runtime.start()
    try:
        url = runtime.health_url
        assert runtime.endpoints["health"] == url + "/readyz"
        async with aiohttp.ClientSession() as http:

            async def status(path: str) -> tuple[int, dict]:
                async with http.get(url + path) as resp:
                    return resp.status, await resp.json()

            code, body = await status("/readyz")
            assert code == 200 and set(body["bus"].values()) == {"connected"}

            server.stop()  # the bus goes away: the worker does no work, so it is not ready
            for bus in runtime.buses:
                await bus.wait_state("reconnecting")
            code, body = await status("/readyz")
            assert code == 503 and body["status"] == "not ready" and "reconnecting" in body["bus"].values()
            assert (await status("/livez"))[0] == 200

            await again.start()  # back on the same port
            for bus in runtime.buses:
                await bus.wait_state("connected", timeout_s=60)
            code, body = await status("/readyz")
            assert code == 200 and body["status"] == "ready"
    finally:
        await runtime.stop()
        server.stop()
        again.stop()


async def test_the_routers_healthz_counts_the_letters_waiting_of_every_service_of_its_process(
        settings: Settings) -> None:
    # Probe p16: in `lockgate up` the router's /healthz said `dead_letters_waiting: 0` while the sink's letters waited,
    # since it counted only the router's own bus connection.
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", router_port=0), services=["router", "sink"])
    await runtime.start()
    try:
        bus = runtime.ctx.bus
        dlq = bus.subjects.streams["dlq"].name
        config = (await bus.js.stream_info(dlq)).config
        await bus.js.update_stream(config.evolve(max_msgs=1, discard=DiscardPolicy.NEW))  # refuses every letter
        await bus.publish(bus.subjects.dlq("filler"), b"{}", msg_id="filler")
        durable = bus.subjects.durable("sink", "inference")
        settled = await bus.nc.subscribe(f"$JS.ACK.{bus.subjects.streams['inference'].name}.{durable}.>")
        await bus.publish(bus.subjects.inference("shop", "acme"), b"{broken", msg_id="broken")
        assert (await settled.next_msg(timeout=30)).data.startswith(b"-NAK")  # its letter refused: it waits
        router_bus = runtime.services["router"].ctx.bus
        assert router_bus.letters_waiting == 0 and runtime.services["sink"].ctx.bus.letters_waiting >= 1
        async with aiohttp.ClientSession() as http, http.get(f"{runtime.endpoints['router']}/healthz") as resp:
            assert (await resp.json())["dead_letters_waiting"] >= 1
    finally:
        await runtime.stop()
