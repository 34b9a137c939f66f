"""Closed-loop rollout transitions: analysis verdicts, drift reports and operator actions. Pure, no I/O.

Each function takes a route and returns the changed route (None when nothing changes), in the
style of `domain`; `Rollouts` applies the result with compare-and-set so replicas agree.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping

import msgspec

from lockgate import driftharm
from lockgate.contracts import DriftReport, GateDecided
from lockgate.contracts.drift import Comparison
from lockgate.services.router import bluegreen, domain, program
from lockgate.services.router.analysis import AnalysisSpec, Measurement, MetricResult, describe
from lockgate.services.router.domain import InvalidRollout, NotAdmitted, Route
from lockgate.services.router.strategy import AnalysisStatus, Strategy


def steps_of(route: Route, default: tuple[float, ...]) -> tuple[float, ...]:
    """The deployment's own weights if its strategy names them, else the router's."""
    if route.strategy is not None and route.strategy.weights():
        return domain.normalize_steps(route.strategy.weights())
    return default


def interval_of(route: Route, default: float) -> float:
    """The deployment's own step interval if its strategy names one, else the router's."""
    if route.strategy is not None and route.strategy.interval_s:
        return route.strategy.interval_s
    return default


def spec_of(route: Route) -> AnalysisSpec | None:
    """The analysis that judges the route now: the canary's, blue-green's pre-promotion one while the
    preview is live, its post-promotion one while verifying."""
    s = route.strategy
    if s is None or route.canary is None:
        return None
    bg = s.blue_green
    if route.phase == "progressing" or held(route):
        return bg.pre_promotion_analysis if bg is not None else s.analysis
    if route.phase == "promoted" and route.verifying and bg is not None:
        return bg.post_promotion_analysis
    return None


def held(route: Route) -> bool:
    """A canary a break-glass override holds at its weight: no decision admits it, so no step moves it, but the
    analysis its strategy asks for still judges it (a failure aborts it; a pass moves nothing, since a promotion
    needs a statement of its own). The override skips the gate, never the live evidence."""
    return route.phase == "idle" and route.override is not None and route.canary is not None and route.weight > 0


def analysed(route: Route) -> bool:
    """True while a rollout with an analysis spec is live (it is measured every interval)."""
    return spec_of(route) is not None


def collecting(route: Route) -> bool:
    """True while the route's evidence is worth keeping: under analysis, or a blue-green preview whose
    post-promotion analysis will compare the new release with the old one's traffic before promotion."""
    bg = bluegreen.spec(route)
    return analysed(route) or (bg is not None and bg.post_promotion_analysis is not None
                               and route.phase == "progressing")


# How far back a router that starts mid-rollout reads drift reports at most. The monitor reports every
# `drift_window_size` events per deployment (500: one every 8 minutes at 1 request/s), so this covers a quiet
# deployment's last report; a busy one reports often (its next report comes soon anyway), and the read, one
# message get per report (about 0.5 ms), holds the start: 2,000 reports took about 1 s on a 2-vCPU machine.
DRIFT_REPLAY_MAX_S = 900.0


def drift_replay(routes: Iterable[Route], now: float) -> dict[str, float]:
    """The deployments whose rollouts are under analysis, each with the time (unix seconds) from which its drift
    reports may be evidence: its rollout's start (an analysis reads no report of a window that ended before
    it), at most `DRIFT_REPLAY_MAX_S` before `now`."""
    return {r.deployment: max(r.started_at, now - DRIFT_REPLAY_MAX_S) for r in routes if collecting(r)}


# How far back a router that starts mid-rollout reads the served inference events at most (before the promotion,
# for a release under post-promotion analysis, whose baseline is the old release's traffic before it). The read is
# one message get per published batch (about 0.5 ms; the routers publish at most about 20 batches a second each),
# so an hour of a busy deployment on one replica holds the start for about half a minute.
SERVED_REPLAY_MAX_S = 3600.0


# A replica whose bus connection came back reads the served events back from this long before it was last known
# connected: events are stamped by the clock of the router that served them (replicas' clocks may be up to
# clock.MAX_SKEW_S apart, and the stream's by the server's) and published by its outbox a little later (batched).
# Read twice, an event counts once (handlers.Seen), as long as the replica has not taken thousands of batches since.
RECONNECT_REPLAY_MARGIN_S = 10.0


def served_replay(routes: Iterable[Route], now: float, after: float | None = None) -> float | None:
    """The time (unix seconds) from which the served inference events stored may be evidence for a rollout whose
    evidence is kept (`collecting`) or whose shadow copies are compared (`shadowing`): the earliest rollout start,
    at most `SERVED_REPLAY_MAX_S` before now (before the promotion, for a release under post-promotion analysis),
    and not before `after` (a replica back on the bus: what it missed while cut off); None when no rollout keeps
    evidence."""
    starts = [max(r.started_at, (r.promoted_at if r.phase == "promoted" else now) - SERVED_REPLAY_MAX_S,
                  after or 0.0)
              for r in routes if collecting(r) or shadowing(r)]
    return min(starts) if starts else None


def served_replayed(routes: Iterable[Route]) -> list[str]:
    """The deployments whose served events `served_replay` reads back: no other's are read (probe p36 F1)."""
    return sorted(r.deployment for r in routes if collecting(r) or shadowing(r))


def shadowing(route: Route) -> bool:
    """True while the rollout mirrors traffic to its candidate: a shadow strategy, admitted and live."""
    return (route.strategy is not None and route.strategy.shadow is not None and route.canary is not None
            and route.phase == "progressing")


class Tripped(msgspec.Struct, frozen=True, kw_only=True):
    """The canary's endpoint breaker seen open (`Rollouts.tripped`): since when (unix seconds), and how many of the
    canary's requests it diverted to stable meanwhile, on every replica (their events say so)."""

    since: float
    diverted: int = 0


# How the note a breaker's hold adds to a route's reason begins and goes on (`tripped_note`).
_HELD = "; held at "
_BREAKER_OPEN = ": canary's endpoint breaker open since "


def tripped_note(route: Route, tripped: Tripped) -> str:
    """What a route's reason says while an open breaker of its canary holds its step or promotion."""
    since = dt.datetime.fromtimestamp(tripped.since, dt.UTC).strftime("%H:%M:%S")
    what = "request" if tripped.diverted == 1 else "requests"
    return f"{_HELD}{_where(route)}{_BREAKER_OPEN}{since}, diverted {tripped.diverted} {what} to stable"


def breaker_held(route: Route) -> bool:
    """True while the route's reason says an open breaker of its canary holds it (the change into it is announced,
    the holds that follow are not)."""
    return _BREAKER_OPEN in route.reason


def _untripped(route: Route) -> Route:
    """The route with its reason as it was before an open breaker held it (without `tripped_note`)."""
    at = route.reason.find(_BREAKER_OPEN)
    if at < 0:
        return route
    start = route.reason.rfind(_HELD, 0, at)
    return msgspec.structs.replace(route, reason=route.reason[:start if start >= 0 else at])


def _hold_tripped(route: Route, tripped: Tripped, **later: float) -> Route:
    """The route held at its step by its canary's open breaker, its next step (`later`: the time field that brings
    it) put off until then."""
    base = _untripped(route)
    return _bump(base, **later, reason=base.reason + tripped_note(base, tripped))


def due_at(route: Route) -> float | None:
    """When the route next needs the timer: a paused route is only measured (or its timed pause ends),
    never stepped; a promoted blue-green route is verified and scaled down on time."""
    times: list[float] = []
    if route.phase == "promoted":
        if route.verifying:  # the scale-down waits for the post-promotion analysis
            times.append(route.next_step_at)
        elif route.scale_down_at:
            times.append(route.scale_down_at)
        return min(times) if times else None
    if held(route):  # looked at every interval, from its start (the first look applies the initial delay)
        return (route.next_step_at or route.started_at) if analysed(route) else None
    if route.phase != "progressing":
        return None
    s = route.strategy
    if analysed(route):
        times.append(route.next_step_at)
    elif s is not None and s.blue_green is not None:
        times.append(route.promote_at)  # without a pre-promotion analysis only the clock promotes
    elif not route.paused and not (s is not None and s.shadow_only()):
        times.append(route.next_step_at)
    if program.pause_over(route, float("inf")) and not analysed(route):  # else its looks end it (`holds`)
        times.append(route.resume_at)
    times = [t for t in times if t > 0]
    return min(times) if times else None


def on_decision(route: Route, decision: GateDecided, steps: tuple[float, ...], interval_s: float,
                now: float, decisions: Mapping[str, GateDecided | None] = domain.NO_DECISIONS) -> Route | None:
    """`domain.on_decision`, then the strategy's own start when a decision lets the rollout go live:
    the step program from its first step, the blue-green preview by header, or shadow only."""
    new = domain.on_decision(route, decision, steps, interval_s, now, decisions)
    s = route.strategy
    if new is None or s is None or route.phase == "progressing" or new.phase != "progressing":
        return new
    why = f"gate PASS: {decision.reason}" if decision.reason else "gate PASS"
    if s.blue_green is not None:
        return bluegreen.live(new, now, interval_s, why)
    if s.shadow_only():
        return msgspec.structs.replace(new, weight=0.0, step=0, next_step_at=now + interval_s,
                                       reason=f"{why}; shadow: {new.canary.release if new.canary else ''} gets "
                                              "mirrored requests only and serves no user until promoted")
    if s.kinds():
        return program.run(msgspec.structs.replace(new, weight=route.weight, cursor=0), s.program(), interval_s,
                           now, why)
    return new


def on_time(route: Route, steps: tuple[float, ...], interval_s: float, now: float,
            tripped: Tripped | None = None) -> Route | None:
    """Changes the clock alone makes: a timed pause step ends (without an analysis), a blue-green preview promotes
    itself (without a pre-promotion analysis), its old release scales down, or a plain step falls due. An analysed
    rollout's timed pause ends on a passing look at or after its end (`holds`, `on_measurement`), never here.

    While the canary's endpoint breaker is open (`tripped`), no next step begins and no promotion happens: the
    route waits one interval more and says why. Its requests are then answered by stable, and a promotion made
    meanwhile left the promoted release without that fallback, answering 502 to every request until the breaker's
    cooldown ended."""
    if program.pause_over(route, now) and route.strategy is not None and not analysed(route):
        if tripped is not None:  # the look on its own schedule (`next_step_at`) still judges an analysed canary
            return _hold_tripped(route, tripped, resume_at=now + interval_s)
        return program.run(stepped(route, now), route.strategy.program(), interval_s, now,
                           f"timed pause at {_where(route)} over")
    if bluegreen.scale_down_due(route, now):
        return bluegreen.scale_down(route)
    if analysed(route) or route.paused:
        return None
    if bluegreen.auto_promotion_due(route, now):
        if tripped is not None:
            return _hold_tripped(route, tripped, promote_at=now + interval_s)
        return bluegreen.promote(route, "auto-promotion delay over", now, interval_s)
    s = route.strategy
    if route.phase != "progressing" or now < route.next_step_at or (s is not None and (
            s.blue_green is not None or s.shadow_only())):
        return None
    if tripped is not None:
        return _hold_tripped(route, tripped, next_step_at=now + interval_s)
    if program.programmed(route):
        assert s is not None
        return program.run(route, s.program(), interval_s, now)
    return domain.tick(route, steps, interval_s, now)


def _advance(route: Route, st: AnalysisStatus, steps: tuple[float, ...], interval_s: float, now: float) -> Route:
    """The next step after a passing analysis (program, plain weights, or blue-green's promotion)."""
    where = f"analysis passed at {_where(route)}"
    if route.step_pause:  # only a timed pause over lets a look advance (`holds`)
        where = f"timed pause at {_where(route)} over; {where}"
    bg = bluegreen.spec(route)
    if bg is not None:
        if route.promote_at and now >= route.promote_at:
            return bluegreen.promote(msgspec.structs.replace(route, analysis=st), f"pre-promotion {where}", now,
                                     interval_s)
        then = "promote by hand" if not route.promote_at else "promotes itself once its delay is over"
        return _bump(route, analysis=st, next_step_at=now + interval_s,
                     reason=f"pre-promotion {where}; {then}")
    if route.strategy is not None and route.strategy.shadow_only():
        return _bump(route, analysis=st, next_step_at=now + interval_s,
                     reason=f"{where}; shadow only: the candidate serves no user until promoted by hand")
    st = msgspec.structs.replace(st, step_at=now)  # the looks of the step that begins count reports from now
    if program.programmed(route) and route.strategy is not None:
        return program.run(msgspec.structs.replace(route, analysis=st), route.strategy.program(), interval_s, now,
                           where)
    following = next((i for i, s in enumerate(steps) if s > route.weight), None)
    if following is None:
        return msgspec.structs.replace(domain.promote(route, f"analysis passed at {route.weight:g}%"), analysis=st)
    return _bump(route, analysis=st, weight=steps[following], step=following + 1, next_step_at=now + interval_s,
                 reason=f"{where}; step {following + 1}/{len(steps)}: canary at {steps[following]:g}%")


def holds(route: Route, now: float) -> bool:
    """True while the route is paused and its looks advance nothing: by an operator, a pause step waiting for
    approval, or a timed pause step not yet over. A timed pause over is no hold for an analysed rollout: its next
    step (or promotion) waits for a passing look that judged the evidence of the pause (its step began with it),
    and a look that waits for that evidence waits toward the progress deadline as any step's does. Before (probe
    p75 F2), the clock ended it before the look due at the same moment: a canary with no request at all, or one
    that turned slow once the pause began, was promoted on the pause's end with nothing of the pause judged."""
    return route.paused and not (analysed(route) and program.pause_over(route, now))


def stepped(route: Route, now: float) -> Route:
    """The route of an analysed rollout whose next step begins at `now` (a pause step over): its looks count
    drift reports produced from then on only."""
    if not analysed(route):
        return route
    return msgspec.structs.replace(route, analysis=msgspec.structs.replace(route.analysis or AnalysisStatus(),
                                                                           step_at=now))


def drift_evidence(route: Route, since: float) -> tuple[Comparison, str, float, bool]:
    """Which drift report a `drift` metric's look judges: its comparison, the release it is about, the time its
    window must end at or after (`since`: the rollout's start, or its analysis window), and whether the whole
    window must lie at or after that time.

    While the canary has a stable arm (live, held by an override, a blue-green preview), only the
    canary-versus-stable report of its release: the deployment's now-versus-reference one is mostly stable's
    traffic, and moves with what clients ask (a probe drifted it at will and aborted, or promoted, canaries on it).
    It must be produced since the current step began (`AnalysisStatus.step_at`): the report that passed one
    step never passes the next, nor the promotion. A step at 100% leaves stable no arm, so no canary-versus-stable
    report can be made (each pairs stable's rows of the same time with the canary's): the deployment's
    now-versus-reference report whose whole window lies in the step judges it, the canary's traffic alone against
    the reference. Before, the promotion waited for a canary-versus-stable report that came only when the step's
    first rows happened to reach one, made as the step began. After a blue-green promotion there is no stable
    arm, and the monitor's reference restarted with the promoted release: its now-versus-reference reports are of
    that release alone."""
    if route.phase == "promoted":
        return "now_vs_reference", route.stable.release, since, False
    assert route.canary is not None
    began = max(since, step_began(route))
    if route.weight >= 100.0:
        return "now_vs_reference", route.canary.release, began, True
    return "canary_vs_stable", route.canary.release, began, False


def step_began(route: Route) -> float:
    """When the rollout's current step began (unix seconds): its analysis's `step_at`, else the rollout's start."""
    return max(route.started_at, route.analysis.step_at if route.analysis is not None else 0.0)


def _bump(route: Route, **changes: object) -> Route:
    return msgspec.structs.replace(route, version=route.version + 1, **changes)


def _where(route: Route) -> str:
    return f"step {route.step} ({route.weight:g}%)"


def on_measurement(route: Route, m: Measurement, steps: tuple[float, ...], interval_s: float,
                   now: float, decisions: Mapping[str, GateDecided | None] = domain.NO_DECISIONS,
                   tripped: Tripped | None = None) -> Route | None:
    """Apply one analysis measurement: abort (or, after a blue-green promotion, roll back) on failures past
    the limit, pause on too many inconclusive ones, advance (or promote after the last step) after
    `count` successes in the step.

    While the canary's endpoint breaker is open (`tripped`), a passing look advances nothing: the step waits, its
    reason saying why, and the first passing look once the breaker is no longer seen open advances it. A failing
    one still aborts: the hold keeps no canary from its analysis."""
    spec = spec_of(route)
    if spec is None:
        return None
    route = _untripped(_unwaited(route))
    verifying = route.phase == "promoted"
    tripped = None if verifying else tripped  # a promoted release has no stable arm to be diverted to
    st = route.analysis or AnalysisStatus()
    # A look of a paused rollout never waits toward the deadline: an operator (or a pause step) holds it, not
    # missing evidence. Any look that does not wait ends the wait.
    paused = holds(route, now)
    waits = m.verdict == "WAITING" and not paused
    m = overdue(route, m, interval_s, now)
    conclusive = m.verdict != "WAITING"
    st = msgspec.structs.replace(st, look=st.look + conclusive, last=m, at=now, consecutive_errors=0,
                                 waiting_since=(st.waiting_since or now) if waits else 0.0, wait_note="")
    nxt = now + interval_s
    culprit = m.failing()

    def hold(st: AnalysisStatus) -> Route:
        """The route held at its step; its reason says what the step waits for once it has waited an interval, and
        that the canary's breaker is open while it is."""
        note = _wait_note(route, m, now - st.waiting_since, interval_s) if waits else ""
        open_note = tripped_note(route, tripped) if tripped is not None else ""
        return _bump(route, analysis=msgspec.structs.replace(st, wait_note=note), next_step_at=nxt,
                     reason=route.reason + open_note + note)
    if m.verdict == "FAILED":
        st = msgspec.structs.replace(st, failures=st.failures + 1)
        if st.failures > spec.failure_limit:
            what = describe(culprit) if culprit else "failed"
            if verifying:
                why = f"post-promotion analysis failed: {what}"
                return msgspec.structs.replace(domain.rollback(route, why, decision_id=route.decision_id,
                                                               decisions=decisions), analysis=st, paused=False)
            why = f"analysis failed at {_where(route)}: {what}"
            return msgspec.structs.replace(domain.abort(route, why), analysis=st, paused=False)
        return hold(st)
    if m.verdict == "INCONCLUSIVE":
        st = msgspec.structs.replace(st, inconclusives=st.inconclusives + 1)
        why = _what(culprit) if culprit else "inconclusive"
        if st.inconclusives > spec.inconclusive_limit and verifying:
            # A promoted release has all the traffic: there is no step to hold it at, and one never verified
            # must not keep it for ever (fail-closed), so past the limit it is rolled back.
            return msgspec.structs.replace(
                domain.rollback(route, f"post-promotion analysis inconclusive {st.inconclusives} times: {why}",
                                decision_id=route.decision_id, decisions=decisions), analysis=st, paused=False)
        if st.inconclusives > spec.inconclusive_limit and not paused:
            # The operator's hold now (a timed pause step over no longer ends by itself): `resume` ends it.
            return _bump(route, analysis=st, paused=True, step_pause=False, resume_at=0.0, next_step_at=nxt,
                         reason=f"paused at {_where(route)}: analysis inconclusive {st.inconclusives} times "
                                f"({why}); resume or abort")
        return hold(st)
    if m.verdict == "WAITING" or paused:
        return hold(st)
    st = msgspec.structs.replace(st, successes=min(st.successes + 1, spec.count))
    if st.successes < spec.count or (tripped is not None and not held(route)):
        return hold(st)  # held by its breaker with the step's successes kept: the next passing look advances it
    st = msgspec.structs.replace(st, successes=0)
    if held(route):
        glass = route.override
        assert glass is not None
        return _bump(route, analysis=st, next_step_at=nxt,
                     reason=f"analysis passed at {route.weight:g}%: held there by the break-glass override by "
                            f"{glass.actor} (no decision admits {glass.release}; promote with a promote statement)")
    if verifying:
        return _bump(route, analysis=st, verifying=False, next_step_at=0.0, good=domain.remember(route.good, route.stable),
                     reason=f"{route.reason.removesuffix(bluegreen.VERIFYING)}; post-promotion analysis passed")
    return _advance(route, st, steps, interval_s, now)


# A step's looks wait for evidence at most this many intervals (or `DEADLINE_MIN_S`, if longer) before each further
# one counts as inconclusive, when its analysis names no `progress_deadline_s`. Ten intervals let a sample that
# fills slowly (a low weight, a quiet hour) fill, and a blip in the evidence's supply (an evaluator or the query
# service restarting, a leader election) pass; the floor, Argo Rollouts' default progressDeadlineSeconds, keeps a
# low-traffic canary with the router's default interval (5 s) from pausing while its sample fills.
DEADLINE_INTERVALS = 10
DEADLINE_MIN_S = 600.0
# How an overdue look's metrics begin their `why`: their wait has run past the deadline.
_PAST = "no evidence for "


def deadline_of(spec: AnalysisSpec, interval_s: float) -> float:
    """How long (seconds) a step's looks may wait for evidence before they count as inconclusive."""
    if spec.progress_deadline_s is not None:
        return spec.progress_deadline_s
    return max(DEADLINE_INTERVALS * interval_s, DEADLINE_MIN_S)


def overdue(route: Route, m: Measurement, interval_s: float, now: float) -> Measurement:
    """The look as the rollout counts it: a WAITING one whose wait began the progress deadline ago or more (Argo's
    progressDeadlineSeconds) is INCONCLUSIVE, each waiting metric saying for how long and why. Before (probe p15),
    a look without evidence waited for ever: never a look, never toward `inconclusive_limit`, so a canary whose
    evidence never came (a `score` metric with online evaluation off, an all-4xx canary, clients hanging up)
    held its weight, and a release under post-promotion analysis all the traffic, unverified and silently."""
    spec = spec_of(route)
    st = route.analysis
    if spec is None or st is None or not st.waiting_since or m.verdict != "WAITING" or holds(route, now):
        return m
    waited, deadline = now - st.waiting_since, deadline_of(spec, interval_s)
    if waited < deadline:
        return m
    past = f"{_PAST}{waited:.0f} s, past the progress deadline ({deadline:g} s)"
    results = [msgspec.structs.replace(r, verdict="INCONCLUSIVE", why=f"{past}: {r.why}")
               if r.verdict == "WAITING" and not r.dry_run else r for r in m.metrics]
    return msgspec.structs.replace(m, verdict="INCONCLUSIVE", metrics=results)


def _wait_note(route: Route, m: Measurement, waited: float, interval_s: float) -> str:
    """What the route's reason ends with while its step waits: nothing in its first interval of waiting, then
    for how long and what for (the first metric that holds it, and its why)."""
    if waited < interval_s:
        return ""
    culprit = m.failing()
    what = f": {_what(culprit)}" if culprit else ""
    where = "after the promotion" if route.phase == "promoted" else f"at {_where(route)}"
    return f"; waiting {waited:.0f} s {where} for evidence{what}"


def _what(result: MetricResult) -> str:
    """A metric's result for a reason: `describe`, or for one that waited or waits, its name and why (its values,
    if any, were not judged)."""
    if result.verdict == "WAITING" or result.why.startswith(_PAST):
        on = f" on {result.group}" if result.group else ""
        return f"{result.name}{on}: {result.why}" + (f"; {result.note}" if result.note else "")
    return describe(result)


def _unwaited(route: Route) -> Route:
    """The route with its reason as it was before its step waited (without the wait's note)."""
    note = route.analysis.wait_note if route.analysis is not None else ""
    if not note or not route.reason.endswith(note):
        return route
    return msgspec.structs.replace(route, reason=route.reason.removesuffix(note))


def overdue_now(route: Route) -> bool:
    """True while the route's reason says its step waited past its progress deadline (its looks count as
    inconclusive): the change into it is announced (history, `lg.rollout`); the wait's seconds ticking by are not."""
    st = route.analysis
    return (st is not None and bool(st.wait_note) and route.reason.endswith(st.wait_note)
            and st.last is not None and st.last.verdict == "INCONCLUSIVE")


def analysis_starts(route: Route, spec: AnalysisSpec) -> float:
    """When a rollout's looks may start: `initial_delay_s` after the canary started, or after a
    blue-green promotion when its post-promotion analysis runs."""
    since = route.promoted_at if route.phase == "promoted" else route.started_at
    return since + spec.initial_delay_s


def on_error(route: Route, why: str, interval_s: float, now: float,
             decisions: Mapping[str, GateDecided | None] = domain.NO_DECISIONS) -> Route | None:
    """A look that could not be measured (Argo's Error): the next look comes an interval later, and one
    error past `consecutive_error_limit` in a row aborts (after a blue-green promotion, rolls back), as
    Argo does: a rollout nobody can analyse must not keep its traffic."""
    spec = spec_of(route)
    if spec is None:
        return None
    st = route.analysis or AnalysisStatus()
    st = msgspec.structs.replace(st, consecutive_errors=st.consecutive_errors + 1, at=now)
    if st.consecutive_errors <= spec.consecutive_error_limit:
        return _bump(route, analysis=st, next_step_at=now + interval_s)
    what = f"analysis could not be measured {st.consecutive_errors} times in a row at {_where(route)}: {why}"
    if route.phase == "promoted":
        return msgspec.structs.replace(domain.rollback(route, f"post-promotion {what}", decision_id=route.decision_id,
                                                       decisions=decisions),
                                       analysis=st, paused=False)
    return msgspec.structs.replace(domain.abort(route, what), analysis=st, paused=False)


def drift_judged(route: Route) -> bool:
    """True while the analysis judging the route has a `drift` metric (it, not the report alone, decides)."""
    spec = spec_of(route)
    return spec is not None and any(m.name == "drift" for m in spec.metrics)


def drift_moves(route: Route) -> float | None:
    """From when a DRIFT report moves `route` (`on_drift`; a report of a window that ended before moves nothing): a
    live canary's start, or a blue-green release's promotion while its post-promotion analysis runs. None while no
    report would move it: no such rollout, or an analysis with a `drift` metric judges drift itself."""
    if route.canary is None or drift_judged(route):
        return None
    if route.phase == "promoted" and route.verifying:
        return route.promoted_at
    if route.phase not in ("promoted", "aborted") and route.weight > 0:
        return route.started_at
    return None


def on_drift(route: Route, report: DriftReport,
             decisions: Mapping[str, GateDecided | None] = domain.NO_DECISIONS) -> Route | None:
    """A DRIFT report of a live canary's traffic against stable's aborts it, naming the drifting features; one
    covering a blue-green release under post-promotion analysis rolls it back.

    Only a canary-versus-stable report of the canary's release acts on a live canary: both windows are of the
    same time, so what moves the whole deployment (a client's long prompts, load that slows every answer) moves
    both and cancels out. A now-versus-reference report compares the deployment with its past: during a canary
    it is read, never acted on. After a blue-green promotion there is no stable arm left, and the monitor's
    reference restarted with the promoted release, so its now-versus-reference reports whose reference and window
    both began after the promotion are of that release alone: they roll it back, on answer-side features only like
    every report. (Before, probe p69 F2, any report whose window ended after the promotion did: one built on the
    old release's windows, or on a reference its late events filled, rolled a steady release back in seconds.)
    Only drift that can harm counts (`driftharm.harmful`): latency (or cost) that fell is an improvement, and a
    request-side feature (input tokens, prompt text) is what clients send, so neither ever aborts on its own.
    An analysis with a `drift` metric judges drift itself (its features, its limit, its dry run), so
    then the report is only its evidence and never aborts on its own. A report of events no router served
    (an application's own, which it may send as it likes) moves nothing.
    """
    since = drift_moves(route)
    if (since is None or route.canary is None or not report.served or not report.drifted
            or report.window_end.timestamp() < since):
        return None
    verifying = route.phase == "promoted"  # and under post-promotion analysis (`drift_moves`)
    if verifying and not report.observed_since(since):
        return None  # its reference or window holds the previous release's traffic (probe p69 F2)
    if not verifying and (report.comparison != "canary_vs_stable" or report.release != route.canary.release):
        return None
    harmful = driftharm.harmful(report)
    if report.features and not harmful:  # e.g. a faster canary, or longer prompts: drift, but no harm to roll back for
        return None
    features = ", ".join(driftharm.describe(f) for f in harmful) or "unnamed feature"
    if verifying:
        why = f"drift report {report.id} during post-promotion analysis: DRIFT in {features}"
        return domain.rollback(route, why, decision_id=route.decision_id, decisions=decisions)
    return msgspec.structs.replace(
        domain.abort(route, f"drift report {report.id} (canary {report.release} vs stable {report.reference_release}) "
                            f"at {_where(route)}: DRIFT in {features}"), paused=False)


def _live(route: Route) -> None:
    if route.canary is None:
        raise InvalidRollout(f"deployment {route.deployment!r} has no canary")
    if route.phase in ("promoted", "aborted"):
        raise InvalidRollout(f"canary of {route.deployment!r} is already {route.phase}")


def pause(route: Route, actor: str, why: str = "") -> Route:
    """Hold the canary at its weight: no step advances (analysis still aborts a failing canary). Over a pause step
    that waits for approval, the hold becomes the operator's: an approval no longer ends it, `resume` does (before,
    probe p13, the pause was refused as "already paused" and the next approval moved traffic anyway)."""
    _live(route)
    if route.paused and not waits_for_approval(route):
        raise InvalidRollout(f"canary of {route.deployment!r} is already paused")
    return _bump(route, paused=True, step_pause=False,
                 reason=f"paused at {_where(route)} by {actor}" + (f": {why}" if why else ""))


class NotAtStep(InvalidRollout):
    """An approval of a pause step the rollout no longer (or not yet) waits at (HTTP 409 `not_at_step`)."""


class RolloutChanged(InvalidRollout):
    """An operator's action aimed at a rollout (its canary release, its attempt's `started_at`) that the deployment no
    longer runs (HTTP 409 `rollout_changed`)."""


def expect(route: Route, action: str, canary: str, started_at: float | None) -> None:
    """RolloutChanged unless `route` still runs the rollout an operator's `action` names: the canary of release
    `canary` ("": not named), in the attempt that started at `started_at` (None: not named). Unbound, a promote meant
    for one canary promoted another that a concurrent PUT had just started, to 100% with no step, and an abort
    aborted it (probe p67 F2)."""
    current = route.canary.release if route.canary is not None else ""
    if (not canary or canary == current) and (started_at is None or started_at == route.started_at):
        return
    named = f"{canary!r}" if canary else f"the rollout started at {started_at!r}"
    now = (f"it now canaries {current!r}, started at {route.started_at!r} ({route.phase})" if current
           else "it runs no canary now")
    raise RolloutChanged(f"refused: {action} of {named} on {route.deployment!r} not applied: {now}; read the route "
                         "again (lockgate rollout get) and act on what it shows")


def waits_for_approval(route: Route) -> bool:
    """True while the rollout is held by a pause step (untimed, or a timed one not yet over) that an approval ends."""
    return route.paused and route.step_pause and route.phase not in ("promoted", "aborted")


def approve(route: Route, step: int, canary: str, started_at: float | None, actor: str, interval_s: float,
            now: float) -> Route:
    """End the pause step `step` (1-based, as the route shows it) of the canary of release `canary`, in the rollout
    attempt that started at `started_at` (the route's; None: not named), only while that rollout still waits at it:
    an approval ends the pause its operator saw and no other. Unbound, two operators approving one pause, or a client
    retrying an approval whose answer it missed, each ended one more pause (probe p9: four at once took a
    [pause, pause, pause, pause, 100] canary from 0% to 100%); bound to the step alone, it ended the same step's
    pause of another canary swapped in, or of a new or retried attempt (probe p13)."""
    current = route.canary.release if route.canary is not None else ""
    if current != canary or (started_at is not None and started_at != route.started_at):
        what = f"release {current!r}" if current else "no canary"
        raise NotAtStep(f"refused: approval of step {step} of {canary!r} on {route.deployment!r} not applied: the "
                        f"deployment now canaries {what}" + ("" if current != canary else " in another rollout "
                        "attempt (restarted, retried or its canary replaced since)") + "; read the route again "
                        "(lockgate rollout get) and approve what it waits for")
    if waits_for_approval(route) and route.step == step:
        return resume(route, actor, interval_s, now)
    live = route.canary is not None and route.phase not in ("promoted", "aborted")
    if not live:
        now_at = f"its rollout is {route.phase if route.canary is not None else 'not started'}"
    else:
        state = "waiting for approval" if waits_for_approval(route) else "paused" if route.paused else route.phase
        now_at = f"it is now at step {route.step} ({route.weight:g}%), {state}"
    why = ("not reached yet" if live and step > route.step else
           "no pause waits there" if live and step == route.step else "already approved, or the rollout moved on")
    raise NotAtStep(f"refused: approval of step {step} of {route.deployment!r} not applied ({why}): {now_at}; "
                    "read the route again (lockgate rollout get) and approve the step it waits at")


def resume(route: Route, actor: str, interval_s: float, now: float) -> Route:
    """Continue a paused canary: the next step (or analysis look) is one interval away."""
    _live(route)
    if not route.paused:
        raise InvalidRollout(f"canary of {route.deployment!r} is not paused")
    # A resumed rollout's wait for evidence starts again: the operator has seen it (and may have fixed its supply).
    st = route.analysis and msgspec.structs.replace(route.analysis, inconclusives=0, waiting_since=0.0)
    live = route.phase == "progressing"
    if route.step_pause and route.strategy is not None and live:  # approval of a pause step: the next step now
        return program.run(stepped(msgspec.structs.replace(route, analysis=st), now), route.strategy.program(),
                           interval_s, now, f"approved at {_where(route)} by {actor}")
    # A canary waiting for a decision (a new canary release, NEEDS_REVIEW, an override cleared) runs no step:
    # its program starts again from the first step once a decision allows it.
    return _bump(route, paused=False, step_pause=False, step_paused_at=0.0, resume_at=0.0, analysis=st,
                 next_step_at=now + interval_s if live else route.next_step_at,
                 reason=f"resumed at {_where(route)} by {actor}")


def set_weight(route: Route, weight: float, actor: str) -> Route:
    """Change only the canary's weight; a canary that no decision allows (and no override covers) gets none."""
    _live(route)
    assert route.canary is not None
    if bluegreen.spec(route) is not None:
        raise InvalidRollout(f"{route.deployment!r} is a blue-green rollout: its preview gets traffic by header "
                             "only, and all of it at promotion (lockgate rollout promote)")
    glass = route.override if route.override is not None and route.override.release == route.canary.release else None
    if weight > 0 and not route.admitted and glass is None:
        raise NotAdmitted(f"refused: canary {route.canary.release!r} has no verified gate decision allowing it, "
                          "so it cannot get weight; an admin may start it with break_glass")
    if not route.admitted and glass is not None and weight > glass.weight:
        raise NotAdmitted(f"refused: canary {route.canary.release!r} has no verified gate decision allowing it, and "
                          f"the break-glass override by {glass.actor} lets it take at most {glass.weight:g}%; an admin "
                          "signs another for more")
    return _bump(route, weight=float(weight),
                 reason=f"weight set to {weight:g}% (was {route.weight:g}%) by {actor}")


def retry(route: Route, actor: str, now: float) -> Route:
    """Restart an aborted rollout from its first step, with the same spec and canary release (Argo's retry).

    The canary waits at 0% as a new one does; the caller applies the canary's verified decision at once, so
    a release still allowed goes straight to its first step, one BLOCKed since stays at 0%. Analysis counts
    and evidence start from nothing: looks of the aborted attempt say nothing about this one.
    """
    if route.canary is None:
        raise InvalidRollout(f"deployment {route.deployment!r} has no rollout to retry")
    if route.phase != "aborted":
        raise InvalidRollout(f"refused: the rollout of {route.deployment!r} is {route.phase}, not aborted; "
                             "only an aborted rollout can be retried")
    if route.canary.release == route.stable.release:
        raise InvalidRollout(f"refused: {route.canary.release!r} is the stable release of {route.deployment!r} "
                             "again (rolled back to it); start a new rollout with PUT")
    return _bump(route, weight=0.0, phase="idle", step=0, cursor=0, paused=False, analysis=None, admitted="",
                 decision_id="", next_step_at=0.0, started_at=now, header_route=None, step_pause=False,
                 step_paused_at=0.0, resume_at=0.0, promote_at=0.0, live_at=0.0, promoted_at=0.0, scale_down_at=0.0,
                 verifying=False, start_weight=0.0, override=None,
                 reason=domain.override_ended(route, f"retry of {route.canary.release} by {actor or 'operator'}: "
                                                     "from step 0, 0% until its verified gate decision allows it",
                                              "a retry is a new attempt"))


def replace_canary(route: Route, canary: domain.Target, decision: GateDecided | None, now: float,
                   interval_s: float) -> Route:
    """A PATCH of the canary release: the new release takes the canary's place at the same step. Its analysis
    starts from nothing (the old release's looks say nothing about it); without a verified decision allowing it
    (or an override covering it) it gets no weight until one does. Taking a live canary's place, its clocks start
    now (`restarted`); waiting for a decision, it has none until it goes live.

    A break-glass override covers the canary it names while it stays the canary, at most at its signed weight:
    swapping another release in ends it, and one it covers comes in at no more than that weight. (Before, a swap
    to an allowed release, a set-weight to 100 and a swap back put the never-gated release on 100%, with the
    override still saying 20%: an operator's way around the admin's signature.)"""
    _live(route)
    domain.same_app(route, canary)
    domain.same_tenant(route, canary)
    allowed = domain.allows(decision, canary.release)
    glass = route.override
    covered = glass is not None and glass.release == canary.release
    admitted = decision.id if allowed and decision is not None else ""
    reason = f"canary release now {canary.release} at {_where(route)}"
    changes: dict[str, object] = {"canary": canary, "admitted": admitted, "analysis": None, "started_at": now,
                                  "admitted_by": decision.key_id if admitted and decision is not None else ""}
    if not allowed and not covered:
        reason = f"canary release now {canary.release}: 0% until a verified gate decision allows it"
        changes.update(weight=0.0, phase="idle", next_step_at=0.0, decision_id="", step_paused_at=0.0, resume_at=0.0,
                       promote_at=0.0, live_at=0.0)
    else:
        if decision is not None:
            changes["decision_id"] = decision.id
        if not allowed and glass is not None and route.weight > glass.weight:  # it rests on the override alone
            changes["weight"] = glass.weight
            reason = (f"canary release now {canary.release} at {glass.weight:g}% (was {route.weight:g}%): the "
                      f"break-glass override by {glass.actor} lets it take at most that")
    if glass is not None and not covered:
        changes["override"] = None
        reason = domain.override_ended(route, reason, f"{canary.release} took the canary's place")
    new = _bump(route, reason=reason, **changes)
    return restarted(new, interval_s, now) if new.phase == "progressing" else new


def restarted(route: Route, interval_s: float, now: float) -> Route:
    """A live rollout whose canary a PATCH replaced, with the clocks its start sets started again at `now`: a
    blue-green preview's auto-promotion and looks (`bluegreen.live`), the current step's interval and a timed pause
    step's duration. Before (probe p57 F1), the new release inherited the old one's: a preview swapped in 2 s
    before its predecessor's auto-promotion was promoted 2 s after it went live, a canary at 100% after 1 s."""
    if bluegreen.spec(route) is not None:
        return bluegreen.live(route, now, interval_s, route.reason)
    if program.programmed(route):
        assert route.strategy is not None
        return program.restarted(route, route.strategy.program(), interval_s, now)
    return msgspec.structs.replace(route, next_step_at=now + interval_s)


def replace_strategy(route: Route, strategy: Strategy | None, default_interval_s: float, now: float) -> Route:
    """A PATCH of the strategy (steps, interval, analysis ...): the rollout keeps its weight and position; a cursor
    past the new step list ends at its last step. Its clocks follow the stored strategy (before, probe p57 F2, they
    kept the old one's): a new `interval_s` times the step (or look) under way from when it began, a new blue-green
    `auto_promotion_s` the preview's promotion from when it went live (`bluegreen.retimed`), and a changed pause at
    the step held at ends as the new step says, timed from when it began (`program.retimed`, probe p58 F1)."""
    _live(route)
    was_bg = route.strategy is not None and route.strategy.blue_green is not None
    if was_bg != (strategy is not None and strategy.blue_green is not None):
        raise InvalidRollout(f"a PATCH cannot switch {route.deployment!r} between canary and blue-green: "
                             "start a new rollout with PUT")
    steps = len(strategy.program()) if strategy is not None else 0
    new = _bump(route, strategy=strategy, cursor=min(route.cursor, steps) if steps else route.cursor)
    if new.phase != "progressing":  # waiting for a decision: its clocks start when it goes live
        return new
    was, interval = interval_of(route, default_interval_s), interval_of(new, default_interval_s)
    if new.next_step_at and interval != was:  # every step and look is due one interval after it began
        new = msgspec.structs.replace(new, next_step_at=new.next_step_at - was + interval)
    if route.strategy is not None and route.strategy.blue_green is not None:
        new = bluegreen.retimed(new, route.strategy.blue_green.auto_promotion_s)
    return program.retimed(new, route.strategy.program() if route.strategy is not None else [],
                           strategy.program() if strategy is not None else [], now)
