"""Progress ticks of a running eval on core NATS, throttled to about ten a second."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import msgspec

from lockgate.contracts.evals import EvalProgress

log = logging.getLogger("lockgate.evaluator.progress")
MIN_INTERVAL_S = 0.1


class Ticker:
    """Counts finished cases and publishes EvalProgress at most every MIN_INTERVAL_S (and at the end)."""

    def __init__(self, publish: Callable[[bytes], Awaitable[None]], run_id: str, total: int,
                 done: int = 0, errors: int = 0) -> None:
        self.publish = publish
        self.run_id = run_id
        self.total = total
        self.done = done
        self.errors = errors
        self._last = 0.0

    async def step(self, error: bool) -> None:
        """One more case finished."""
        self.done += 1
        self.errors += error
        now = time.monotonic()
        if now - self._last >= MIN_INTERVAL_S or self.done >= self.total:
            self._last = now
            await self.send()

    async def send(self) -> None:
        """Publish the current counts; progress is advisory, so failures are only logged."""
        tick = EvalProgress(run_id=self.run_id, done=self.done, total=self.total, errors=self.errors)
        try:
            await self.publish(msgspec.json.encode(tick))
        except Exception as exc:
            log.debug("progress publish failed: %r", exc)
