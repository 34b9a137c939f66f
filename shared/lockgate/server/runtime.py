"""Embedded mode: nats-server + chDB + every service in one process. Distributed mode reuses it
with an external NATS and ClickHouse and a subset of services."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from lockgate import credentials, metrics
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.errors import BusClosed, LockgateError
from lockgate.server.health import HealthServer
from lockgate.server.httpguard import HttpLimits
from lockgate.server.natsserver import NatsServer, auth_config
from lockgate.server.registry import ServiceSet, available
from lockgate.server.service import ServiceContext
from lockgate.subjects import Subjects
from lockgate.telemetry import NatsSpanExporter, Telemetry

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from opentelemetry.sdk.metrics import MeterProvider

log = logging.getLogger("lockgate.server.runtime")

# The services that open ClickHouse: the sink writes it, the query service reads it. A process
# hosting neither never imports the store (and so carries no chDB).
STORE_OWNERS = frozenset({"sink", "query"})
# The identities allowed to create lockgate's streams and buckets where missing (see permissions.py).
TOPOLOGY_OWNERS = frozenset({"admin", "sink"})
# The identities allowed to change an existing one's configuration as well (Bus.ensure_topology): admin only.
TOPOLOGY_ADMINS = frozenset({"admin"})


class Runtime:
    """Owns the process: optional embedded nats-server, the bus, the services, and the store when it
    hosts the sink or the query service."""

    def __init__(self, settings: Settings, *, services: list[str] | None = None, embedded_nats: bool = True) -> None:
        self.settings = settings
        self.names = services or available()
        self.embedded_nats = embedded_nats
        self.nats: NatsServer | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.services: ServiceSet | None = None
        self.ctx: ServiceContext | None = None
        self.buses: list[Bus] = []
        self._meters: MeterProvider | None = None
        self._health: HealthServer | None = None
        self.health_url = ""

    async def start(self) -> None:
        """Bring everything up; on failure, tear down what started."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        s = self.settings
        if self.embedded_nats:
            url = urlparse(s.nats_url)
            # Users for every service, role and the SDK: generated once under the home, 0600.
            # port 0 asks nats-server for a free one; the real URL replaces the setting below
            port = 4222 if url.port is None else url.port
            self.nats = NatsServer(Path(s.home) / "nats", port=port, host=url.hostname or s.host,
                                   config=self._nats_config(), tls=bool(s.tls_cert and s.tls_key))
            await self.nats.start()
            self._supervisor = asyncio.create_task(self.nats.supervise(), name="nats-server supervisor")
            self.settings = s = s.replace(nats_url=self.nats.url)
        # One MeterProvider per process; its service.name says which services the process hosts.
        service_name = "lockgate" if len(self.names) > 1 else f"lockgate-{self.names[0]}"
        self._meters = metrics.install(service_name, otlp_endpoint=s.otlp_endpoint)
        store = None
        if STORE_OWNERS & set(self.names):
            from lockgate.store import open_store

            store = await asyncio.to_thread(open_store, s.clickhouse_url, s.database, retention=s.retention_days,
                                            event_past_s=s.event_time_past_s)
        subjects = Subjects(s.prefix)
        # One connection per identity: each service publishes and subscribes as itself, so the
        # server (not our code) stops the router from publishing a gate decision. Embedded, the
        # process also holds the admin identity, used only to declare streams and export spans.
        auths = {name: credentials.for_identity(s, name) for name in self.names}
        main_identity = "admin" if self.embedded_nats else self.names[0]
        main_auth = credentials.for_identity(s, main_identity)
        main = Bus(s.nats_url, subjects, name="lockgate-" + "+".join(self.names), auth=main_auth,
                   manage_topology=not main_auth.enabled or main_auth.user in TOPOLOGY_OWNERS,
                   update_topology=not main_auth.enabled or main_auth.user in TOPOLOGY_ADMINS, replicas=s.replicas)
        self.buses.append(main)
        await main.connect()
        telemetry = Telemetry(sample_ratio=s.trace_sample_ratio, slow_ms=s.trace_slow_ms,
                              exporter=NatsSpanExporter(main, asyncio.get_running_loop()))
        by_auth: dict[credentials.NatsAuth, Bus] = {main_auth: main}
        contexts: dict[str, ServiceContext] = {}
        for name in self.names:
            bus = by_auth.get(auths[name])
            if bus is None:
                bus = by_auth[auths[name]] = Bus(s.nats_url, subjects, name=f"lockgate-{name}", auth=auths[name],
                                                 manage_topology=False)
                self.buses.append(bus)
                await bus.connect()
            contexts[name] = ServiceContext(bus=bus, store=store, telemetry=telemetry, settings=s, buses=self.buses)
        if self.nats is not None:
            # `lockgate app-credential` wrote or removed a user under the home: apply it without a restart.
            await main.nc.subscribe(subjects.nats_reload, cb=self._on_reload)
        self.ctx = ServiceContext(bus=main, store=store, telemetry=telemetry, settings=s, buses=self.buses)
        self.services = ServiceSet(self.ctx, self.names, contexts)
        await self.services.start()
        if s.health_port:
            services = self.services
            self._health = HealthServer(lambda: self.buses, s.host, s.health_port, problems=services.problems,
                                        limits=HttpLimits.from_settings(s))
            self.health_url = await self._health.start()

    def _nats_config(self) -> str:
        """The embedded nats-server's users (every identity's, and each application credential's) and TLS."""
        s = self.settings
        return auth_config(Subjects(s.prefix), credentials.ensure(s.home),
                           apps={user: c["password"] for user, c in credentials.apps(s.home).items()},
                           tls_cert=s.tls_cert, tls_key=s.tls_key, tls_ca=s.tls_ca)

    async def _on_reload(self, msg: Msg) -> None:
        assert self.nats is not None
        if not msg.reply or msg.data:
            # Only the CLI's request (empty, awaiting an answer): a stray message (a JetStream acknowledgement
            # someone pointed here with a reply subject of theirs) reloads nothing.
            return
        try:
            await self.nats.reload(await asyncio.to_thread(self._nats_config))
            reply = {"ok": True, "apps": len(credentials.apps(self.settings.home))}
        except Exception as exc:  # the CLI is answered whatever failed, and told what
            message = exc.message if isinstance(exc, LockgateError) else repr(exc)
            log.error("NATS users not reloaded: %s", message)
            reply = {"ok": False, "error": message}
        await msg.respond(json.dumps(reply).encode())

    async def failed(self) -> BusClosed:
        """Wait until nats-py closes one of the process's connections for good (`Bus.closed`); returns why.

        The connection is not replaced in place: every service made its subscriptions, consumers and watches on it
        at start, and nats-py never reconnects a closed connection. So the process ends (`lockgate up` and `serve`
        stop and exit non-zero) and its supervisor (compose's restart policy, k8s) starts it again, with new
        connections, as it restarts a process that crashed."""
        waits = [asyncio.ensure_future(bus.closed()) for bus in self.buses]
        if not waits:
            raise RuntimeError("Runtime.failed() before start()")
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in pending:
            wait.cancel()
        return next(iter(done)).result()

    @property
    def endpoints(self) -> dict[str, str]:
        """Everything a user can connect to."""
        out = {"nats": self.settings.nats_url}
        if self.health_url:
            out["health"] = self.health_url + "/readyz"
        if self.ctx is not None and self.ctx.store is not None:
            out["clickhouse"] = self.settings.clickhouse_url
        if self.services:
            out.update(self.services.endpoints)
        return out

    async def stop(self) -> None:
        """Stop in reverse: services (servers first, flushing buffers), telemetry, bus, store, nats-server."""
        if self._health is not None:
            await self._health.stop()
        if self.services is not None:
            await self.services.stop()
        if self.ctx is not None:
            await self.ctx.telemetry.shutdown()  # the services' last spans, while the bus still publishes
        for bus in reversed(self.buses):
            with contextlib.suppress(Exception):
                await bus.close()
        self.buses.clear()
        if self.ctx is not None:
            if self.ctx.store is not None:
                self.ctx.store.close()
        if self._meters is not None:
            await asyncio.to_thread(metrics.shutdown, self._meters)  # a last OTLP export, if configured
            self._meters = None
        if self.nats is not None:
            self.nats.stop()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
