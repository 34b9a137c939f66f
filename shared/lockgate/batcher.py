"""The one batcher: items gathered by count, bytes and age, handed to one flush function.

Every "buffer + timer + flush" in lockgate is this class: the router's and the SDK's inference
events, gRPC ingest, the evaluator's case writer and the sink's inserts. Two ways in:

- `add(item)`: fire and forget, never blocks; when the buffer holds `capacity` items the
  overflow policy decides (`drop_newest` refuses the new item, `drop_oldest` evicts the oldest);
  every loss is counted in `dropped` and reported to `on_drop` (a metric, where one is wanted).
- `await submit(item)`: returns when the flush holding the item finished and raises what that
  flush raised, so a consumer acks a message only once its rows are stored.

`await flush()` returns once everything added before the call is flushed; `await close()` stops
the timer and really flushes what is left. At most `max_in_flight` flushes run at once, so a
slow sink backs the buffer up instead of memory.

A batcher made with `autostart=False` only buffers (no event loop needed) until `start()`, for an
owner that accepts items before its flush target exists (the SDK before it has connected).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
Overflow = Literal["drop_newest", "drop_oldest"]

log = logging.getLogger("lockgate.batcher")


class Batcher(Generic[T]):
    """Buffers items; flushes a batch when it has `max_items` items or `max_bytes` bytes, or its
    oldest item is `max_age_s` old."""

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[None]],
        *,
        max_items: int = 500,
        max_age_s: float = 0.05,
        max_bytes: int | None = None,
        size: Callable[[T], int] | None = None,
        capacity: int = 100_000,
        overflow: Overflow = "drop_newest",
        # Called as on_drop(n, reason) for items lost: "overflow", or "flush_failed" for added items
        # nobody awaits (submitted ones raise to their caller instead). A callback, not a metric,
        # so the SDK that uses this batcher needs no OpenTelemetry.
        on_drop: Callable[[int, str], None] | None = None,
        # Called with each item `drop_oldest` evicts (before on_drop), for an owner that keeps a copy of it
        # elsewhere (the Outbox's spool).
        on_evict: Callable[[T], None] | None = None,
        max_in_flight: int = 1,
        isolate: Callable[[BaseException], bool] | None = None,
        name: str = "batcher",
        autostart: bool = True,
    ) -> None:
        if max_bytes is not None and size is None:
            raise ValueError("max_bytes needs a size function")
        self._flush_fn = flush
        self.max_items = max_items
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._size = size
        self.capacity = capacity
        self.overflow = overflow
        self._on_drop = on_drop
        self._on_evict = on_evict
        # A failed batch of several items is flushed again one item at a time when `isolate`
        # says so, so one poison item cannot fail the others.
        self._isolate = isolate
        self.name = name
        self._items: deque[tuple[T, asyncio.Future[None] | None]] = deque()
        self._bytes = 0
        self._added = 0  # items ever accepted
        self._taken = 0  # items ever handed to a flush
        self._slots = asyncio.Semaphore(max_in_flight)
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self._started = autostart
        self.dropped = 0
        self.flushed = 0
        self.failed = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        """True once close() was called: add() and submit() refuse from then on."""
        return self._closed

    def start(self) -> None:
        """Begin flushing what was buffered so far (needed only with autostart=False), on the running loop."""
        self._started = True
        # The flush task starts now, on the owner's loop, not at the next add: an add that is the first may come
        # from a thread without one (an SDK's emit handed over from a worker thread).
        self._ensure_runner()
        if self._items or self._waiters:
            self._wake.set()

    def add(self, item: T) -> bool:
        """Queue one item without waiting; False when the overflow policy refused it."""
        return self._append(item, None)

    async def submit(self, item: T) -> None:
        """Queue one item and wait for the flush that holds it (raising what it raised)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._append(item, fut):
            raise OverflowError(f"{self.name}: buffer full ({self.capacity} items)")
        await fut

    async def flush(self) -> None:
        """Return once every item added before this call has been flushed (or failed); starts the
        batcher if it was not started, since the caller asks for the flush."""
        self._started = True
        target = self._added
        if self._taken < target:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((target, fut))
            self._ensure_runner()
            self._wake.set()
            await fut
        if self._in_flight:
            await asyncio.wait(set(self._in_flight))

    async def close(self) -> None:
        """Flush everything left, wait for it, then stop the background task."""
        self._closed = True
        await self.flush()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None

    def abandon(self, reason: str) -> int:
        """Close without flushing, for a batcher that was never started: every buffered item is dropped
        (counted in `dropped`, reported to `on_drop` with `reason`, its submit() raising) and later adds
        are refused. Returns how many were dropped."""
        self._closed = True
        n = len(self._items)
        for _, fut in self._items:
            if fut is not None and not fut.done():
                fut.set_exception(RuntimeError(f"{self.name} closed before it was started"))
        self._items.clear()
        self._bytes = 0
        self._taken += n
        self.dropped += n
        if n:
            self._report_loss(n, reason)
        return n

    def _append(self, item: T, fut: asyncio.Future[None] | None) -> bool:
        # Every event an application emits passes here: the usual case (open, room, runner alive) is a
        # handful of steps with no further call; `_refuse_or_evict` and `_ensure_runner` are the rare paths.
        items = self._items
        if self._closed or len(items) >= self.capacity:
            if not self._refuse_or_evict():
                return False
        items.append((item, fut))
        self._added += 1
        if self._size is not None:
            self._bytes += self._size(item)
        runner = self._runner
        if runner is None or runner.done():
            self._ensure_runner()
        n = len(items)
        # Start the age clock (first item), or flush now (full): as `_full()` says, without the call.
        if n == 1 or n >= self.max_items or (self.max_bytes is not None and self._bytes >= self.max_bytes):
            self._wake.set()
        return True

    def _refuse_or_evict(self) -> bool:
        """For an item that found the buffer full: False if it is refused, True once the oldest item was
        evicted to make room for it. Raises once the batcher is closed."""
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")
        if self.overflow == "drop_newest":
            self.dropped += 1
            self._report_loss(1, "overflow")
            return False
        old, old_fut = self._items.popleft()
        if self._on_evict is not None:
            try:
                self._on_evict(old)
            except Exception:  # as counting a loss, never the cause of another
                log.debug("%s: on_evict failed", self.name, exc_info=True)
        self._bytes -= self._size(old) if self._size else 0
        self._taken += 1  # the evicted item will never be flushed: flush() must not wait on it
        self.dropped += 1
        self._report_loss(1, "overflow")
        if old_fut is not None and not old_fut.done():
            old_fut.set_exception(OverflowError(f"{self.name}: evicted by newer items"))
        return True

    def _report_loss(self, n: int, reason: str) -> None:
        if self._on_drop is not None:
            try:
                self._on_drop(n, reason)
            except Exception:  # counting a loss must not cause another
                log.debug("%s: on_drop failed", self.name, exc_info=True)

    def _full(self) -> bool:
        return len(self._items) >= self.max_items or (
            self.max_bytes is not None and self._bytes >= self.max_bytes
        )

    def _ensure_runner(self) -> None:
        if not self._started:
            return
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run(), name=f"{self.name}:flush")

    async def _run(self) -> None:
        while True:
            if not self._items and not self._waiters:
                self._wake.clear()
                await self._wake.wait()  # the first item, or a flush() call
            if not self._full() and not self._waiters:
                self._wake.clear()
                # asyncio.timeout, not wait_for: on 3.11 a cancel that lands as wait_for times out is lost
                with contextlib.suppress(TimeoutError):  # the age limit passed before the batch filled
                    async with asyncio.timeout(self.max_age_s):
                        await self._wake.wait()
            # Take a flush slot before the items, so the backlog waits in the buffer (bounded)
            # rather than in tasks.
            while self._items:
                await self._slots.acquire()
                batch = self._take()
                task = asyncio.create_task(self._flush_batch(batch))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
                self._release_waiters()
                if not self._full() and not self._waiters:
                    break
            self._release_waiters()

    def _take(self) -> list[tuple[T, asyncio.Future[None] | None]]:
        items = self._items
        batch: list[tuple[T, asyncio.Future[None] | None]]
        if self._size is None:  # cut by count alone: the whole buffer at C speed when it is one batch (usual)
            n = min(len(items), self.max_items)
            if n == len(items):
                batch = list(items)
                items.clear()
            else:
                batch = [items.popleft() for _ in range(n)]
            self._taken += n
            return batch
        batch = []
        size = 0
        while self._items and len(batch) < self.max_items:
            if self.max_bytes is not None and batch and size >= self.max_bytes:
                break
            entry = self._items.popleft()
            if self._size is not None:
                n = self._size(entry[0])
                size += n
                self._bytes -= n
            batch.append(entry)
        self._taken += len(batch)
        return batch

    def _release_waiters(self) -> None:
        still = []
        for target, fut in self._waiters:
            if self._taken >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((target, fut))
        self._waiters = still

    async def _flush_batch(self, batch: list[tuple[T, asyncio.Future[None] | None]]) -> None:
        try:
            await self._flush_fn([item for item, _ in batch])
        except Exception as exc:
            if len(batch) > 1 and self._isolate is not None and self._isolate(exc):
                log.warning("%s: batch of %d failed (%r); flushing one by one", self.name, len(batch), exc)
                for entry in batch:
                    await self._flush_one(entry)
            else:
                self._settle(batch, exc)
        else:
            self._settle(batch, None)
        finally:
            self._slots.release()

    async def _flush_one(self, entry: tuple[T, asyncio.Future[None] | None]) -> None:
        try:
            await self._flush_fn([entry[0]])
        except Exception as exc:
            self._settle([entry], exc)
        else:
            self._settle([entry], None)

    def _settle(self, batch: list[tuple[T, asyncio.Future[None] | None]], exc: BaseException | None) -> None:
        if exc is None:
            self.flushed += len(batch)
        else:
            self.failed += len(batch)
            unawaited = sum(fut is None for _, fut in batch)
            if unawaited == len(batch):  # nobody awaits these items: say so here
                log.warning("%s: flush of %d items failed: %r", self.name, len(batch), exc)
            if unawaited:
                self._report_loss(unawaited, "flush_failed")
        for _, fut in batch:
            if fut is not None and not fut.done():
                fut.set_exception(exc) if exc is not None else fut.set_result(None)
