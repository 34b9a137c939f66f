"""Inference events leave the request path through a bounded in-memory batcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from lockgate.bus import Bus
from lockgate.contracts import InferenceEvent

log = logging.getLogger("lockgate.router")


class EventBatcher:
    """Bounded queue of events, published per app every `interval_s` or every `batch_size` events.

    When the bus cannot keep up the oldest events are dropped (and counted): the request path
    never waits for telemetry.
    """

    def __init__(self, bus: Bus, *, max_events: int = 100_000, batch_size: int = 500,
                 interval_s: float = 0.05) -> None:
        self.bus = bus
        self.batch_size = batch_size
        self.interval_s = interval_s
        self._queue: deque[InferenceEvent] = deque(maxlen=max_events)
        self._full = asyncio.Event()
        self.dropped = 0
        self.published = 0

    def add(self, event: InferenceEvent) -> None:
        """Queue one event (O(1), never blocks, never raises)."""
        q = self._queue
        if len(q) == q.maxlen:
            self.dropped += 1  # the deque drops the oldest on append
        q.append(event)
        if len(q) >= self.batch_size:
            self._full.set()

    def __len__(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        """Flush periodically until cancelled (the owner calls flush() once more on stop)."""
        while True:
            with contextlib.suppress(TimeoutError):  # the interval elapsed before the buffer filled
                await asyncio.wait_for(self._full.wait(), self.interval_s)
            self._full.clear()
            # Only what is queued now: events that arrive while these publishes await their
            # acks wait for the next tick, so a busy router sends a few large batches per
            # interval instead of a stream of tiny ones (each is a JetStream round trip).
            await self._flush(len(self._queue))

    async def flush(self) -> None:
        """Publish everything queued now: one message per app per batch. Never raises."""
        while self._queue:
            await self._flush(len(self._queue))

    async def _flush(self, n: int) -> None:
        q = self._queue
        while n > 0 and q:
            by_app: dict[str, list[InferenceEvent]] = {}
            take = min(n, len(q), self.batch_size * 8)
            n -= take
            for _ in range(take):
                e = q.popleft()
                by_app.setdefault(e.app, []).append(e)
            batches = [
                events[i : i + self.batch_size]
                for events in by_app.values()
                for i in range(0, len(events), self.batch_size)
            ]
            await asyncio.gather(*(self._publish(b) for b in batches))

    async def _publish(self, events: list[InferenceEvent]) -> None:
        first = events[0]
        headers = {"traceparent": f"00-{first.trace_id}-{first.span_id}-01"} if first.trace_id else {}
        try:
            await self.bus.publish(self.bus.subjects.inference(first.app), events, headers=headers)
            self.published += len(events)
        except Exception as exc:
            self.dropped += len(events)
            log.warning("dropped %d inference events: %r", len(events), exc)
