"""The embedded nats-server binds a port of its own choosing and reports it; a restart keeps it."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from lockgate.errors import ConfigError
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


async def test_a_port_another_process_listens_on_is_one_line_naming_it(tmp_path: Path) -> None:
    # Before: "nats-server exited during start:" and the last ten lines of its log (`lockgate up --nats-port`).
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ConfigError) as refused:
            await NatsServer(tmp_path / "js", port=port).start()
    assert refused.value.message == (f"NATS port {port} is in use (another lockgate stack?): choose another with "
                                     "--nats-port, or 0 for a free one")


async def test_two_servers_on_port_zero_get_different_ports(tmp_path: Path) -> None:
    first, second = NatsServer(tmp_path / "a"), NatsServer(tmp_path / "b")
    try:
        await first.start()
        await second.start()
        assert first.port != second.port
    finally:
        first.stop()
        second.stop()


async def test_the_server_is_out_of_reach_of_its_terminals_ctrl_c(tmp_path: Path) -> None:
    # Ctrl-C is sent to the terminal's whole foreground group: before, nats-server was in the stack's and exited on
    # it before the services had flushed. In a group of its own, the stack stops it, last.
    server = NatsServer(tmp_path / "js", port=0)
    await server.start()
    try:
        assert server.proc is not None and os.getpgid(server.proc.pid) != os.getpgid(0)
    finally:
        server.stop()


def _wait_exit(pid: int, timeout_s: float) -> bool:
    """True once process `pid` (not our child) has exited: a pidfd becomes readable, no polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout_s)[0])
    finally:
        os.close(fd)


async def test_a_killed_server_is_restarted_and_acknowledged_messages_survive(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "js", port=0)
    await server.start()
    supervisor = asyncio.create_task(server.supervise())
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.05,
                            reconnected_cb=on_reconnect)
    try:
        js = nc.jetstream()
        await js.add_stream(name="S", subjects=["s.>"])
        acked = [await js.publish("s.x", f"{i}".encode()) for i in range(50)]
        first = server.proc
        assert first is not None
        first.kill()  # nats-server alone dies; its supervisor brings it back on the same port
        await asyncio.wait_for(reconnected.wait(), 30)
        assert server.restarts == 1 and server.proc is not first and server.proc.poll() is None
        info = await js.stream_info("S")
        assert info.state.messages == len(acked)  # every acknowledged publish is still there
        await js.publish("s.x", b"after")
    finally:
        await nc.close()
        server.stop()
        await supervisor  # returns once stopped: no restart after stop()


def test_the_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    # A parent killed with SIGKILL gets no chance to stop its nats-server: the kernel does it.
    code = (
        "import asyncio, sys\n"
        "from lockgate.server.natsserver import NatsServer\n"
        "async def main():\n"
        f"    s = NatsServer({str(tmp_path / 'js')!r})\n"
        "    await s.start()\n"
        "    print(s.proc.pid, flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(10)
        assert _wait_exit(child, 10), f"nats-server {child} outlived its parent"
    finally:
        parent.kill()
