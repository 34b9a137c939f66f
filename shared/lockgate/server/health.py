"""Liveness and readiness of one `lockgate serve` process, for orchestrators (k8s probes).

`/livez` answers while the event loop runs. `/readyz` is 200 only when every bus connection of the
process is connected and nats-server answers it (`Bus.health`: "unresponsive" when it does not within 0.8 s):
a worker cut off from NATS does no work, so it must not count as ready (a
rolling restart waits for the new pod to reach the bus before stopping the next one); `streams_full` names a
stream that refuses publishes, its backlog unconsumed, and a full dead-letter originals bucket (`Bus.full_streams`);
`dead_letters_waiting` counts the messages whose letter this process could not store (`Bus.letters_waiting`);
`problems` lists what keeps a service from its work though connected (`Service.problems`: a gatekeeper whose signing
key is not trusted), and any makes it not ready; `topology_differs` names the streams and buckets whose configuration
differs from lockgate's, which a service's identity may not change (`Bus.ensure_topology`). The router's own `/healthz` stays 200 on a lost bus, since it still
serves requests while events wait in its outbox.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from aiohttp import web

from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.server.httpguard import HttpLimits, app_runner
from lockgate.server.tls import listen_http


class HealthServer:
    """Serves /livez and /readyz for the buses `buses()` returns (the runtime's, as they are now) and the services'
    `problems()`."""

    def __init__(self, buses: Callable[[], list[Bus]], host: str, port: int,
                 problems: Callable[[], Sequence[str]] = list, limits: HttpLimits | None = None) -> None:
        self._buses = buses
        self._limits = limits or HttpLimits.from_settings(Settings())
        self._problems = problems
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/livez", self._live)
        app.router.add_get("/readyz", self._ready)
        self._runner = app_runner(app, self._limits, shutdown_timeout=1.0)
        await self._runner.setup()
        await listen_http(self._runner, self._host, self._port, what="health", flag="--health-port")
        port = self._runner.addresses[0][1]
        return f"http://{self._host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def _ready(self, request: web.Request) -> web.Response:
        buses = self._buses()
        # Every connection asked at once, each within Bus.health's deadline: a hung nats-server reads "unresponsive"
        # (not ready: its worker does no work) in well under a second.
        checked = await asyncio.gather(*(bus.health() for bus in buses))
        states = {bus.name: state for bus, (state, _) in zip(buses, checked, strict=True)}
        problems = list(self._problems())
        ready = bool(states) and all(state == "connected" for state in states.values()) and not problems
        # A full stream refuses what producers publish (discard new): said here, but the process stays ready, since
        # restarting it or taking it out of service frees no room; its consumers' backlog does (`lockgate status`).
        full = {s["stream"]: s for _, streams in checked for s in streams}
        # A stream or bucket whose configuration differs from lockgate's (an upgrade's new limits not applied yet, or
        # someone's change): said here and in the log at start, but the process stays ready, since a restart changes
        # nothing; `lockgate --role admin topology apply` does, or for a kept stream (bus.py KEPT_BY_OPERATOR in its
        # entry) the server's operator alone.
        differs = list(dict.fromkeys(d for bus in buses for d in bus.topology_differs))
        return web.json_response({"status": "ready" if ready else "not ready", "bus": states,
                                  "streams_full": list(full.values()),
                                  "dead_letters_waiting": sum(bus.letters_waiting for bus in buses),
                                  "topology_differs": differs,
                                 "problems": problems},
                                 status=200 if ready else 503)
