"""A token bucket limiting upstream calls per second."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """`rate` calls a second on average, bursts up to `burst`; acquire() waits for a token."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else rate)
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Take one token, waiting as long as the rate requires."""
        async with self._lock:  # FIFO: waiters are served in arrival order
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens < 1:
                wait = (1 - self.tokens) / self.rate
                await asyncio.sleep(wait)  # pacing, not synchronisation
                self.tokens = 1.0
                self.updated = time.monotonic()
            self.tokens -= 1
