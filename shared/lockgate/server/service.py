"""The shape every service has: its durable consumers plus optional background work."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lockgate.bus import Bus, Consumers
from lockgate.config import Settings
from lockgate.telemetry import Telemetry

if TYPE_CHECKING:  # importing the store loads clickhouse-connect (and chDB): only its owners do
    from lockgate.store import Store

log = logging.getLogger("lockgate.service")


def fewer_collections() -> None:
    """Run the cyclic garbage collector less often in this process (raised, never lowered), for the
    services whose every message or request allocates containers.

    At the interpreter's default gen-0 threshold of 700 the collector ran hundreds of times per sink
    fetch and took 15-25% of the time spent decoding and building columns, and several times a second
    in a loaded router; at 50,000 a few times (sink 5%; router CPU per request 7-12% lower in a paired
    bench). Reference counting still frees everything that is not a cycle at once, so memory barely
    changes."""
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, 50_000), max(gen1, 20), max(gen2, 100))


class Progress:
    """A counter tests and benches can await instead of sleeping."""

    def __init__(self) -> None:
        self.count = 0
        self._cond = asyncio.Condition()

    async def bump(self, n: int = 1) -> None:
        """Record `n` units of work done and wake waiters."""
        async with self._cond:
            self.count += n
            self._cond.notify_all()

    async def wait_for(self, target: int, timeout_s: float = 30.0) -> None:
        """Wait until at least `target` units are done, or raise TimeoutError."""
        async with self._cond:
            await asyncio.wait_for(self._cond.wait_for(lambda: self.count >= target), timeout_s)


@dataclass
class ServiceContext:
    """What a service is given: the bus, telemetry, settings, and the store where the process owns it.

    Only the sink (which writes) and the query service (which reads) use `store`; every other
    service reads through the query service (`lockgate.queryclient`) and gets None here when it
    runs in a process of its own.
    """

    bus: Bus
    telemetry: Telemetry
    settings: Settings
    store: Store | None = None
    # Every bus connection of the process (the runtime's list, as it is now): what one service's health reports for
    # the whole process reads them all, since each service letters on its own connection.
    buses: list[Bus] | None = None
    # The endpoints the process's services serve, as they are now (its ServiceSet's): the OTLP receiver, started
    # after the router, knows an embedded router's bound address by it (`--router-port 0` picks one at bind).
    process_endpoints: Callable[[], dict[str, str]] = dict


class Service:
    """Base for the six services and the sink. `app.py` builds one and wires its handlers."""

    name = "service"

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.consumers = Consumers()  # registered by app.py with consume(); started by the bus
        self.tracer = ctx.telemetry.tracer(self.name)
        self.log = logging.getLogger(f"lockgate.{self.name}")
        self._tasks: set[asyncio.Task[Any]] = set()  # running: each leaves when done (a timer's work is many)

    @property
    def endpoints(self) -> dict[str, str]:
        """Human-facing endpoints this service serves (printed by `lockgate up`)."""
        return {}

    def problems(self) -> list[str]:
        """What keeps this service from its work though its bus is connected ([] when nothing): `/readyz` is 503
        while there is any (a gatekeeper whose signing key is not trusted)."""
        return []

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run background work that is cancelled on stop."""
        task = asyncio.create_task(coro, name=f"{self.name}:{name}")
        task.add_done_callback(_ended)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self) -> None:
        """Called after the bus has started; start servers and background tasks here."""

    async def stop(self) -> None:
        """Cancel background tasks; subclasses flush buffers first, then call super()."""
        tasks = list(self._tasks)  # each one ending leaves the set
        for task in tasks:
            task.cancel()
        for task in tasks:
            # A task can swallow its cancel: on Python 3.11 asyncio.wait_for (nats-py's request uses it) returns a
            # result that arrived with the cancel and drops the cancel, and the task's loop goes on. Awaited once,
            # the stop then waited for good (a restarted router in tests, `up` when a later listener failed): it is
            # cancelled again until it ends.
            while not (await asyncio.wait({task}, timeout=1.0))[0]:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        self._tasks.clear()


def _ended(task: asyncio.Task[Any]) -> None:
    """Say so when background work ends by an error: nothing restarts it, and before it ended unseen (a router's
    trust watch stopped by one bad read of the trust file, and revocations went unacted on)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background task %s stopped: %r", task.get_name(), exc, exc_info=exc)
