"""Embedded mode: nats-server + chDB + every service in one process. Distributed mode reuses it
with an external NATS and ClickHouse and a subset of services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from lockgate import metrics
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.server.natsserver import NatsServer
from lockgate.server.registry import ServiceSet, available
from lockgate.server.service import ServiceContext
from lockgate.subjects import Subjects
from lockgate.telemetry import NatsSpanExporter, Telemetry

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider

log = logging.getLogger("lockgate.server.runtime")

# The services that open ClickHouse: the sink writes it, the query service reads it. A process
# hosting neither never imports the store (and so carries no chDB).
STORE_OWNERS = frozenset({"sink", "query"})


class Runtime:
    """Owns the process: optional embedded nats-server, the bus, the services, and the store when it
    hosts the sink or the query service."""

    def __init__(self, settings: Settings, *, services: list[str] | None = None, embedded_nats: bool = True) -> None:
        self.settings = settings
        self.names = services or available()
        self.embedded_nats = embedded_nats
        self.nats: NatsServer | None = None
        self.services: ServiceSet | None = None
        self.ctx: ServiceContext | None = None
        self._meters: MeterProvider | None = None

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
            # port 0 asks nats-server for a free one; the real URL replaces the setting below
            port = 4222 if url.port is None else url.port
            self.nats = NatsServer(Path(s.home) / "nats", port=port, host=url.hostname or s.host)
            await self.nats.start()
            self.settings = s = s.replace(nats_url=self.nats.url)
        # One MeterProvider per process; its service.name says which services the process hosts.
        service_name = "lockgate" if len(self.names) > 1 else f"lockgate-{self.names[0]}"
        self._meters = metrics.install(service_name, otlp_endpoint=s.otlp_endpoint)
        if "gatekeeper" in self.names and not s.trust_file:
            # Trust roots are configuration: `lockgate up` writes the gatekeeper's persistent key
            # into {home}/trust.json, which every consumer reads, before any decision is signed. An
            # explicit LOCKGATE_TRUST_FILE (k8s: a mounted ConfigMap) is the operator's, never written.
            from lockgate.signing import ensure_signer_trusted

            await asyncio.to_thread(ensure_signer_trusted, s)
        store = None
        if STORE_OWNERS & set(self.names):
            from lockgate.store import open_store

            store = await asyncio.to_thread(open_store, s.clickhouse_url, s.database)
        bus = Bus(s.nats_url, Subjects(s.prefix), name="lockgate-" + "+".join(self.names))
        await bus.connect()
        telemetry = Telemetry(sample_ratio=s.trace_sample_ratio,
                              exporter=NatsSpanExporter(bus, asyncio.get_running_loop()))
        self.ctx = ServiceContext(bus=bus, store=store, telemetry=telemetry, settings=s)
        self.services = ServiceSet(self.ctx, self.names)
        await self.services.start()

    @property
    def endpoints(self) -> dict[str, str]:
        """Everything a user can connect to."""
        out = {"nats": self.settings.nats_url}
        if self.ctx is not None and self.ctx.store is not None:
            out["clickhouse"] = self.settings.clickhouse_url
        if self.services:
            out.update(self.services.endpoints)
        return out

    async def stop(self) -> None:
        """Stop in reverse: services (servers first, flushing buffers), telemetry, bus, store, nats-server."""
        if self.services is not None:
            await self.services.stop()
        if self.ctx is not None:
            await self.ctx.telemetry.shutdown()  # the services' last spans, while the bus still publishes
            with contextlib.suppress(Exception):
                await self.ctx.bus.close()
            if self.ctx.store is not None:
                self.ctx.store.close()
        if self._meters is not None:
            await asyncio.to_thread(metrics.shutdown, self._meters)  # a last OTLP export, if configured
            self._meters = None
        if self.nats is not None:
            self.nats.stop()
