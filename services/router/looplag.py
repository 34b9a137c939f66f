"""How long the router's event loop has been held up, so a wait it measures on that loop can leave it out.

While one callback runs (a large body's decode, a GC pause, any embedded service's work in `lockgate up`), nothing
else on the loop runs: an upstream's answer waits unread in its socket, and a client's hang-up waits too. A wait
timed with the loop's clock across such a stall takes the stall for the upstream's silence (probe p18 F4b: clients
hanging up during other requests' stalls were recorded `upstream_unanswered` against a 20 ms upstream). A timer
every INTERVAL_S notes how late it ran; the lateness, summed, is the time the loop was held, and `clock` is the
loop's clock less it: the time the loop was free to hear an answer.
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol

# One cheap timer this often, idle or not. A stall is seen from the moment the timer was due, so up to this much of
# each one is taken for ordinary waiting.
INTERVAL_S = 0.1


class _Loop(Protocol):
    def time(self) -> float: ...

    def call_at(self, when: float, callback: object, /) -> asyncio.TimerHandle: ...


class LoopLag:
    """A loop's held-up time, measured from the start: `held_s` (monotonic) and `clock` (the loop's time less it).
    Reading either costs a clock read, not a wake-up; the timer costs one callback every INTERVAL_S."""

    __slots__ = ("_due", "_handle", "_held", "_loop", "worst_s")

    def __init__(self, loop: _Loop) -> None:
        self._loop = loop
        self._held = 0.0
        self.worst_s = 0.0  # the longest single stall seen (for /healthz)
        self._due = loop.time() + INTERVAL_S
        self._handle: asyncio.TimerHandle | None = loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        late = now - self._due
        if late > 0.0:
            self._held += late
            self.worst_s = max(self.worst_s, late)
        self._due = now + INTERVAL_S
        self._handle = self._loop.call_at(self._due, self._tick)

    def held_s(self) -> float:
        """Seconds the loop has been held up since the monitor started, a stall still under way included (read
        just after a stall, before the timer ran, it already counts)."""
        return self._held + max(0.0, self._loop.time() - self._due)

    def clock(self) -> float:
        """The loop's time less the time it was held up: the difference of two readings is how long the loop was
        free to run over that span."""
        now = self._loop.time()
        return now - self._held - max(0.0, now - self._due)

    def close(self) -> None:
        """Stop the timer (the readings stay as they were)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._due = math.inf  # no stall under way from now on


class NoLag:
    """The running loop's own clock, where no monitor runs (an Upstream used alone): every stall counts as waiting."""

    worst_s = 0.0

    def held_s(self) -> float:
        """Nothing measured."""
        return 0.0

    def clock(self) -> float:
        """The running loop's time."""
        return asyncio.get_running_loop().time()

    def close(self) -> None:
        """Nothing to stop."""


NO_LAG = NoLag()
