"""The one retry policy: capped exponential backoff with full jitter.

Used for every retry in lockgate: JetStream publishes, upstream calls, compare-and-set loops,
and the delay of a consumer's nack (`delay(deliveries)`), so they all back off the same way.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger("lockgate.retry")


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all; before try n+1 wait a random time in [0, min(max_s, initial_s * 2**n)]
    (full jitter, so many clients retrying together spread out instead of retrying in step).
    `attempts=None` retries without a limit, until the caller's `give_up()` says stop (a publisher
    whose bounded buffer, not a count of tries, says how long an outage it rides out)."""

    attempts: int | None = 5
    initial_s: float = 0.05
    max_s: float = 2.0
    jitter: bool = True
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number `attempt` (1-based)."""
        cap = min(self.max_s, self.initial_s * 2 ** max(0, attempt - 1))
        return self.rng.uniform(0, cap) if self.jitter else cap

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        retry_on: type[BaseException] | tuple[type[BaseException], ...],
        what: str = "call",
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        give_up: Callable[[], bool] | None = None,
    ) -> T:
        """Await `fn()` until it succeeds, retrying on `retry_on` until the attempts are spent or
        `give_up()` is true after a failure; the last failure is raised."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await fn()
            except retry_on as exc:
                if (self.attempts is not None and attempt >= self.attempts) or (give_up is not None and give_up()):
                    log.warning("%s failed after %d attempts: %r", what, attempt, exc)
                    raise
                wait = self.delay(attempt)
                log.debug("%s failed (attempt %d/%s, %r); retrying in %.3fs", what, attempt, self.attempts or "-",
                          exc, wait)
                await sleep(wait)  # backoff between attempts, not synchronisation
