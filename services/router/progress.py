"""Closed-loop rollout transitions: analysis verdicts, drift reports and operator actions. Pure, no I/O.

Each function takes a route and returns the changed route (None when nothing changes), in the
style of `domain`; `Rollouts` applies the result with compare-and-set so replicas agree.
"""

from __future__ import annotations

import msgspec

from lockgate.contracts import DriftReport, FeatureDrift
from lockgate.services.router import domain
from lockgate.services.router.analysis import Measurement, describe
from lockgate.services.router.domain import InvalidRollout, NotAdmitted, Route
from lockgate.services.router.strategy import AnalysisStatus


def steps_of(route: Route, default: tuple[float, ...]) -> tuple[float, ...]:
    """The deployment's own steps if its strategy names them, else the router's."""
    if route.strategy is not None and route.strategy.steps:
        return domain.normalize_steps(route.strategy.steps)
    return default


def interval_of(route: Route, default: float) -> float:
    """The deployment's own step interval if its strategy names one, else the router's."""
    if route.strategy is not None and route.strategy.interval_s:
        return route.strategy.interval_s
    return default


def analysed(route: Route) -> bool:
    """True while a canary with an analysis spec is live (it is measured every interval)."""
    return (route.strategy is not None and route.strategy.analysis is not None and route.canary is not None
            and route.phase == "progressing")


def due_at(route: Route) -> float | None:
    """When the route next needs the timer: a paused route is only measured, never stepped."""
    if route.phase != "progressing" or (route.paused and not analysed(route)):
        return None
    return route.next_step_at


def _bump(route: Route, **changes: object) -> Route:
    return msgspec.structs.replace(route, version=route.version + 1, **changes)


def _where(route: Route) -> str:
    return f"step {route.step} ({route.weight:g}%)"


def on_measurement(route: Route, m: Measurement, steps: tuple[float, ...], interval_s: float,
                   now: float) -> Route | None:
    """Apply one analysis measurement: abort on failures past the limit, pause on too many
    inconclusive ones, advance (or promote after 100%) after `count` successes in the step."""
    if not analysed(route) or route.strategy is None or route.strategy.analysis is None:
        return None
    spec = route.strategy.analysis
    st = route.analysis or AnalysisStatus()
    conclusive = m.verdict != "WAITING"
    st = msgspec.structs.replace(st, look=st.look + conclusive, last=m, at=now)
    nxt = now + interval_s
    culprit = m.failing()
    if m.verdict == "FAILED":
        st = msgspec.structs.replace(st, failures=st.failures + 1)
        if st.failures > spec.failure_limit:
            why = f"analysis failed at {_where(route)}: {describe(culprit) if culprit else 'failed'}"
            return msgspec.structs.replace(domain.abort(route, why), analysis=st, paused=False)
        return _bump(route, analysis=st, next_step_at=nxt)
    if m.verdict == "INCONCLUSIVE":
        st = msgspec.structs.replace(st, inconclusives=st.inconclusives + 1)
        if st.inconclusives > spec.inconclusive_limit and not route.paused:
            why = describe(culprit) if culprit else "inconclusive"
            return _bump(route, analysis=st, paused=True, next_step_at=nxt,
                         reason=f"paused at {_where(route)}: analysis inconclusive {st.inconclusives} times "
                                f"({why}); resume or abort")
        return _bump(route, analysis=st, next_step_at=nxt)
    if m.verdict == "WAITING" or route.paused:
        return _bump(route, analysis=st, next_step_at=nxt)
    st = msgspec.structs.replace(st, successes=st.successes + 1)
    if st.successes < spec.count:
        return _bump(route, analysis=st, next_step_at=nxt)
    st = msgspec.structs.replace(st, successes=0)
    following = next((i for i, s in enumerate(steps) if s > route.weight), None)
    if following is None:
        return msgspec.structs.replace(domain.promote(route, f"analysis passed at {route.weight:g}%"), analysis=st)
    return _bump(route, analysis=st, weight=steps[following], step=following + 1, next_step_at=nxt,
                 reason=f"analysis passed at {_where(route)}; step {following + 1}/{len(steps)}: "
                        f"canary at {steps[following]:g}%")


# Features where less is better: their drift downwards is an improvement, not a reason to abort.
_LOWER_IS_BETTER = frozenset({"latency_ms", "ttft_ms", "cost_usd"})


def _improved(f: FeatureDrift) -> bool:
    return f.feature in _LOWER_IS_BETTER and f.current_mean < f.reference_mean


def on_drift(route: Route, report: DriftReport) -> Route | None:
    """A DRIFT report covering a live canary's traffic aborts it, naming the drifting features.

    The drift monitor watches a deployment as a whole, so during a rollout its current window holds
    the canary's traffic: drift that appears then is taken as the canary's (fail-safe). Only drift that
    can harm counts: latency (or cost) that fell is an improvement, so it alone never aborts.
    """
    if (route.canary is None or not report.drifted or route.phase in ("promoted", "aborted") or route.weight <= 0
            or report.window_end.timestamp() < route.started_at):
        return None
    harmful = [f for f in report.features if f.drifted and not _improved(f)]
    if report.features and not harmful:  # e.g. a faster canary: drift, but no harm to roll back for
        return None
    features = ", ".join(f"{f.feature} (PSI {f.psi:.3g}, mean {f.reference_mean:.4g} -> {f.current_mean:.4g})"
                         for f in harmful) or "unnamed feature"
    return msgspec.structs.replace(
        domain.abort(route, f"drift report {report.id} at {_where(route)}: DRIFT in {features}"), paused=False)


def _live(route: Route) -> None:
    if route.canary is None:
        raise InvalidRollout(f"deployment {route.deployment!r} has no canary")
    if route.phase in ("promoted", "aborted"):
        raise InvalidRollout(f"canary of {route.deployment!r} is already {route.phase}")


def pause(route: Route, actor: str, why: str = "") -> Route:
    """Hold the canary at its weight: no step advances (analysis still aborts a failing canary)."""
    _live(route)
    if route.paused:
        raise InvalidRollout(f"canary of {route.deployment!r} is already paused")
    return _bump(route, paused=True, reason=f"paused at {_where(route)} by {actor}" + (f": {why}" if why else ""))


def resume(route: Route, actor: str, interval_s: float, now: float) -> Route:
    """Continue a paused canary: the next step (or analysis look) is one interval away."""
    _live(route)
    if not route.paused:
        raise InvalidRollout(f"canary of {route.deployment!r} is not paused")
    st = route.analysis and msgspec.structs.replace(route.analysis, inconclusives=0)
    return _bump(route, paused=False, analysis=st, next_step_at=now + interval_s if route.phase == "progressing"
                 else route.next_step_at, reason=f"resumed at {_where(route)} by {actor}")


def set_weight(route: Route, weight: float, actor: str) -> Route:
    """Change only the canary's weight; a canary that no decision allows (and no override covers) gets none."""
    _live(route)
    assert route.canary is not None
    covered = route.override is not None and route.override.release == route.canary.release
    if weight > 0 and not route.admitted and not covered:
        raise NotAdmitted(f"refused: canary {route.canary.release!r} has no verified gate decision allowing it, "
                          "so it cannot get weight; an admin may start it with break_glass")
    return _bump(route, weight=float(weight),
                 reason=f"weight set to {weight:g}% (was {route.weight:g}%) by {actor}")
