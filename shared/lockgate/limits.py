"""What an inference message may carry, beyond its contract: how many events, and times near now.

The contract says what an event is; these limits say what a running lockgate accepts, so one odd
producer cannot turn storage against everyone (an event dated 1900 or 2299 opens a ClickHouse
partition of its own; 15,000 events in one message make one insert the size of many), and an event
travels only on its own tenant's and app's subject. Consumers
check them at their edge (`consume(..., limits=...)`): the events that break a limit are
dead-lettered with the reason, the others go on. The SDK checks the same before an event leaves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any

from lockgate.contracts import InferenceEvent

# Reading the clock and building the window cost about 6 µs, as much as encoding the event: per emit
# that is a fifth of the SDK's time. So `event_error` builds it at most once per _REFRESH_S; an
# event outside that narrowed window is judged by the exact check.
_REFRESH_S = 1.0
_time, _sender = attrgetter("time"), attrgetter("tenant", "app")


def _within(times: list[datetime], earliest: datetime, latest: datetime) -> bool:
    """True when every time lies in [earliest, latest]; False if any does not, or has no UTC offset."""
    try:
        return bool(times) and min(times) >= earliest and max(times) <= latest
    except TypeError:  # a naive time among them cannot be compared: judged one by one by `_time_error`
        return False


def duration(seconds: float) -> str:
    """`seconds` as people read it: "30 days", "1 hour", "90 minutes", "45 seconds" (before, `2.592e+06s`)."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds:,.10g} second{'s' if seconds != 1 else ''}"


@dataclass(frozen=True)
class EventLimits:
    """Limits on inference messages; the defaults suit producers that send events as they happen."""

    max_events: int = 5000  # per message (the SDK sends at most 500; the stack's producers 500 or this: per_message)
    past_s: float = 30 * 86400.0  # how old an event's time may be (backfills older than this are refused)
    future_s: float = 3600.0  # how far ahead of this clock an event's time may be (clock skew)

    @classmethod
    def from_settings(cls, settings: Any) -> EventLimits:
        return cls(max_events=settings.max_events_per_message, past_s=settings.event_time_past_s,
                   future_s=settings.event_time_future_s)

    def time_error(self, event: InferenceEvent, now: datetime) -> str:
        """Why the event's time is refused ("" when it is accepted)."""
        return self._time_error(event, now, now - timedelta(seconds=self.past_s),
                                now + timedelta(seconds=self.future_s))

    def event_error(self, event: InferenceEvent) -> str:
        """`time_error` against this clock, for one event at a time (the SDK checks every emit)."""
        _, earliest, latest = self._inner_window()
        try:
            inside = earliest <= event.time <= latest  # the usual case: no clock read, no datetime arithmetic
        except TypeError:  # a time without a UTC offset: the exact check says why
            inside = False
        return "" if inside else self.time_error(event, datetime.now(UTC))

    def _inner_window(self) -> tuple[float, datetime, datetime]:
        """(refresh by, earliest, latest): the window, built at most once per _REFRESH_S and narrowed by that
        period, so that an event inside it is inside the exact window whatever the clock read since."""
        tick = time.monotonic()
        cached: tuple[float, datetime, datetime] | None = self.__dict__.get("_window")
        if cached is None or tick >= cached[0]:
            now = datetime.now(UTC)
            cached = (tick + _REFRESH_S, now - timedelta(seconds=self.past_s - _REFRESH_S),
                      now + timedelta(seconds=self.future_s))
            # Kept on the instance, not in a table keyed by it: hashing a dataclass (its fields, in
            # Python) cost more than the comparison it guards. Not a field: equality and hash ignore it.
            object.__setattr__(self, "_window", cached)
        return cached

    def _time_error(self, event: InferenceEvent, now: datetime, earliest: datetime, latest: datetime) -> str:
        if not isinstance(event.time, datetime) or event.time.utcoffset() is None:
            # JSON without an offset ("2026-12-03T12:00:00") decodes to a naive time: when it happened is
            # unknown, and comparing it with now would raise, leaving its message unsettled.
            return f"time {event.time!s} has no UTC offset (add Z or +00:00)"
        if event.time < earliest:
            return (f"time {event.time.isoformat()} is more than {duration(self.past_s)} before now "
                    f"({now.isoformat(timespec='seconds')})")
        if event.time > latest:
            return (f"time {event.time.isoformat()} is more than {duration(self.future_s)} after now "
                    f"({now.isoformat(timespec='seconds')})")
        return ""

    def split(self, value: InferenceEvent | Sequence[InferenceEvent], now: datetime | None = None, *,
              sender: tuple[str, str] | None = None) -> tuple[list[InferenceEvent], list[tuple[int, str]]]:
        """(accepted events, [(index, reason)] of the refused ones) of one message. With `sender` (the
        (tenant, app) of the subject it came on: `Subjects.sender`), an event of another tenant or app is
        refused: a per-application NATS user may publish on its own subject only, so the subject, not
        the event, says whose it is."""
        lone = not isinstance(value, Sequence)  # one event sent as an object: its path is `$`, not `$[0]`
        events = [value] if lone else list(value)
        if len(events) > self.max_events:
            return [], [(-1, f"{len(events)} events in one message; at most {self.max_events} are accepted")]
        now = now or datetime.now(UTC)
        earliest, latest = now - timedelta(seconds=self.past_s), now + timedelta(seconds=self.future_s)
        if _within(list(map(_time, events)), earliest, latest) and (  # the usual case: passes in C
                sender is None or set(map(_sender, events)) == {sender}):
            return events, []
        kept: list[InferenceEvent] = []
        refused: list[tuple[int, str]] = []
        for i, event in enumerate(events):
            at = "$" if lone else f"$[{i}]"
            if sender is not None and (event.tenant, event.app) != sender:
                refused.append((i, f"tenant {event.tenant!r} and app {event.app!r} are not those of the subject "
                                   f"it came on (tenant {sender[0]!r}, app {sender[1]!r}) - at `{at}`"))
                continue
            reason = self._time_error(event, now, earliest, latest)
            if reason:
                refused.append((i, f"{reason} - at `{at}.time`"))
            else:
                kept.append(event)
        return kept, refused
