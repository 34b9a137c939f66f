"""How long the router's event loop has been held up, so a wait it measures on that loop can leave it out.

While one callback runs (a large body's decode, a GC pause, any embedded service's work in `lockgate up`), nothing
else on the loop runs: an upstream's answer waits unread in its socket, and a client's hang-up waits too. A wait
timed with the loop's clock across such a stall takes the stall for the upstream's silence (probe p18 F4b: clients
hanging up during other requests' stalls were recorded `upstream_unanswered` against a 20 ms upstream). A timer
every INTERVAL_S notes how late it ran; the lateness, summed, is the time the loop was held (`held_s`).

But a hold hides only an answer that came during it: where nothing of the answer came, the upstream was silent
through the hold as through the rest (probe p21 F3: leaving every hold out of every wait, another app key's large
bodies made a never-answering release's hang-ups just past the bound the clients' own). So `silent_s` leaves out of
a wait only the holds up to the answer's latest bytes (h1.Heard): after them nothing came that a hold could hide.
"""

from __future__ import annotations

import asyncio
import math
from typing import NamedTuple, Protocol

# One cheap timer this often, idle or not. A stall is seen from the moment the timer was due, so up to this much of
# each one is taken for ordinary waiting.
INTERVAL_S = 0.1


class Mark(NamedTuple):
    """When a wait began: the loop's time (`at`) and how long the loop had been held by then (`held`)."""

    at: float
    held: float


def _silent_s(since: Mark, now: float, heard: float) -> float:
    # `heard`: held_s when bytes of the answer last came in (held_s never decreases, so bytes that came before the
    # wait began leave nothing out).
    return now - since.at - max(0.0, heard - since.held)


class _Loop(Protocol):
    def time(self) -> float: ...

    def call_at(self, when: float, callback: object, /) -> asyncio.TimerHandle: ...


class LoopLag:
    """A loop's held-up time, measured from the start (`held_s`, monotonic), and the waits timed with it. A reading
    costs a clock read, not a wake-up; the timer costs one callback every INTERVAL_S."""

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

    def mark(self) -> Mark:
        """Now, as a wait's start (one clock read)."""
        now = self._loop.time()
        return Mark(now, self._held + max(0.0, now - self._due))

    def silent_s(self, since: Mark, heard: float) -> float:
        """How long the upstream has kept a wait begun at `since` without an answer: the loop's time since then, less
        the holds up to `heard` (held_s when bytes of the answer last reached the router; -inf: none came). A hold
        can have kept those bytes unread, so they may have come as it began; after them nothing came, and a hold
        then hid nothing. Pass held_s() when the answer was there (unread) now: every hold is left out."""
        return _silent_s(since, self._loop.time(), heard)

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

    def mark(self) -> Mark:
        """Now on the running loop's clock."""
        return Mark(asyncio.get_running_loop().time(), 0.0)

    def silent_s(self, since: Mark, heard: float) -> float:
        """The running loop's time since `since`."""
        return _silent_s(since, asyncio.get_running_loop().time(), heard)

    def close(self) -> None:
        """Nothing to stop."""


NO_LAG = NoLag()
