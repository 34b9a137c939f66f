"""A server's CPU work on what a client sent (parsing, checking, encoding it), in threads, off the event loop.

Under `lockgate up` every service and the router share one event loop: work of a second on it stalls them all.
A server hands such work to its `OffLoop`: threads of its own (not the loop's default executor, which the sink's
lookups and the store share), and at most `slots` requests' work at once, a request past them refused at once
(`Busy`, retryable) rather than queued, so the memory the work holds is bounded too. The OTLP receiver and the
gRPC API's `Ingest/Send` use it. (A protobuf parse runs in C holding the GIL: in a thread it still holds the
loop, which is why the gRPC servers look at the key, and count a batch's events, before they parse.)

A server whose clients are several owners (the OTLP receiver: tenants) gives each a `share` of the slots and of the
threads. Past its share of the slots an owner is refused at once, as when they are all taken; past its share of the
threads its work waits for one of its own to end, and a thread let go goes to the waiting owner holding fewest, so
one owner's long work never queues another's. (Before, probe p89 F1: one tenant's OTLP exports took all 64 slots,
or with 4 bodies of ~10 s to scrub every thread, and the other tenants' exports were refused or queued past the
exporters' 10 s.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from lockgate.errors import BusUnavailable

T = TypeVar("T")


class Busy(BusUnavailable):
    """Too many requests are being worked on at once; the client is asked to retry later (UNAVAILABLE, 503)."""


class Shares:
    """`total` things held at once, at most `per_owner` of them one owner's: the counting alone, no waiting."""

    def __init__(self, total: int, per_owner: int) -> None:
        self.total = max(1, total)
        self.per_owner = max(1, min(per_owner, self.total))
        self.held: Counter[str] = Counter()

    def full(self) -> bool:
        """Every one is held."""
        return sum(self.held.values()) >= self.total

    def owner_full(self, owner: str) -> bool:
        """`owner` holds its share."""
        return self.held[owner] >= self.per_owner

    def take(self, owner: str) -> None:
        """One more of `owner`'s (the caller checked it may)."""
        self.held[owner] += 1

    def give(self, owner: str) -> None:
        """One of `owner`'s let go."""
        self.held[owner] -= 1
        if self.held[owner] <= 0:
            del self.held[owner]

    @contextlib.contextmanager
    def holding(self, owner: str) -> Iterator[None]:
        """One of `owner`'s while the block runs (the caller checked it may)."""
        self.take(owner)
        try:
            yield
        finally:
            self.give(owner)

    def pick(self, waiting: Sequence[str]) -> int | None:
        """Which of the owners `waiting` (in the order they came) takes the next one: of those below their share,
        the first of those holding fewest; None when every one is held or each waiting owner holds its share."""
        if self.full():
            return None
        chosen: int | None = None
        for i, owner in enumerate(waiting):
            if not self.owner_full(owner) and (chosen is None or self.held[owner] < self.held[waiting[chosen]]):
                chosen = i
        return chosen


def _share(total: int, share: float) -> int:
    return max(1, int(total * share))


class OffLoop:
    """Threads for requests' CPU work, and the slots that bound how many requests hold them; of both, at most a
    `share` one owner's (1.0: the first to come take them all)."""

    def __init__(self, name: str, *, slots: int = 64, threads: int | None = None, busy: str = "",
                 share: float = 1.0, over_share: str = "") -> None:
        self.name = name
        self.busy = busy or f"too many {name} requests in flight; retry shortly"
        # Formatted with the owner, its share and the slots.
        self.over_share = over_share or f"{{owner}} already has {{share}} {name} requests in flight, its share of " \
                                        "{total}; retry shortly"
        self.slots = Shares(slots, _share(slots, share))
        # More threads than CPUs would add nothing but contention for the GIL; with shares, two at least, or one
        # owner's share would be the only thread.
        count = threads or min(4, os.cpu_count() or 1)
        count = max(2, count) if share < 1 else count
        self.threads = Shares(count, _share(count, share))
        self._waiting: dict[int, tuple[str, asyncio.Future[None]]] = {}  # for a thread, in the order they came
        self._tickets = itertools.count()
        self._pool: ThreadPoolExecutor | None = None

    @contextlib.asynccontextmanager
    async def slot(self, owner: str = "") -> AsyncIterator[None]:
        """One request's slot, `owner`'s, while the block runs; Busy at once when none is free, or `owner` holds its
        share."""
        if self.slots.full():
            raise Busy(self.busy)
        if self.slots.owner_full(owner):
            raise Busy(self.over_share.format(owner=owner, share=self.slots.per_owner, total=self.slots.total))
        with self.slots.holding(owner):
            yield

    async def run(self, work: Callable[[], T], owner: str = "") -> T:
        """`work()` in one of the threads (within a `slot(owner)`), once one is free for `owner`."""
        await self._thread(owner)
        loop = asyncio.get_running_loop()
        try:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.threads.total, thread_name_prefix=self.name)
            done: Future[T] = self._pool.submit(work)
        except BaseException:
            self._let_go(owner)
            raise
        # The thread is given back when the work ends, not when its caller stops waiting for it (a client gone):
        # the work runs on in its thread all the same, and the next one would queue behind it.
        done.add_done_callback(lambda _: _soon(loop, self._let_go, owner))
        return await asyncio.wrap_future(done)

    async def _thread(self, owner: str) -> None:
        """Wait until a thread is `owner`'s: at once when one is free and it holds less than its share."""
        ticket, granted = next(self._tickets), asyncio.get_running_loop().create_future()
        self._waiting[ticket] = (owner, granted)
        self._grant()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # granted in the same turn: given back
                self._let_go(owner)
            else:
                self._waiting.pop(ticket, None)
            raise

    def _let_go(self, owner: str) -> None:
        self.threads.give(owner)
        self._grant()

    def _grant(self) -> None:
        for ticket in [t for t, (_, granted) in self._waiting.items() if granted.done()]:  # cancelled
            del self._waiting[ticket]
        while self._waiting:
            tickets = list(self._waiting)
            chosen = self.threads.pick([self._waiting[t][0] for t in tickets])
            if chosen is None:
                return
            owner, granted = self._waiting.pop(tickets[chosen])
            self.threads.take(owner)
            granted.set_result(None)

    def close(self) -> None:
        """Stop the threads (work under way still finishes); later work starts them again."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def _soon(loop: asyncio.AbstractEventLoop, callback: Callable[[str], None], owner: str) -> None:
    """`callback(owner)` on `loop`, from a pool thread; nothing once the loop is closed (nothing waits any more)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, owner)
