"""A server's CPU work on what a client sent (parsing, checking, encoding it), in threads, off the event loop.

Under `lockgate up` every service and the router share one event loop: work of a second on it stalls them all.
A server hands such work to its `OffLoop`: threads of its own (not the loop's default executor, which the sink's
lookups and the store share), and at most `slots` requests' work at once, a request past them refused at once
(`Busy`, retryable) rather than queued, so the memory the work holds is bounded too. The OTLP receiver and the
gRPC API's `Ingest/Send` use it. (A protobuf parse runs in C holding the GIL: in a thread it still holds the
loop, which is why the gRPC servers look at the key, and count a batch's events, before they parse.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from lockgate.errors import BusUnavailable

T = TypeVar("T")


class Busy(BusUnavailable):
    """Too many requests are being worked on at once; the client is asked to retry later (UNAVAILABLE, 503)."""


class OffLoop:
    """Threads for requests' CPU work, and the slots that bound how many requests hold them."""

    def __init__(self, name: str, *, slots: int = 64, threads: int | None = None, busy: str = "") -> None:
        self.name = name
        self.busy = busy or f"too many {name} requests in flight; retry shortly"
        self._slots = asyncio.Semaphore(max(1, slots))
        # More threads than CPUs would add nothing but contention for the GIL.
        self._threads = threads or min(4, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One request's slot while the block runs; Busy at once when none is free."""
        if self._slots.locked():
            raise Busy(self.busy)
        async with self._slots:
            yield

    async def run(self, work: Callable[[], T]) -> T:
        """`work()` in one of the threads (within a `slot()`)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix=self.name)
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def close(self) -> None:
        """Stop the threads (work under way still finishes); later work starts them again."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
