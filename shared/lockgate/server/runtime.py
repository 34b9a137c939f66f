"""Embedded mode: nats-server + chDB + every service in one process. Distributed mode reuses it
with an external NATS and ClickHouse and a subset of services."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import msgspec

from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.queries import registry
from lockgate.server.natsserver import NatsServer
from lockgate.server.registry import ServiceSet, available
from lockgate.server.service import ServiceContext
from lockgate.store import open_store
from lockgate.subjects import Subjects
from lockgate.telemetry import Telemetry

log = logging.getLogger("lockgate.server.runtime")




def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, set | tuple):
        return list(value)
    return str(value)


def to_json(value: Any) -> bytes:
    """JSON for query results (datetimes as ISO strings)."""
    return msgspec.json.encode(value, enc_hook=_json_default)


class Runtime:
    """Owns the process: optional embedded nats-server, the store, the bus and the services."""

    def __init__(self, settings: Settings, *, services: list[str] | None = None, embedded_nats: bool = True,
                 grpc: bool = True, query_responder: bool = True) -> None:
        self.settings = settings
        self.names = services or available()
        self.embedded_nats = embedded_nats
        self.grpc_enabled = grpc
        self.query_enabled = query_responder
        self.nats: NatsServer | None = None
        self.services: ServiceSet | None = None
        self.ctx: ServiceContext | None = None
        self.grpc: Any = None
        self._exporter: asyncio.Task[None] | None = None
        self._query_sub: Any = None

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
        store = await asyncio.to_thread(open_store, s.clickhouse_url, s.database)
        bus = Bus(s.nats_url, Subjects(s.prefix), name="lockgate-" + "+".join(self.names))
        await bus.connect()
        telemetry = Telemetry(sample_ratio=s.trace_sample_ratio)
        self.ctx = ServiceContext(bus=bus, store=store, telemetry=telemetry, settings=s)
        self.services = ServiceSet(self.ctx, self.names)
        await self.services.start()
        self._exporter = asyncio.create_task(telemetry.run_exporter(bus), name="telemetry-exporter")
        if self.query_enabled:
            self._query_sub = await bus.nc.subscribe(bus.subjects.query, queue="lockgate-query", cb=self._on_query)
        if self.grpc_enabled:
            from lockgate.grpc_server import GrpcServer

            self.grpc = GrpcServer(bus, s.host, s.grpc_port, settings=s)
            await self.grpc.start()

    @property
    def endpoints(self) -> dict[str, str]:
        """Everything a user can connect to."""
        out = {"nats": self.settings.nats_url, "clickhouse": self.settings.clickhouse_url}
        if self.services:
            out.update(self.services.endpoints)
        if self.grpc is not None:
            out["grpc"] = self.grpc.address
        return out

    async def _on_query(self, msg: Any) -> None:
        """Answer `{"query": name, "args": {...}}` with `{"rows": ...}` or `{"error": ...}`."""
        try:
            request = msgspec.json.decode(msg.data)
            assert self.ctx is not None
            result = await asyncio.to_thread(registry.run, self.ctx.store, request["query"], request.get("args", {}))
            reply = to_json({"rows": result})
        except Exception as exc:  # the operator gets the message; the stack keeps serving
            reply = to_json({"error": getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}",
                             "kind": type(exc).__name__})
        with contextlib.suppress(Exception):
            await msg.respond(reply)

    async def stop(self) -> None:
        """Stop in reverse: servers, services (flushing buffers), telemetry, bus, store, nats-server."""
        if self.grpc is not None:
            with contextlib.suppress(Exception):
                await self.grpc.stop(2.0)
        if self._query_sub is not None:
            with contextlib.suppress(Exception):
                await self._query_sub.unsubscribe()
        if self.services is not None:
            await self.services.stop()
        if self._exporter is not None:
            self._exporter.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._exporter
        if self.ctx is not None:
            with contextlib.suppress(Exception):
                await self.ctx.bus.close()
            self.ctx.store.close()
        if self.nats is not None:
            self.nats.stop()
