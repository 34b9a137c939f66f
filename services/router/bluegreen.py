"""Blue-green rollouts: a preview reachable only by header (from a tester's key: strategy.HeaderRoute.honours) or
shadow, promoted all at once, with a post-promotion analysis and a window in which the old release swaps back
instantly. Pure, no I/O."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

import msgspec

from lockgate.contracts import GateDecided
from lockgate.services.router import domain
from lockgate.services.router.domain import InvalidRollout, Route
from lockgate.services.router.strategy import BlueGreen

# The end of a promoted route's reason while its post-promotion analysis runs (replaced once it passes).
VERIFYING = "; post-promotion analysis running"


def spec(route: Route) -> BlueGreen | None:
    """The route's blue-green strategy, if it has one."""
    return route.strategy.blue_green if route.strategy is not None else None


def _at(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%H:%M:%S")


def live(route: Route, now: float, interval_s: float, why: str) -> Route:
    """The preview goes live (a decision allows it, or a PATCH swapped it in for a live one): by header only, never
    by weight; its clocks start now."""
    bg = spec(route)
    assert bg is not None and route.canary is not None
    promote_at = promotes_at(bg, now)
    return _bump(route, weight=0.0, phase="progressing", step=0, header_route=bg.preview, promote_at=promote_at,
                 live_at=now, next_step_at=now + interval_s,
                 reason=f"{why}; preview {route.canary.release} live by header {bg.preview.header}: "
                        f"{bg.preview.value} only, from {bg.preview.testers()}; {plan(bg, promote_at)}")


def promotes_at(bg: BlueGreen, live_at: float) -> float:
    """When a preview live since `live_at` promotes itself (0: by hand only)."""
    return live_at + bg.auto_promotion_s if bg.auto_promotion_s else 0.0


def plan(bg: BlueGreen, promote_at: float) -> str:
    """What a route's reason says of its preview's promotion."""
    if not promote_at:
        return "promote by hand (lockgate rollout promote)"
    if bg.pre_promotion_analysis is not None:
        return f"promotes itself from {_at(promote_at)} once its pre-promotion analysis passes"
    return f"promotes itself at {_at(promote_at)}"


def retimed(route: Route, was: float | None) -> Route:
    """A live preview whose `auto_promotion_s` a PATCH changed (from `was`): it promotes itself the new
    delay after it went live (already over: at once), or only by hand once none is set, as the stored strategy says.
    Before (probe p57 F2), the route kept its old time, and a preview patched to promote by hand promoted itself."""
    bg = spec(route)
    assert bg is not None and route.canary is not None
    if route.phase != "progressing" or bg.auto_promotion_s == was:
        return route
    promote_at = promotes_at(bg, route.live_at or route.started_at)  # no live_at: a route stored before it was kept
    return _bump(route, promote_at=promote_at, reason=f"preview {route.canary.release}: {plan(bg, promote_at)}")


def promote(route: Route, why: str, now: float, interval_s: float) -> Route:
    """All traffic to the preview at once (see `promoted`)."""
    return promoted(domain.promote(route, why), now, interval_s)


def promoted(route: Route, now: float, interval_s: float) -> Route:
    """A just-promoted route: the old release stays for the scale-down delay, the post-promotion analysis
    (if any) starts."""
    bg = spec(route)
    if bg is None:
        return msgspec.structs.replace(route, promoted_at=now)
    old = route.previous.release if route.previous else "the old release"
    verifying = bg.post_promotion_analysis is not None
    # Under post-promotion analysis the release is not known-good yet (progress.on_measurement adds it).
    good = domain.forget(route.good, route.stable.release) if verifying else route.good
    delay = bg.scale_down_delay_s
    window = f"; {old} kept for instant rollback for {delay:g} s" if delay else ""
    return msgspec.structs.replace(
        route, promoted_at=now, scale_down_at=now + delay if delay else 0.0, verifying=verifying, analysis=None,
        good=good,
        next_step_at=now + interval_s if verifying else 0.0,
        reason=route.reason + window + (VERIFYING if verifying else ""))


def auto_promotion_due(route: Route, now: float) -> bool:
    """True when the preview may promote itself by time (its pre-promotion analysis is checked by the caller)."""
    return spec(route) is not None and route.phase == "progressing" and 0 < route.promote_at <= now


def swappable(route: Route) -> bool:
    """Whether the promoted release's predecessor swaps back at once: within the scale-down window, and while the
    post-promotion analysis runs (a failing one rolls back to it, whatever `scale_down_delay_s`). Before, probe p83
    F3, with `scale_down_delay_s: 0` an operator's abort and undo were refused while the analysis could roll back."""
    return route.phase == "promoted" and bool(route.scale_down_at or route.verifying)


def _swappable(route: Route) -> None:
    if route.phase != "promoted" or route.previous is None:
        raise InvalidRollout(f"deployment {route.deployment!r} has no promoted release to undo")
    if spec(route) is not None and not swappable(route):
        old = route.previous.release
        raise InvalidRollout(f"the old release {old!r} of {route.deployment!r} is scaled down (scale_down_delay_s is "
                             f"over): put it back by name as a known-good release (lockgate rollout undo "
                             f"{route.deployment} --to {old}), or start a new rollout")


def undo(route: Route, decision: GateDecided | None, actor: str) -> Route:
    """An operator's undo: the previous release swapped back in (instant: it never stopped being routable), exactly
    that one and only if its current decision (`decision`, verified, None if none) allows it (domain.undo)."""
    _swappable(route)
    return domain.undo(route, decision, actor)


def abort_promotion(route: Route, actor: str,
                    decisions: Mapping[str, GateDecided | None] = domain.NO_DECISIONS) -> Route:
    """An operator's abort within the scale-down window: the promoted release stops, the last known-good release
    takes all traffic back as a rollback does (only one a verified decision in `decisions` allows now: else it keeps
    serving and says so). Always allowed: it takes off the release the operator stops, whatever the previous one's
    gate says. The stopped release leaves the known-good history too (an undo keeps it), so no later rollback puts
    it back."""
    _swappable(route)
    return domain.rollback(route, f"aborted by {actor or 'operator'}", decision_id=route.decision_id, failed=True,
                           decisions=decisions)


def scale_down_due(route: Route, now: float) -> bool:
    """True when the scale-down window is over (never while the post-promotion analysis still runs)."""
    return route.phase == "promoted" and 0 < route.scale_down_at <= now and not route.verifying


def scale_down(route: Route) -> Route:
    """The old release leaves the route's instant-rollback window."""
    old = route.previous.release if route.previous else "the old release"
    return _bump(route, scale_down_at=0.0, reason=f"{route.reason}; {old} scaled down")


def _bump(route: Route, **changes: object) -> Route:
    return msgspec.structs.replace(route, version=route.version + 1, **changes)
