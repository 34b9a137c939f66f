"""Query service wiring: one queue-group subscription on `subjects.query`, so replicas share the load."""

from __future__ import annotations

import contextlib
from typing import Any

from lockgate.errors import ConfigError
from lockgate.server.service import Service, ServiceContext
from lockgate.services.query.handlers import QueryHandlers


class QueryService(Service):
    """Answers named read-only queries for the CLI and the other services from ClickHouse."""

    name = "query"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        if ctx.store is None:
            raise ConfigError("the query service needs ClickHouse; run it where the store is opened")
        if ctx.settings.clickhouse_readonly_url:
            ctx.store.readonly_url = ctx.settings.clickhouse_readonly_url  # operator SQL as the read-only user
        self.handlers: QueryHandlers | None = None
        self._sub: Any = None

    async def start(self) -> None:
        """Subscribe once the connection (and its max_payload) is known."""
        assert self.ctx.store is not None
        nc = self.ctx.bus.nc
        self.handlers = QueryHandlers(self.ctx.store, nc.max_payload)
        s = self.ctx.bus.subjects
        self._sub = await nc.subscribe(s.query, queue=s.query_group, cb=self.handlers.on_request)

    async def stop(self) -> None:
        """Stop taking requests; the ones being answered finish first."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.drain()
            self._sub = None
        if self.handlers is not None:
            await self.handlers.finish()
        await super().stop()


def create(ctx: ServiceContext) -> QueryService:
    """Build the query service."""
    return QueryService(ctx)
