"""nats-server hung (SIGSTOP: its connections stay open, nothing answers) under an embedded router with a health port:
the router's `/healthz` and the process's `/readyz` answer at once and say the bus is unresponsive, `lockgate status`
says why no stack answers, and once the server runs again `/healthz` says ok.

Before: `/healthz` asked nats-server for four streams' state one after another, each waiting out the 5 s request
timeout, and a stream that did not answer was left out: it answered after 20 s with `"status": "ok", "bus":
"connected"` (a probe with an ordinary timeout failed, and an orchestrator restarted a router that served fine from
its outbox), and `lockgate status` said `no lockgate stack answers at nats://... ()`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from typing import Any

import aiohttp
import pytest

from lockgate.config import Settings
from lockgate.server.apikeys import bootstrap
from lockgate.server.runtime import Runtime
from tests.helpers import hang

pytestmark = pytest.mark.timeout(120)

# Well under the 5 s of one request to the bus; the checks' own deadline is 0.8 s (Bus.health), the rest is slack
# for a loaded machine.
ANSWERED_WITHIN_S = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[float, int, dict[str, Any]]:
    """(seconds taken, HTTP status, body); gives up after 30 s, longer than the old handler's 20 s."""
    began = time.monotonic()
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
        return time.monotonic() - began, resp.status, await resp.json()


async def test_health_answers_at_once_and_says_the_bus_is_unresponsive_while_nats_server_hangs(
        settings: Settings) -> None:
    bootstrap(settings.home)  # a router without a key is not ready (503), whatever its bus
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", health_port=_free_port()), services=["router"])
    await runtime.start()
    try:
        assert runtime.nats is not None and runtime.nats.proc is not None
        healthz, readyz = runtime.endpoints["router"] + "/healthz", runtime.health_url + "/readyz"
        async with aiohttp.ClientSession() as http:
            _, code, body = await _get(http, healthz)
            assert (code, body["status"], body["bus"]) == (200, "ok", "connected"), body

            pid = runtime.nats.proc.pid
            await hang(pid)
            try:
                took, code, body = await _get(http, healthz)
                assert took < ANSWERED_WITHIN_S, f"/healthz took {took:.1f} s while nats-server hung: {body}"
                # Still 200: the router serves from its outbox, so a lost bus is degraded, not a failed check.
                assert (code, body["status"], body["bus"]) == (200, "degraded", "unresponsive"), body

                took, code, body = await _get(http, readyz)
                assert took < ANSWERED_WITHIN_S, f"/readyz took {took:.1f} s while nats-server hung: {body}"
                assert code == 503 and body["status"] == "not ready", body
                assert set(body["bus"].values()) == {"unresponsive"}, body

                # The CLI connects anew: the server accepts the TCP connection but never sends its INFO.
                env = {**os.environ, "LOCKGATE_HOME": runtime.settings.home, "LOCKGATE_NATS_URL": runtime.settings.nats_url,
                       "LOCKGATE_PREFIX": runtime.settings.prefix}
                cli = await asyncio.create_subprocess_exec(sys.executable, "-m", "lockgate.cli", "status", env=env,
                                                           stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                _, err = await asyncio.wait_for(cli.communicate(), 60)
                said = err.decode()
                assert cli.returncode == 1 and len(said.strip().splitlines()) == 1, said
                assert f"no lockgate stack answers at {runtime.settings.nats_url} (" in said, said
                assert "()" not in said and "within 5 s" in said, said
            finally:
                os.kill(pid, signal.SIGCONT)

            # Every bus connection of the process round-trips with the server again: it answers from now on.
            for bus in runtime.buses:
                await bus.nc.flush(timeout=30)
            _, code, body = await _get(http, healthz)
            assert (code, body["status"], body["bus"]) == (200, "ok", "connected"), body
            _, code, body = await _get(http, readyz)
            assert code == 200 and set(body["bus"].values()) == {"connected"}, body
    finally:
        await runtime.stop()
