"""Canary step kinds run in order: set_weight, pause (timed or until approved), set_header_route. Pure, no I/O.

`route.cursor` is the next step to run. Header routes take effect at once and the program goes
on; a pause holds the weight (a timed one ends by itself, or with an analysis on the first passing look
once over, `progress.holds`; an untimed one when an operator approves it with `rollout approve`); a weight
step moves traffic and waits one interval (or its analysis). Past the last step the canary is promoted, as
after the last weight of plain steps.
"""

from __future__ import annotations

import msgspec

from lockgate.services.router import domain
from lockgate.services.router.domain import Route
from lockgate.services.router.strategy import Pause, Step


def programmed(route: Route) -> bool:
    """True when the route's strategy has step kinds (pauses, header routes) the program runs."""
    return route.strategy is not None and route.strategy.kinds()


def run(route: Route, steps: list[Step], interval_s: float, now: float, why: str = "") -> Route:
    """Run steps from the cursor until one holds (a weight or a pause); promote past the last one."""
    header = route.header_route
    notes = [why] if why else []
    n = len(steps)
    i = route.cursor
    common = {"paused": False, "step_pause": False, "step_paused_at": 0.0, "resume_at": 0.0}
    while i < n:
        s = steps[i]
        i += 1
        if s.set_header_route is not None:
            header = s.set_header_route
            notes.append(f"step {i}/{n}: requests with {header.header}: {header.value} go to the canary")
            continue
        if s.pause is not None:
            notes.append(f"step {i}/{n}: {_holds(s.pause)} at {route.weight:g}%")
            return _bump(route, cursor=i, step=i, header_route=header, paused=True, step_pause=True,
                         step_paused_at=now, resume_at=_pause_end(s.pause, now), next_step_at=now + interval_s,
                         reason="; ".join(notes))
        assert s.set_weight is not None
        notes.append(f"step {i}/{n}: canary at {s.set_weight:g}%")
        return _bump(route, **common, cursor=i, step=i, header_route=header, weight=s.set_weight,
                     next_step_at=now + interval_s, reason="; ".join(notes))
    done = msgspec.structs.replace(route, **common, cursor=n)
    return domain.promote(done, "; ".join([*notes, f"all {n} steps done at {route.weight:g}%"]))


def restarted(route: Route, steps: list[Step], interval_s: float, now: float) -> Route:
    """The step the route holds at, begun again at `now` (a new canary took its place): its interval, and a timed
    pause step's duration, count from now, as `run` sets them when the step begins."""
    if not route.step_pause:
        return msgspec.structs.replace(route, next_step_at=now + interval_s)
    return msgspec.structs.replace(route, next_step_at=now + interval_s, step_paused_at=now,
                                   resume_at=_pause_end(held(route, steps), now))


def retimed(route: Route, was: list[Step], steps: list[Step], now: float) -> Route:
    """A route held at a pause step whose steps a PATCH replaced (`was`: the old ones): the pause now at its place
    ends its new `duration_s` after the step began (already over: at the next tick), or waits for approval without
    one. Where the new steps name no pause (the step there is a weight or header route now, or there is none), it
    waits for approval too: a PATCH keeps the rollout's weight and position, and which step a changed list means to
    run next is the operator's to say, so only an approval moves the traffic on. Before (probe p58 F1), the route
    kept the old pause's end: a pause patched to wait for approval ended by itself at the old time and the canary
    went on to 100% unapproved, and a shorter or longer pause still waited the old time."""
    pause = held(route, steps)
    if not route.step_pause or pause == held(route, was):
        return route
    began = route.step_paused_at or now  # a route stored before it was kept: the pause counts from the PATCH
    where = f"step {route.step}/{len(steps)}"
    if pause is None:
        return _bump(route, resume_at=0.0, reason=f"{where} is no pause now: held at {route.weight:g}% until "
                                                  "approved (lockgate rollout approve)")
    return _bump(route, step_paused_at=began, resume_at=_pause_end(pause, began),
                 reason=f"{where}: {_holds(pause)} at {route.weight:g}%")


def held(route: Route, steps: list[Step]) -> Pause | None:
    """The pause that the step the route holds at (`step`, 1-based, the one an approval names) has in `steps`
    (None: none, or the route holds at no pause step)."""
    at = route.step - 1
    return steps[at].pause if route.step_pause and 0 <= at < len(steps) else None


def _holds(pause: Pause) -> str:
    """What a route's reason says a pause step holds it for."""
    d = pause.duration_s
    return f"paused {d:g} s" if d else "paused until approved (lockgate rollout approve)"


def _pause_end(pause: Pause | None, began: float) -> float:
    """When a pause begun at `began` ends by itself (0: when approved)."""
    d = pause.duration_s if pause is not None else 0.0
    return began + d if d else 0.0


def pause_over(route: Route, now: float) -> bool:
    """True when a timed pause step of a live rollout has run its course (one waiting for a decision runs no step)."""
    return route.phase == "progressing" and route.paused and route.step_pause and 0 < route.resume_at <= now


def _bump(route: Route, **changes: object) -> Route:
    return msgspec.structs.replace(route, version=route.version + 1, **changes)
