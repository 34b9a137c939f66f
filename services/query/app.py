"""Query service wiring: one queue-group subscription on `subjects.query`, so replicas share the load."""

from __future__ import annotations

import contextlib
from typing import Any

from lockgate.errors import ConfigError
from lockgate.server.service import Service, ServiceContext
from lockgate.services.query.handlers import NAMED_QUERY_SETTINGS, QueryHandlers
from lockgate.store import Store
from lockgate.store.client import chdb_path


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
        self._subs: list[Any] = []

    async def start(self) -> None:
        """Subscribe once the connection (and its max_payload) is known."""
        assert self.ctx.store is not None
        nc = self.ctx.bus.nc
        s = self.ctx.bus.subjects
        self.handlers = QueryHandlers(self.ctx.store, nc.max_payload, cli_subject=s.query_cli, session=self._session)
        self._subs = [await nc.subscribe(subject, queue=s.query_group, cb=self.handlers.on_request)
                      for subject in (s.query, s.query_cli)]

    def _session(self) -> Store:
        """A store session of its own for a lane of named queries, every query bounded (NAMED_QUERY_SETTINGS)."""
        store = self.ctx.store
        assert store is not None
        if store.url.startswith("chdb:") and chdb_path(store.url) is None:
            # An in-memory chDB is one session's own: another would see none of its tables. Still bounded.
            session = store
        else:
            session = Store(store.url, store.database)
        session.query_settings = NAMED_QUERY_SETTINGS
        return session

    async def stop(self) -> None:
        """Stop taking requests; the ones being answered finish first."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.drain()
        self._subs = []
        if self.handlers is not None:
            await self.handlers.finish()
        await super().stop()


def create(ctx: ServiceContext) -> QueryService:
    """Build the query service."""
    return QueryService(ctx)
