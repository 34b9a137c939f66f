"""Canary step kinds run in order: set_weight, pause (timed or until approved), set_header_route. Pure, no I/O.

`route.cursor` is the next step to run. Header routes take effect at once and the program goes
on; a pause holds the weight (a timed one ends by itself, an untimed one when an operator
approves it with `rollout approve`); a weight step moves traffic and waits one interval (or its
analysis). Past the last step the canary is promoted, as after the last weight of plain steps.
"""

from __future__ import annotations

import msgspec

from lockgate.services.router import domain
from lockgate.services.router.domain import Route
from lockgate.services.router.strategy import Step


def programmed(route: Route) -> bool:
    """True when the route's strategy has step kinds (pauses, header routes) the program runs."""
    return route.strategy is not None and route.strategy.kinds()


def run(route: Route, steps: list[Step], interval_s: float, now: float, why: str = "") -> Route:
    """Run steps from the cursor until one holds (a weight or a pause); promote past the last one."""
    header = route.header_route
    notes = [why] if why else []
    n = len(steps)
    i = route.cursor
    common = {"paused": False, "step_pause": False, "resume_at": 0.0}
    while i < n:
        s = steps[i]
        i += 1
        if s.set_header_route is not None:
            header = s.set_header_route
            notes.append(f"step {i}/{n}: requests with {header.header}: {header.value} go to the canary")
            continue
        if s.pause is not None:
            d = s.pause.duration_s
            hold = f"paused {d:g} s" if d else "paused until approved (lockgate rollout approve)"
            notes.append(f"step {i}/{n}: {hold} at {route.weight:g}%")
            return _bump(route, cursor=i, step=i, header_route=header, paused=True, step_pause=True,
                         resume_at=_pause_end(s, now), next_step_at=now + interval_s, reason="; ".join(notes))
        assert s.set_weight is not None
        notes.append(f"step {i}/{n}: canary at {s.set_weight:g}%")
        return _bump(route, **common, cursor=i, step=i, header_route=header, weight=s.set_weight,
                     next_step_at=now + interval_s, reason="; ".join(notes))
    done = msgspec.structs.replace(route, **common, cursor=n)
    return domain.promote(done, "; ".join([*notes, f"all {n} steps done at {route.weight:g}%"]))


def restarted(route: Route, steps: list[Step], interval_s: float, now: float) -> Route:
    """The step the route holds at, begun again at `now` (a new canary took its place): its interval, and a timed
    pause step's duration, count from now, as `run` sets them when the step begins."""
    at = steps[route.cursor - 1] if route.step_pause and 0 < route.cursor <= len(steps) else None
    return msgspec.structs.replace(route, next_step_at=now + interval_s,
                                   resume_at=_pause_end(at, now) if at is not None else route.resume_at)


def _pause_end(step: Step, now: float) -> float:
    """When a pause step begun at `now` ends by itself (0: when approved)."""
    d = step.pause.duration_s if step.pause is not None else 0.0
    return now + d if d else 0.0


def pause_over(route: Route, now: float) -> bool:
    """True when a timed pause step of a live rollout has run its course (one waiting for a decision runs no step)."""
    return route.phase == "progressing" and route.paused and route.step_pause and 0 < route.resume_at <= now


def _bump(route: Route, **changes: object) -> Route:
    return msgspec.structs.replace(route, version=route.version + 1, **changes)
