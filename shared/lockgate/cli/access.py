"""How the CLI reaches data: ask the running stack over NATS, or open ClickHouse directly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors

from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.errors import ConfigError, LockgateError, NotFound, StoreUnavailable
from lockgate.queries import registry
from lockgate.subjects import Subjects

T = TypeVar("T")
_ERRORS = {"NotFound": NotFound, "ConfigError": ConfigError, "StoreUnavailable": StoreUnavailable}


def query(settings: Settings, name: str, direct: bool = False, **args: Any) -> Any:
    """Run a named query. chDB allows one process per data path, so while `lockgate up` runs the
    CLI asks it over NATS; with --clickhouse (or no stack running) it opens ClickHouse itself."""
    if not direct:
        with contextlib.suppress(_NoStack):
            return asyncio.run(_over_nats(settings, name, args))
    from lockgate.store import open_store

    try:
        store = open_store(settings.clickhouse_url, settings.database)
    except StoreUnavailable as exc:
        raise StoreUnavailable(
            f"no running stack at {settings.nats_url} and ClickHouse at {settings.clickhouse_url} "
            f"could not be opened ({exc.message}); start one with `lockgate up`"
        ) from None
    return registry.run(store, name, args)


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
        msg = await nc.request(Subjects(settings.prefix).query,
                               msgspec.json.encode({"query": name, "args": args}), timeout=30)
    except nats.errors.NoRespondersError:
        raise _NoStack from None
    except nats.errors.TimeoutError:
        raise LockgateError(f"the stack at {settings.nats_url} did not answer query {name!r} within 30 s") from None
    finally:
        await nc.close()
    reply = msgspec.json.decode(msg.data)
    if "error" in reply:
        raise _ERRORS.get(reply.get("kind", ""), LockgateError)(reply["error"])
    return reply["rows"]
