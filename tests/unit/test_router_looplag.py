"""The router's loop-lag monitor (looplag), on a scripted loop: a stall counts from when its timer was due, a
reading during a stall counts it already, and a wait leaves out the stalls up to the answer's latest bytes, no other."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lockgate.services.router.looplag import INTERVAL_S, LoopLag

pytestmark = pytest.mark.timeout(30)


class Loop:
    """A loop whose time the test sets, running a timer only when told (`run_due`)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, Any]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> Any:
        timer = _Timer(when, callback)
        self.timers.append((when, timer))
        return timer

    def run_due(self) -> None:
        """Run the timers due by now (as a loop that was free would have, late or not)."""
        due = [t for when, t in self.timers if when <= self.now and not t.cancelled]
        self.timers = [(when, t) for when, t in self.timers if when > self.now and not t.cancelled]
        for t in due:
            t.callback()

    def idle_until(self, t: float) -> None:
        """A free loop: every timer runs on time up to `t`."""
        while True:
            pending = sorted(when for when, timer in self.timers if not timer.cancelled)
            if not pending or pending[0] > t:
                break
            self.now = pending[0]
            self.run_due()
        self.now = t


class _Timer:
    def __init__(self, when: float, callback: Any) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


def test_a_free_loop_is_never_held() -> None:
    loop = Loop()
    lag = LoopLag(loop)
    start = lag.mark()
    loop.idle_until(110.0)
    assert lag.held_s() == 0.0 and lag.silent_s(start, lag.held_s()) == pytest.approx(10.0)


def test_a_stall_counts_from_when_the_timer_was_due_even_before_it_ran() -> None:
    loop = Loop()
    lag = LoopLag(loop)
    loop.idle_until(101.0)
    before = lag.mark()
    loop.now += 3.0  # one callback held the loop 3 s: the timer due meanwhile has not run yet
    held = lag.held_s()
    assert 3.0 - INTERVAL_S <= held <= 3.0
    # An answer there now: the loop was free to hear it only until the timer was due.
    assert lag.silent_s(before, lag.held_s()) == pytest.approx(3.0 - held)
    loop.run_due()  # the late timer runs: the same reading, now kept
    assert lag.held_s() == pytest.approx(held) and lag.worst_s == pytest.approx(held)
    loop.idle_until(loop.now + 2.0)
    assert lag.held_s() == pytest.approx(held) and lag.silent_s(before, lag.held_s()) == pytest.approx(5.0 - held)


def test_stalls_add_up_and_a_closed_monitor_keeps_its_readings() -> None:
    loop = Loop()
    lag = LoopLag(loop)
    for _ in range(3):
        loop.idle_until(loop.now + 1.0)
        loop.now += 0.5 + INTERVAL_S  # each stall longer than the timer's interval by 0.5 s at least
        loop.run_due()
    assert lag.held_s() >= 1.5 and lag.worst_s >= 0.5
    held = lag.held_s()
    lag.close()
    loop.now += 10.0  # no timer runs any more, and no stall is taken to be under way
    assert lag.held_s() == held and all(t.cancelled for _, t in loop.timers)


def test_a_wait_leaves_out_the_holds_up_to_the_answers_latest_bytes_and_no_later_one() -> None:
    # Found by a probe (p21 F3): every hold was left out of every wait, so another app key's large bodies made a
    # never-answering upstream's silence look short. A hold can have kept unread only bytes that came during it.
    loop = Loop()
    lag = LoopLag(loop)
    loop.idle_until(101.0)
    since = lag.mark()
    loop.now += 2.0  # a hold of 2 s, the timer due meanwhile not run yet
    assert lag.silent_s(since, -math.inf) == pytest.approx(2.0)  # nothing came: the upstream was silent through it
    heard = lag.held_s()  # bytes of the answer taken in as the hold ended: they may have come as it began
    loop.run_due()
    assert 2.0 - INTERVAL_S <= heard - since.held <= 2.0
    assert lag.silent_s(since, heard) == pytest.approx(2.0 - (heard - since.held))
    loop.idle_until(loop.now + 1.0)
    loop.now += 3.0  # a hold after the latest bytes: nothing came in it to hide
    loop.run_due()
    assert lag.held_s() - since.held >= 5.0 - 2 * INTERVAL_S
    assert lag.silent_s(since, heard) == pytest.approx(6.0 - (heard - since.held))
    later = lag.mark()  # bytes that came before a wait began leave nothing of it out
    loop.now += 2.0
    assert lag.silent_s(later, heard) == pytest.approx(2.0)
