"""How the CLI reaches data: ask the query service over NATS, or open ClickHouse directly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors

from lockgate import queryclient
from lockgate.bus import Bus
from lockgate.codec import to_json
from lockgate.config import Settings
from lockgate.errors import StoreUnavailable
from lockgate.subjects import Subjects

T = TypeVar("T")


def query(settings: Settings, name: str, direct: bool = False, **args: Any) -> Any:
    """Run a named query. chDB allows one process per data path, so while a stack runs the CLI asks
    its query service over NATS; with --clickhouse (or no stack running) it opens ClickHouse itself."""
    if not direct:
        with contextlib.suppress(_NoStack):
            return asyncio.run(_over_nats(settings, name, args))
    return _direct(settings, name, args)


def _direct(settings: Settings, name: str, args: dict[str, Any]) -> Any:
    # The query service's own registry, so both paths check arguments and build rows alike.
    from lockgate.services.query import registry
    from lockgate.store import open_store

    try:
        store = open_store(settings.clickhouse_url, settings.database)
    except StoreUnavailable as exc:
        raise StoreUnavailable(
            f"no running stack at {settings.nats_url} and ClickHouse at {settings.clickhouse_url} "
            f"could not be opened ({exc.message}); start one with `lockgate up`"
        ) from None
    try:
        rows = registry.run(store, name, args)
    finally:
        store.close()
    # Through the one encoder and back, as a reply from the query service is: a datetime becomes
    # the same ISO string either way, so output never depends on which path answered.
    return queryclient.decode_reply(to_json({"rows": rows}), name)


def with_bus(settings: Settings, work: Callable[[Bus], Awaitable[T]]) -> T:
    """Run `work` with a connected Bus (a short-lived CLI connection) and return its result."""

    async def run() -> T:
        bus = Bus(settings.nats_url, Subjects(settings.prefix), name="lockgate-cli")
        await bus.connect()
        try:
            return await work(bus)
        finally:
            await bus.close()

    return asyncio.run(run())


class _NoStack(Exception):
    """Nothing answers queries at the NATS URL: fall back to opening ClickHouse directly."""


async def _over_nats(settings: Settings, name: str, args: dict[str, Any]) -> Any:
    try:
        nc = await nats.connect(settings.nats_url, connect_timeout=1, max_reconnect_attempts=0,
                                allow_reconnect=False)
    except (TimeoutError, OSError, nats.errors.Error):
        raise _NoStack from None
    try:
        return await queryclient.request(nc, Subjects(settings.prefix).query, name, args)
    except queryclient.NoQueryService:
        raise _NoStack from None
    finally:
        await nc.close()
