"""A deployment's first release (pure): `stable_release` alone serves 100% at once, only with a verified decision
allowing it and only where no release serves yet; later releases roll out as a canary from it."""

from __future__ import annotations

import msgspec
import pytest

from lockgate.cli.rollout import finished
from lockgate.contracts import GateDecided
from lockgate.services.router import domain
from lockgate.services.router.domain import AlreadyServing, CanaryRequest, InvalidRollout, NotAdmitted, Target

pytestmark = pytest.mark.timeout(30)

STEPS = domain.normalize_steps((10, 25, 50, 100))
R1 = Target(release="r1", endpoint="default", model="m1")
R2 = Target(release="r2", endpoint="canary", model="m2")


def _decision(verdict: str, release: str = "r1", reason: str = "because") -> GateDecided:
    return GateDecided(release=release, decision=verdict, rules=[], reason=reason)


def _first(decision: GateDecided | None = None) -> domain.Route:
    return domain.first_release(domain.default_route("d"), R1, decision or _decision("PASS"), "ops")


@pytest.mark.parametrize("body", [{"stable_release": "r1"}, {"stable_release": "r1", "canary_release": ""}])
def test_a_stable_release_alone_is_a_first_release(body: dict) -> None:
    req = domain.decode_canary(msgspec.json.encode(body))
    assert req.first and req.stable_release == "r1"
    assert not domain.decode_canary(b'{"stable_release": "r1", "canary_release": "r2"}').first


@pytest.mark.parametrize(("extra", "named"), [
    ({"initial_weight": 10}, "initial_weight"),
    ({"strategy": {"steps": [50]}}, "strategy"),
    # Break-glass covers a canary only: a release that serves everyone always needs an allowing decision.
    ({"break_glass": {"reason": "incident 7"}}, "break_glass apply to a canary only"),
])
def test_what_applies_to_a_canary_is_refused_for_a_first_release(extra: dict, named: str) -> None:
    with pytest.raises(InvalidRollout, match=named):
        domain.decode_canary(msgspec.json.encode({"stable_release": "r1", **extra}))


def test_an_allowed_first_release_serves_everyone_at_once() -> None:
    decision = _decision("PASS")
    r = domain.first_release(domain.default_route("d"), R1, decision, "ops")
    assert (r.stable, r.canary, r.weight, r.phase, r.version) == (R1, None, 0.0, "promoted", 1)
    assert (r.decision_id, r.admitted, r.good, r.override) == (decision.id, decision.id, [R1], None)
    assert all(domain.choose(r, f"u{i}", salt="") == ("stable", R1) for i in range(200))
    assert r.reason.startswith("first release r1 serves 100% (rolled out by ops): verified gate decision "
                               f"{decision.id} allows it")
    state = domain.to_state(r)
    assert (state.stable_release, state.canary_release, state.phase) == ("r1", "", "promoted")


@pytest.mark.parametrize(("decision", "said"), [
    (None, "refused: first release 'r1' has no verified gate decision allowing it (none stored, or it does not "
           "verify): gate it first (lockgate eval run SUITE --candidate r1 --policy POLICY)"),
    (_decision("PASS", release="r9"), "first release 'r1' has no verified gate decision allowing it"),
    (_decision("BLOCK", reason="error_rate too high"), "refused: first release 'r1' is BLOCKed by the gate (decision "
                                                       "{id}: error_rate too high); fix it and gate a new release"),
    (_decision("NEEDS_REVIEW"), "refused: first release 'r1' is awaiting review (decision {id} is NEEDS_REVIEW: "
                                "because); it is allowed once a reviewer approves it (lockgate gate approve r1)"),
])
def test_a_first_release_no_decision_allows_is_refused_naming_the_decision(decision: GateDecided | None,
                                                                           said: str) -> None:
    with pytest.raises(NotAdmitted) as refused:
        domain.first_release(domain.default_route("d"), R1, decision, "ops")
    message = refused.value.message
    assert said.format(id=decision.id if decision else "") in message
    assert "a break-glass override cannot cover it" in message


@pytest.mark.parametrize(("release", "said"), [
    (R2, "refused: 'd' already serves 'r1', and stable_release alone only gives a deployment its first release; "
         "a serving release changes through a rollout that gates the new one against it: PUT stable_release 'r1' "
         "with canary_release 'r2'"),
    (R1, "refused: 'r1' is already the stable release of 'd'"),
])
def test_a_first_release_is_refused_where_a_release_serves(release: Target, said: str) -> None:
    serving = _first()
    with pytest.raises(AlreadyServing) as refused:
        domain.first_release(serving, release, _decision("PASS", release=release.release), "ops")
    assert said in refused.value.message
    # ... also once a canary rolled out from it (the stable changed through a rollout, as it should)
    canary = domain.start_canary(serving, CanaryRequest(stable_release="r1", canary_release="r2"), stable=R1,
                                 canary=R2, first_step=STEPS[0])
    with pytest.raises(AlreadyServing):
        domain.first_release(canary, R2, _decision("PASS", release="r2"), "ops")


def test_the_next_release_rolls_out_as_a_canary_from_the_first() -> None:
    first = _first()
    r = domain.start_canary(first, CanaryRequest(stable_release="r1", canary_release="r2"), stable=R1, canary=R2,
                            first_step=STEPS[0])
    assert (r.stable, r.canary, r.weight, r.phase, r.good) == (R1, R2, 0.0, "idle", [R1])  # waits for its decision
    r = domain.on_decision(r, _decision("PASS", release="r2"), STEPS, 5.0, now=100.0)
    assert r is not None and (r.phase, r.weight) == ("progressing", 10.0)


def test_a_redelivered_decision_of_the_first_release_changes_nothing() -> None:
    decision = _decision("PASS")
    assert domain.on_decision(_first(decision), decision, STEPS, 5.0, now=1.0) is None


def test_rollout_watch_sees_a_first_release_as_complete() -> None:
    route = msgspec.to_builtins(_first())
    assert finished(route)
    assert not finished(msgspec.to_builtins(domain.default_route("d")))


def test_a_block_of_the_first_release_has_nothing_to_roll_back_to_and_says_so() -> None:
    r = domain.on_decision(_first(), _decision("BLOCK", reason="drift"), STEPS, 5.0, now=1.0)
    assert r is not None and (r.stable, r.canary, r.good) == (R1, None, [])
    assert "NO known-good release to roll back to: still serving r1" in r.reason


# An unreadable route record restored (probe p1, F4): from its last readable revision, with its own stable only.
SHOP = Target(release="shop-v1", app="shop", tenant="default", endpoint="default", model="m1")


def _serving_shop() -> domain.Route:
    return domain.first_release(domain.default_route("shop-web"), SHOP, _decision("PASS", release="shop-v1"), "ops")


def test_restoring_an_unreadable_route_keeps_its_last_readable_revision() -> None:
    last = _serving_shop()
    r = domain.restore(last, "shop-v1", _decision("PASS", release="shop-v1"), "apikey:op", 7, "not a route")
    assert (r.stable, r.canary, r.phase, r.good, r.decision_id) == (SHOP, None, "promoted", [SHOP], last.decision_id)
    assert r.version == last.version + 1
    assert r.reason.startswith("route restored by apikey:op from its last readable revision (7) after its record "
                               "was made unreadable (not a route): first release shop-v1")


@pytest.mark.parametrize("release", ["shopx-lax", "shop-v2"])
def test_restoring_an_unreadable_route_with_another_release_is_refused(release: str) -> None:
    # Before: the repair took any release the gate allowed as a first release at 100%, another app's included.
    with pytest.raises(AlreadyServing) as refused:
        domain.restore(_serving_shop(), release, _decision("PASS", release=release), "op", 7, "not a route")
    assert refused.value.message == (
        "refused: the route record of 'shop-web' is unreadable (not a route); its last readable revision (7) serves "
        "'shop-v1', so stable_release alone restores it only with that release: PUT stable_release 'shop-v1' "
        f"(lockgate rollout start shop-web --stable shop-v1), then roll {release!r} out as a canary from it")


@pytest.mark.parametrize("decision", [None, _decision("BLOCK", release="shop-v1"),
                                      _decision("NEEDS_REVIEW", release="shop-v1")])
def test_restoring_an_unreadable_route_needs_its_stable_allowed_now(decision: GateDecided | None) -> None:
    with pytest.raises(NotAdmitted, match="refused: stable release 'shop-v1' .*restoring an unreadable route serves"):
        domain.restore(_serving_shop(), "shop-v1", decision, "op", 7, "not a route")


@pytest.mark.parametrize(("revision", "said"), [
    (7, "UNREADABLE (not a route), its requests refused (503 route_unreadable); shown: its last readable revision "
        "(7); `lockgate rollout start shop-web --stable shop-v1` restores it"),
    (0, "UNREADABLE (not a route), its requests refused (503 route_unreadable); none of its KV history is readable: "
        "an admin key gives it a first release"),
])
def test_rollout_get_says_a_route_record_is_unreadable(revision: int, said: str) -> None:
    from lockgate.cli.rollout import summary

    route = {**msgspec.to_builtins(_serving_shop()), "unreadable": {"why": "not a route",
                                                                    "last_readable_revision": revision}}
    rows = summary(route)
    assert rows[1] == {"field": "route record", "value": said}
    assert "route record" not in {r["field"] for r in summary(msgspec.to_builtins(_serving_shop()))}
