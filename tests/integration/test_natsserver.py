"""The embedded nats-server binds a port of its own choosing and reports it; a restart keeps it."""

from __future__ import annotations

from pathlib import Path

import nats
import pytest

from lockgate.server.natsserver import NatsServer

pytestmark = pytest.mark.timeout(60)


async def test_port_zero_binds_a_free_port_reports_it_and_keeps_it_across_a_restart(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "js", port=0)
    await server.start()
    try:
        port = server.port
        assert port > 0 and server.url == f"nats://127.0.0.1:{port}"
        nc = await nats.connect(server.url)
        await nc.close()

        server.stop()
        await server.start()  # clients of the first run reconnect to the same URL
        assert server.port == port
        nc = await nats.connect(server.url)
        assert nc.connected_url is not None and nc.connected_url.port == port
        await nc.close()
    finally:
        server.stop()


async def test_two_servers_on_port_zero_get_different_ports(tmp_path: Path) -> None:
    first, second = NatsServer(tmp_path / "a"), NatsServer(tmp_path / "b")
    try:
        await first.start()
        await second.start()
        assert first.port != second.port
    finally:
        first.stop()
        second.stop()
