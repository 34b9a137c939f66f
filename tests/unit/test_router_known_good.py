"""Rollback to the last known-good release (fully promoted and healthy), not merely the stable before the
last promotion; `undo --to RELEASE` to a named earlier known-good release. Pure, on an injected clock."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from lockgate.contracts import GateDecided
from lockgate.services.router import bluegreen, domain, progress
from lockgate.services.router.analysis import AnalysisSpec, Measurement, MetricResult, MetricSpec
from lockgate.services.router.domain import CanaryRequest, InvalidRollout, Route, Target
from lockgate.services.router.strategy import Strategy

pytestmark = pytest.mark.timeout(30)

STEPS = (10.0, 100.0)
SPEC = AnalysisSpec(metrics=[MetricSpec(name="error_rate", max_increase=0.01)], min_sample=100)
BG = {"blue_green": {"post_promotion_analysis": msgspec.to_builtins(SPEC), "scale_down_delay_s": 300}}


def _decision(verdict: str, release: str, id_: str = "", reason: str = "because") -> GateDecided:
    return GateDecided(release=release, decision=verdict, rules=[], reason=reason, **({"id": id_} if id_ else {}))


def _ok(route: Route) -> dict[str, GateDecided | None]:
    """A PASS now for every known-good release of `route`: where a rollback may go (domain.last_good)."""
    return {t.release: GateDecided(release=t.release, decision="PASS", rules=[]) for t in route.good}


def _start(route: Route, stable: str, canary: str, strategy: dict[str, Any] | None = None) -> Route:
    r = domain.start_canary(route, CanaryRequest(stable_release=stable, canary_release=canary),
                            stable=Target(release=stable), canary=Target(release=canary), first_step=10.0)
    r = msgspec.structs.replace(r, strategy=msgspec.convert(strategy, Strategy) if strategy else None,
                                started_at=100.0)
    new = progress.on_decision(r, _decision("PASS", canary), STEPS, 10.0, 100.0, decisions=_ok(r))
    assert new is not None
    return new


def _promoted(route: Route, stable: str, canary: str, strategy: dict[str, Any] | None = None) -> Route:
    r = _start(route, stable, canary, strategy)
    if strategy:
        return bluegreen.promote(r, "by operator", now=200.0, interval_s=10.0)
    return domain.manual_promote(r, None)


def _m(verdict: str) -> Measurement:
    r = MetricResult(name="error_rate", verdict=verdict, canary=0.05, stable=0.005, threshold=0.015,  # type: ignore[arg-type]
                     canary_n=400, stable_n=400)
    return Measurement(verdict=verdict, look=1, metrics=[r], canary_n=400, stable_n=400)  # type: ignore[arg-type]


def _good(route: Route) -> list[str]:
    return [t.release for t in route.good]


def test_promotions_build_the_known_good_history() -> None:
    r = _promoted(domain.default_route("d"), "r1", "r2")
    r = _promoted(r, "r2", "r3")
    assert _good(r) == ["r1", "r2", "r3"]
    assert domain.remember([Target(release=f"x{i}") for i in range(12)], Target(release="x0"))[-1].release == "x0"
    assert len(domain.remember([Target(release=f"x{i}") for i in range(12)], Target(release="y"))) == domain.GOOD_KEPT


def test_release_under_post_promotion_analysis_is_not_known_good_until_it_passes() -> None:
    p = _promoted(domain.default_route("d"), "r1", "r2", BG)
    assert p.verifying and _good(p) == ["r1"]
    ok = progress.on_measurement(p, _m("SUCCESSFUL"), STEPS, 10.0, now=210.0, decisions=_ok(p))
    assert ok is not None and _good(ok) == ["r1", "r2"]
    back = progress.on_measurement(p, _m("FAILED"), STEPS, 10.0, now=210.0, decisions=_ok(p))
    assert back is not None and back.stable.release == "r1" and _good(back) == ["r1"]


def test_block_after_promotion_skips_an_unverified_previous_for_the_last_known_good() -> None:
    # r2 was promoted blue-green, but a new canary r3 started before r2's post-promotion analysis ended:
    # r2 is the stable before r3's promotion, yet never proved healthy. A BLOCK of r3 goes back to r1.
    p = _promoted(domain.default_route("d"), "r1", "r2", BG)
    r = _promoted(p, "r2", "r3")
    assert r.previous is not None and r.previous.release == "r2" and _good(r) == ["r1", "r3"]
    back = domain.on_decision(r, _decision("BLOCK", "r3", "blk"), STEPS, 10.0, 300.0, decisions=_ok(r))
    assert back is not None and (back.stable.release, back.phase, back.weight) == ("r1", "aborted", 0.0)
    assert back.reason.startswith("rolled back r3: gate BLOCK after promotion: because; back on last known-good r1")
    assert _good(back) == ["r1"] and domain.choose(back, "anyone", salt="")[1].release == "r1"


def test_later_block_of_the_release_rolled_back_to_goes_one_further_back() -> None:
    r = _promoted(_promoted(domain.default_route("d"), "r1", "r2"), "r2", "r3")
    back = domain.on_decision(r, _decision("BLOCK", "r3", "b3"), STEPS, 10.0, 300.0, decisions=_ok(r))
    assert back is not None and back.stable.release == "r2"
    again = domain.on_decision(back, _decision("BLOCK", "r2", "b2", "drift"), STEPS, 10.0, 301.0, decisions=_ok(back))
    assert again is not None and (again.stable.release, again.phase) == ("r1", "aborted")
    assert "gate BLOCK of known-good r2: drift" in again.reason and _good(again) == ["r1"]
    assert domain.on_decision(again, _decision("BLOCK", "r2", "b2"), STEPS, 10.0, 302.0,
                              decisions=_ok(again)) is None  # redelivery


def test_block_of_a_known_good_release_not_serving_only_forgets_it() -> None:
    r = _promoted(_promoted(domain.default_route("d"), "r1", "r2"), "r2", "r3")
    new = domain.on_decision(r, _decision("BLOCK", "r1", "b1"), STEPS, 10.0, 300.0, decisions=_ok(r))
    assert new is not None and new.stable.release == "r3" and _good(new) == ["r2", "r3"]
    assert domain.on_decision(r, _decision("BLOCK", "elsewhere"), STEPS, 10.0, 300.0, decisions=_ok(r)) is None
    assert domain.on_decision(r, _decision("PASS", "r1"), STEPS, 10.0, 300.0, decisions=_ok(r)) is None
    assert domain.on_decision(r, _decision("NEEDS_REVIEW", "r1"), STEPS, 10.0, 300.0,
                              decisions=_ok(r)) is None  # not failed


def test_undo_to_a_named_known_good_release() -> None:
    r = _promoted(_promoted(domain.default_route("d"), "r1", "r2"), "r2", "r3")
    undone = domain.undo_to(r, "r1", _decision("PASS", "r1"), "apikey:ops")
    assert (undone.stable.release, undone.previous.release, undone.phase, undone.weight) == (  # type: ignore[union-attr]
        "r1", "r3", "aborted", 0.0)
    assert undone.reason == "undone to known-good r1 by apikey:ops (was r3)"
    assert domain.choose(undone, "anyone", salt="")[1].release == "r1"


def test_block_of_a_release_undone_back_to_rolls_it_back() -> None:
    # Probe p1: `undo --to r1`, then `undo --to r2` made r2 the stable and, the canary being kept, the aborted canary
    # too; a BLOCK of r2 was taken as one of that aborted canary (terminal: ignored), and r2 kept all traffic.
    r = domain.undo_to(_promoted(domain.default_route("d"), "r1", "r2"), "r1", _decision("PASS", "r1"), "ops")
    r = domain.undo_to(r, "r2", _decision("PASS", "r2"), "ops")
    assert (r.stable.release, r.canary.release, r.phase) == ("r2", "r2", "aborted")  # type: ignore[union-attr]
    back = domain.on_decision(r, _decision("BLOCK", "r2", "b2", "toxicity 0.3"), STEPS, 10.0, 300.0, decisions=_ok(r))
    assert back is not None and (back.stable.release, back.phase, back.weight) == ("r1", "aborted", 0.0)
    assert "gate BLOCK of known-good r2: toxicity 0.3" in back.reason and _good(back) == ["r1"]
    assert domain.choose(back, "anyone", salt="")[1].release == "r1"
    # A decision that allows it changes nothing.
    assert domain.on_decision(r, _decision("PASS", "r2", "p2"), STEPS, 10.0, 300.0, decisions=_ok(r)) is None


@pytest.mark.parametrize(("release", "decision", "message"), [
    ("r9", None, "refused: 'r9' was never fully promoted and healthy on 'd' (known-good releases, newest first: r2, r1)"),
    ("r1", _decision("BLOCK", "r1", reason="toxicity 0.3"), "refused: 'r1' is now BLOCKed by the gate: toxicity 0.3"),
    ("r3", None, "refused: 'r3' is already the stable release of 'd'"),
    # Known-good once, re-gated since and waiting for a human: an operator's undo must not bypass the review.
    ("r1", _decision("NEEDS_REVIEW", "r1", reason="drift in output_tokens"),
     "refused: 'r1' is awaiting review (its current gate decision is NEEDS_REVIEW: drift in output_tokens); it serves "
     "again once a reviewer approves it (lockgate gate approve r1)"),
    # No decision at all (none stored, or it does not verify): fail closed, saying how to proceed.
    ("r1", None, "refused: 'r1' has no verified gate decision now (none stored, or it does not verify)"),
    ("r1", _decision("PASS", "r2"), "refused: 'r1' has no verified gate decision now"),  # another release's
])
def test_undo_to_refuses_a_release_never_promoted_not_allowed_now_or_serving(
        release: str, decision: GateDecided | None, message: str) -> None:
    r = _promoted(_promoted(domain.default_route("d"), "r1", "r2"), "r2", "r3")
    with pytest.raises(InvalidRollout) as err:
        domain.undo_to(r, release, decision, "ops")
    assert message in err.value.message


def test_release_that_failed_post_promotion_cannot_be_undone_to() -> None:
    p = _promoted(domain.default_route("d"), "r1", "r2", BG)
    back = progress.on_measurement(p, _m("FAILED"), STEPS, 10.0, now=210.0, decisions=_ok(p))
    assert back is not None
    with pytest.raises(InvalidRollout, match="'r2' was never fully promoted and healthy"):
        domain.undo_to(back, "r2", None, "ops")


def test_a_rollback_never_puts_back_a_previous_release_the_gate_blocked_since() -> None:
    # r2 was promoted blue-green from r1 and is under post-promotion analysis. The gate BLOCKs r1 (no longer
    # known-good: the history is empty), then r2. Before, an empty history fell back to `previous`: r1, BLOCKed,
    # took all traffic back.
    p = _promoted(domain.default_route("d"), "r1", "r2", BG)
    r = domain.on_decision(p, _decision("BLOCK", "r1", "b1"), STEPS, 10.0, 300.0, decisions=_ok(p))
    assert r is not None and _good(r) == [] and r.previous is not None and r.previous.release == "r1"
    back = domain.on_decision(r, _decision("BLOCK", "r2", "b2", "drift"), STEPS, 10.0, 301.0, decisions=_ok(r))
    assert back is not None and back.stable.release == "r2" and domain.choose(back, "anyone", salt="")[1].release == "r2"
    assert "NO known-good release to roll back to: still serving r2" in back.reason
    # Its post-promotion analysis is over: passing later must not make the BLOCKed r2 known-good.
    assert not back.verifying and progress.on_measurement(back, _m("SUCCESSFUL"), STEPS, 10.0, now=310.0,
                                                          decisions=_ok(back)) is None
    # The same for a failed post-promotion analysis, and for an operator's abort in the scale-down window.
    failed = progress.on_measurement(r, _m("FAILED"), STEPS, 10.0, now=310.0, decisions=_ok(r))
    assert failed is not None and failed.stable.release == "r2" and "NO known-good release" in failed.reason
    assert bluegreen.abort_promotion(r, "ops", decisions=_ok(r)).stable.release == "r2"
    # And undo, which puts back `previous` itself, only with a decision allowing it now: r1's is a BLOCK.
    with pytest.raises(domain.NotAdmitted, match="previous release 'r1' is BLOCKed"):
        bluegreen.undo(r, _decision("BLOCK", "r1", "b1"), "ops")


def test_undo_puts_back_exactly_the_previous_release_and_only_if_its_decision_allows_it() -> None:
    # r2 was promoted blue-green from r1 (still under post-promotion analysis: not known-good), then r3 from r2 as a
    # canary: previous is r2, the known-good history r1 and r3. Before, undo checked r2's decision but put back the
    # newest known-good release, r1, whatever its decision now.
    r = _promoted(_promoted(domain.default_route("d"), "r1", "r2", BG), "r2", "r3")
    assert r.previous is not None and r.previous.release == "r2" and _good(r) == ["r1", "r3"]
    undone = bluegreen.undo(r, _decision("PASS", "r2"), "ops")
    assert (undone.stable.release, undone.phase, undone.previous) == ("r2", "aborted", None)
    assert undone.reason == "rolled back r3: undone by ops" and _good(undone) == ["r1", "r3"]
    for verdict, why in (("NEEDS_REVIEW", "is awaiting review"), ("BLOCK", "is BLOCKed by the gate")):
        with pytest.raises(domain.NotAdmitted, match=f"previous release 'r2' {why}"):
            bluegreen.undo(r, _decision(verdict, "r2"), "ops")
    for none in (None, _decision("PASS", "r1")):  # none, or one for another release
        with pytest.raises(domain.NotAdmitted, match="previous release 'r2' has no verified gate decision"):
            bluegreen.undo(r, none, "ops")
    # An abort, which always may take off the release the operator stops, goes to the last known-good one.
    assert bluegreen.abort_promotion(r, "ops", decisions=_ok(r)).stable.release == "r1"


def test_a_rollback_with_nowhere_to_go_keeps_a_live_canary_admitted_and_checked() -> None:
    # r1, the stable and only known-good release, is BLOCKed while a canary of r2 runs: r1 keeps serving and the
    # canary goes on. Before, the canary's admission was cleared, so whatever raised it checked nothing.
    live = _start(domain.default_route("d"), "r1", "r2")
    assert (live.phase, live.admitted) == ("progressing", live.decision_id)
    back = domain.on_decision(live, _decision("BLOCK", "r1", "b1"), STEPS, 10.0, 300.0, decisions=_ok(live))
    assert back is not None and "NO known-good release to roll back to: still serving r1" in back.reason
    assert (back.phase, back.admitted, back.stable.release) == ("progressing", live.admitted, "r1")
    assert domain.rests_on_admission(back)
    gone = domain.readmit(back, None, "signed by revoked key id 'k1'")
    assert gone is not None and (gone.phase, gone.weight) == ("idle", 0.0)
    # A progressing canary whose route records no admission is checked all the same.
    unrecorded = msgspec.structs.replace(live, admitted="")
    assert domain.rests_on_admission(unrecorded)
    gone = domain.readmit(unrecorded, None)
    assert gone is not None and "admitted by a gate decision the route does not record" in gone.reason


def test_a_block_of_a_known_good_release_as_a_canary_drops_it_from_the_history() -> None:
    # r1 and r2 were known-good; undone to r1, r2 is rolled out again as a canary and BLOCKed there (aborted). A
    # later rollback of r1 must not go back to r2.
    r = _promoted(_promoted(domain.default_route("d"), "r1", "r2"), "r2", "r3")
    r = _start(domain.undo_to(r, "r1", _decision("PASS", "r1"), "ops"), "r1", "r2")
    blocked = domain.on_decision(r, _decision("BLOCK", "r2", "b2"), STEPS, 10.0, 300.0, decisions=_ok(r))
    assert blocked is not None and blocked.phase == "aborted" and _good(blocked) == ["r1", "r3"]
    again = domain.on_decision(blocked, _decision("BLOCK", "r2", "b2"), STEPS, 10.0, 301.0, decisions=_ok(blocked))
    assert again is None  # a redelivery changes nothing
    back = domain.on_decision(blocked, _decision("BLOCK", "r1", "b1"), STEPS, 10.0, 302.0, decisions=_ok(blocked))
    assert back is not None and back.stable.release == "r3"


def _glass_promoted(route: Route, stable: str, canary: str) -> Route:
    """`canary` promoted from `stable` by an admin's break-glass statement: no decision ever allowed it."""
    r = domain.start_canary(route, CanaryRequest(stable_release=stable, canary_release=canary),
                            stable=Target(release=stable), canary=Target(release=canary), first_step=10.0)
    glass = domain.Override(release=canary, action="promote", actor="ann", reason="incident", at=1.0)
    return domain.manual_promote(r, glass, now=2.0)


def test_a_rollback_skips_a_known_good_release_no_decision_allows_now() -> None:
    # p8 F1: r2 came in by break-glass (never gated); r3 is promoted from it, then BLOCKed. The rollback must not
    # put r2 back at 100% (as `undo --to r2` would refuse): it goes one further back, to r1, and says why.
    r = _glass_promoted(_promoted(domain.default_route("d"), "r0", "r1"), "r1", "r2")
    r = _promoted(r, "r2", "r3")
    assert _good(r)[-2:] == ["r2", "r3"]
    now = {"r0": _decision("PASS", "r0"), "r1": _decision("PASS", "r1"), "r2": None}
    back = domain.on_decision(r, _decision("BLOCK", "r3", "b3"), STEPS, 10.0, 300.0, decisions=now)
    assert back is not None and (back.stable.release, back.phase, back.override) == ("r1", "aborted", None)
    assert "back on last known-good r1 (known-good r2 skipped: no verified gate decision allows it now)" in back.reason
    assert _good(back) == ["r0", "r1", "r2"]  # kept: a decision may allow it later
    # A release awaiting review (or BLOCKed, or whose key was revoked) is skipped the same way.
    review = {**now, "r1": _decision("NEEDS_REVIEW", "r1")}
    back = domain.on_decision(r, _decision("BLOCK", "r3", "b3"), STEPS, 10.0, 300.0, decisions=review)
    assert back is not None and back.stable.release == "r0" and "known-good r2, r1 skipped" in back.reason


def test_a_rollback_with_no_known_good_release_allowed_now_keeps_serving_and_says_so() -> None:
    r = _promoted(_glass_promoted(_promoted(domain.default_route("d"), "r0", "r1"), "r1", "r2"), "r2", "r3")
    back = domain.on_decision(r, _decision("BLOCK", "r3", "b3"), STEPS, 10.0, 300.0)  # none read: none allowed
    assert back is not None and back.stable.release == "r3" and back.decision_id == "b3"
    assert back.reason.endswith("NO known-good release to roll back to (known-good r2, r1, r0 skipped: no verified "
                                "gate decision allows them now): still serving r3")
    # The other automatic rollbacks choose the same way: a failed post-promotion analysis, an abort in the window.
    p = _promoted(_glass_promoted(domain.default_route("d"), "r0", "r1"), "r1", "r2", BG)
    failed = progress.on_measurement(p, _m("FAILED"), STEPS, 10.0, now=210.0, decisions={"r1": None})
    assert failed is not None and failed.stable.release == "r2" and "NO known-good release" in failed.reason
    swapped = bluegreen.abort_promotion(p, "ops", decisions={"r0": _decision("PASS", "r0")})
    assert swapped.stable.release == "r0" and "known-good r1 skipped" in swapped.reason


def _reviewed_stable_with(slot: str) -> Route:
    """r2 promoted from r1 (both known-good), then the canary slot holding another release as `slot` says."""
    r = _promoted(domain.default_route("d"), "r1", "r2")
    if slot == "promoted":  # the promoted release still recorded as the canary
        return r
    if slot == "waiting":  # a new canary, not gated, at 0%
        return domain.start_canary(r, CanaryRequest(stable_release="r2", canary_release="r3"),
                                   stable=Target(release="r2"), canary=Target(release="r3"), first_step=10.0)
    if slot == "live":  # a new canary admitted and taking traffic
        return _start(r, "r2", "r3")
    if slot == "aborted":
        return domain.abort(_start(r, "r2", "r3"), "by operator")
    assert slot == "undone"  # `undo --to r1`, then back to r2: r2 also recorded as the aborted canary
    return domain.undo_to(domain.undo_to(r, "r1", _decision("PASS", "r1"), "ops"), "r2", _decision("PASS", "r2"), "ops")


@pytest.mark.parametrize("slot", ["promoted", "waiting", "live", "aborted", "undone"])
@pytest.mark.parametrize("verdict", ["NEEDS_REVIEW", "BLOCK"])
def test_a_decision_not_allowing_the_serving_stable_rolls_it_back_whatever_the_canary_slot_holds(
        slot: str, verdict: str) -> None:
    # Probe p14 F1: r2, serving, remade NEEDS_REVIEW by the veto reach-back of a person's reject of the same content.
    # With any other release in the canary slot (a new 0% canary, an aborted one), the NEEDS_REVIEW was taken as one
    # of a known-good release not serving and ignored: r2 kept all traffic for good.
    r = _reviewed_stable_with(slot)
    assert r.stable.release == "r2"
    back = domain.on_decision(r, _decision(verdict, "r2", "held", "vetoed"), STEPS, 10.0, 300.0, decisions=_ok(r))
    assert back is not None and (back.stable.release, back.phase, back.weight) == ("r1", "aborted", 0.0), back
    assert back.reason.startswith(f"rolled back r2: gate {verdict} ") and back.decision_id == "held"
    assert domain.choose(back, "anyone", salt="")[1].release == "r1" and _good(back) == ["r1"]
    assert domain.on_decision(back, _decision(verdict, "r2", "held"), STEPS, 10.0, 301.0,
                              decisions=_ok(back)) is None  # a redelivery
    # A PASS of the serving stable changes nothing.
    assert domain.on_decision(r, _decision("PASS", "r2", "p2"), STEPS, 10.0, 300.0, decisions=_ok(r)) is None


def test_a_known_good_release_awaiting_review_is_no_rollback_target_while_it_is() -> None:
    # r2 is known-good and not serving; it is remade NEEDS_REVIEW: kept in the history (an approval makes it a target
    # again), but a rollback of r3 while it awaits review skips it for the next known-good release, r1.
    r = _promoted(_promoted(domain.default_route("d"), "r1", "r2"), "r2", "r3")
    assert domain.on_decision(r, _decision("NEEDS_REVIEW", "r2", "n2"), STEPS, 10.0, 300.0, decisions=_ok(r)) is None
    review = {**_ok(r), "r2": _decision("NEEDS_REVIEW", "r2", "n2")}
    back = domain.on_decision(r, _decision("BLOCK", "r3", "b3"), STEPS, 10.0, 301.0, decisions=review)
    assert back is not None and back.stable.release == "r1"
    assert "known-good r2 skipped: no verified gate decision allows it now" in back.reason
    approved = {**_ok(r), "r2": _decision("PASS", "r2", "a2")}
    back = domain.on_decision(r, _decision("BLOCK", "r3", "b3"), STEPS, 10.0, 301.0, decisions=approved)
    assert back is not None and back.stable.release == "r2"


def test_hold_stable_rolls_back_a_stable_its_current_decision_no_longer_allows() -> None:
    # What the router's re-check (start, every few seconds, an operator's abort) does with the serving stable's
    # current verified decision: a route that never acted on it (stored before, a replica that missed it) or an abort
    # that would hand all traffic back to it.
    r = _reviewed_stable_with("waiting")
    held = _decision("NEEDS_REVIEW", "r2", "held", "vetoed")
    back = domain.hold_stable(r, held, _ok(r))
    assert back is not None and (back.stable.release, back.phase, back.weight) == ("r1", "aborted", 0.0)
    assert back.reason.startswith("rolled back r2: gate NEEDS_REVIEW of known-good r2: vetoed")
    aborted = domain.abort(_reviewed_stable_with("live"), "by operator")
    assert domain.hold_stable(aborted, held, _ok(aborted)).stable.release == "r1"  # type: ignore[union-attr]
    # Nothing changes while the decision allows the stable, without a verified decision (a break-glass promotion, a
    # retired key: a serving release keeps serving), for another release's decision, or with nowhere to go back
    # (said once when the decision arrived, not rewritten on every check).
    assert domain.hold_stable(r, _decision("PASS", "r2"), _ok(r)) is None
    assert domain.hold_stable(r, None, _ok(r)) is None
    assert domain.hold_stable(r, _decision("BLOCK", "r1"), _ok(r)) is None
    assert domain.hold_stable(r, held, {"r1": _decision("NEEDS_REVIEW", "r1")}) is None
    assert domain.hold_stable(domain.default_route("d"), held, {}) is None
