"""Router domain: sticky split, canary start validation and the rollout state machine."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from lockgate.contracts import GateDecided
from lockgate.services.router import domain, progress
from lockgate.services.router.domain import CanaryRequest, InvalidRollout, Route, Target

pytestmark = pytest.mark.timeout(30)


def _ok(route: Route) -> dict[str, GateDecided | None]:
    """A PASS now for every known-good release of `route`: where a rollback may go (domain.last_good)."""
    return {t.release: GateDecided(release=t.release, decision="PASS", rules=[]) for t in route.good}

STEPS = domain.normalize_steps((10, 25, 50, 100))
STABLE = Target(release="r1", endpoint="default", model="m1")
CANARY = Target(release="r2", endpoint="canary", model="m2")


def _canary(weight: float = 10, phase: str = "idle") -> Route:
    base = domain.default_route("d")
    r = domain.start_canary(base, CanaryRequest(stable_release="r1", canary_release="r2", initial_weight=weight),
                            stable=STABLE, canary=CANARY, first_step=STEPS[0])
    return msgspec.structs.replace(r, phase=phase)


def _decision(verdict: str, release: str = "r2", id_: str | None = None) -> GateDecided:
    kw = {"id": id_} if id_ else {}
    return GateDecided(release=release, decision=verdict, rules=[], reason="because", **kw)


@pytest.mark.parametrize("weight", [0, 1, 10, 25, 50, 90, 100])
def test_split_matches_weight(weight: float) -> None:
    route = msgspec.structs.replace(_canary(), weight=float(weight))
    n = 20_000
    canary = sum(domain.choose(route, f"user-{i}", salt="")[0] == "canary" for i in range(n))
    assert abs(canary / n - weight / 100) < 0.015


def test_split_is_sticky_and_monotone() -> None:
    low = msgspec.structs.replace(_canary(), weight=10.0)
    high = msgspec.structs.replace(low, weight=50.0)
    users = [f"u{i}" for i in range(2000)]
    first = [domain.choose(low, u, salt="")[0] for u in users]
    assert first == [domain.choose(low, u, salt="")[0] for u in users]
    # raising the weight only moves stable users to canary, never back
    assert all(domain.choose(high, u, salt="")[0] == "canary" for u, v in zip(users, first, strict=True)
               if v == "canary")


SECRET = bytes(range(32))  # the router's (Rollouts.secret)


def _started(rollout: str, route: Route | None = None) -> Route:
    return domain.start_canary(route or domain.default_route("d"),
                               CanaryRequest(stable_release="r1", canary_release="r2"), stable=STABLE, canary=CANARY,
                               first_step=STEPS[0], rollout=rollout)


def test_bucket_is_keyed_per_rollout_with_the_routers_secret() -> None:
    # Probe p1: the bucket was sha256(deployment, user), so any client computed which of its user ids were on the
    # canary and aimed long prompts there, short ones at stable, and aborted a healthy canary. Then each rollout drew
    # a salt, kept in the route record, which the CLI's NATS roles read (probe p10 F9). Now the key is the router's
    # secret over the rollout's id: two rollouts of one deployment split users independently, the record holds no
    # key, and neither the unsalted hash nor the id alone (what a reader of the record has) says anything of either.
    users = [f"user-{i}" for i in range(4000)]
    one, two = (msgspec.structs.replace(_started(r), weight=50.0, phase="progressing") for r in ("a" * 16, "b" * 16))
    assert (one.salt, two.salt, one.rollout, two.rollout) == ("", "", "a" * 16, "b" * 16)
    salts = domain.sticky_salt(SECRET, one), domain.sticky_salt(SECRET, two)
    assert "" not in salts and salts[0] != salts[1] and domain.sticky_salt(bytes(32), one) != salts[0]
    assert salts[0] not in msgspec.json.encode(one).decode()  # the stored record does not hold it
    assert sum(domain.bucket("d", u, salts[0]) == domain.bucket("d", u, salts[1]) for u in users) < 10
    on_one = [domain.choose(one, u, salt=salts[0])[0] == "canary" for u in users]
    on_two = [domain.choose(two, u, salt=salts[1])[0] == "canary" for u in users]
    guess = [domain.bucket("d", u) < 5000 for u in users]  # what a client computed before
    by_id = [domain.bucket("d", u, one.rollout) < 5000 for u in users]  # what a reader of the record computes
    for other in (on_two, guess, by_id):  # each agrees with the arms of rollout one by chance only: half the time
        assert 0.45 < sum(a == b for a, b in zip(on_one, other, strict=True)) / len(users) < 0.55
    assert domain.bucket("d", "user-1", "") == domain.bucket("d", "user-1")  # routes stored before: the old hash


def test_a_rollout_started_before_keeps_the_split_it_began_with() -> None:
    # A record with a salt of its own (drawn before the router's secret): its users stay on their arms mid-rollout;
    # the next rollout drops it, for a key only the router computes.
    before = msgspec.structs.replace(_canary(), salt="e" * 32)
    assert domain.sticky_salt(SECRET, before) == "e" * 32
    assert domain.sticky_salt(SECRET, msgspec.structs.replace(before, salt="")) == ""  # before salts: unsalted
    after = _started("f" * 16, before)
    assert after.salt == "" and domain.sticky_salt(SECRET, after) not in ("", "e" * 32)


def test_salted_split_is_sticky_and_monotone_within_a_rollout() -> None:
    r = domain.on_decision(_started("c" * 16), _decision("PASS"), STEPS, 5.0, now=100.0)
    salt = domain.sticky_salt(SECRET, r)
    users = [f"u{i}" for i in range(2000)]
    canary: set[str] = set()
    now = 105.0
    while r.phase == "progressing":
        assert domain.sticky_salt(SECRET, r) == salt  # the rollout keeps its key at every step
        arms = {u: domain.choose(r, u, salt=salt)[0] for u in users}
        assert arms == {u: domain.choose(r, u, salt=salt)[0] for u in users}  # sticky
        now_canary = {u for u, v in arms.items() if v == "canary"}
        assert canary <= now_canary  # raising the weight only moves stable users to the canary
        assert abs(len(now_canary) / len(users) - r.weight / 100) < 0.04
        canary = now_canary
        r = domain.tick(r, STEPS, 5.0, now=now)
        now += 5.0
    assert r.phase == "promoted"


def test_shown_route_leaves_the_salt_out() -> None:
    r = msgspec.structs.replace(_started("d" * 16), salt="d" * 32)  # a record from before the router's secret
    view = domain.shown(r)
    assert "salt" not in view and "d" * 32 not in msgspec.json.encode(view).decode()
    assert msgspec.convert(view, Route) == msgspec.structs.replace(r, salt="")  # all else as it is


def test_no_canary_routes_stable() -> None:
    route = domain.default_route("d")
    assert domain.choose(route, "x", salt="") == ("stable", route.stable)
    assert (route.stable.endpoint, route.stable.model) == ("default", "")  # the client's model, default endpoint


def test_user_hash_is_keyed_with_the_routers_secret() -> None:
    # Probe p10 F13: it was sha256(user)[:16], so whoever read the events hashed every small integer and a list of
    # emails and had the user ids back in under a second.
    import hashlib

    h = domain.user_hash(SECRET, "acme", "73519")
    assert len(h) == 16 and h == domain.user_hash(SECRET, "acme", "73519")  # stable: per-user analysis groups
    assert h != hashlib.sha256(b"73519").hexdigest()[:16]
    assert h != domain.user_hash(bytes(32), "acme", "73519") and h != domain.user_hash(SECRET, "other", "73519")
    assert domain.user_hash(SECRET, "acme", "") == ""


def test_normalize_steps_ends_at_100() -> None:
    assert domain.normalize_steps((50, 10, 10, 0, 150)) == (10.0, 50.0, 100.0)


def test_start_canary_defaults() -> None:
    r = _canary(weight=10)
    assert (r.stable, r.canary) == (STABLE, CANARY)
    # no decision allows r2 yet: it waits at 0%, remembering the weight asked for
    assert (r.weight, r.start_weight, r.phase, r.version, r.admitted) == (0.0, 10.0, "idle", 1, "")


@pytest.mark.parametrize(
    ("body", "part"),
    [
        ({"stable_release": "a", "canary_release": "a"}, "differ"),
        # Blank and wildcard names break the name grammar (they once shared KV keys with others).
        ({"stable_release": "a", "canary_release": " "}, r"at `\$.canary_release`"),
        ({"stable_release": "a*b", "canary_release": "b"}, r"at `\$.stable_release`"),
        ({"stable_release": "a", "canary_release": "b", "initial_weight": 101}, r"<= 100.0 - at `\$.initial_weight`"),
        # a rollout names releases only: never an upstream URL or a model
        ({"stable_release": "a", "canary_release": "b", "canary_upstream": "http://x"}, "canary_upstream"),
        ({"stable_release": "a", "canary_release": "b", "canary_model": "other"}, "canary_model"),
    ],
)
def test_bad_canary_requests_are_refused_when_decoded(body: dict, part: str) -> None:
    with pytest.raises(InvalidRollout, match=part):
        domain.decode_canary(msgspec.json.encode(body))


def test_pass_progresses_step_by_step_then_promotes() -> None:
    r = domain.on_decision(_canary(), _decision("PASS", id_="ok-1"), STEPS, 5.0, now=100.0)
    assert (r.phase, r.weight, r.step, r.next_step_at, r.admitted) == ("progressing", 10.0, 1, 105.0, "ok-1")
    assert domain.tick(r, STEPS, 5.0, now=104.9) is None  # not due yet
    weights = [r.weight]
    now = 105.0
    while r.phase == "progressing":
        r = domain.tick(r, STEPS, 5.0, now=now)
        weights.append(r.weight)
        now += 5.0
    assert weights == [10.0, 25.0, 50.0, 100.0, 0.0]
    assert r.phase == "promoted" and r.stable.release == "r2"
    assert domain.choose(r, "anyone", salt="") == ("stable", r.stable)
    state = domain.to_state(r)
    assert (state.stable_release, state.canary_release, state.canary_weight) == ("r2", "r2", 0.0)


def test_pass_from_zero_weight_goes_to_first_step() -> None:
    r = domain.on_decision(_canary(weight=0), _decision("PASS"), STEPS, 1.0, now=0.0)
    assert (r.weight, r.step) == (10.0, 1)


@pytest.mark.parametrize("verdict", ["BLOCK"])
@pytest.mark.parametrize("phase", ["idle", "progressing"])
def test_block_aborts_at_once(verdict: str, phase: str) -> None:
    r = domain.on_decision(_canary(weight=50, phase=phase), _decision(verdict), STEPS, 5.0, now=0.0)
    assert (r.phase, r.weight) == ("aborted", 0.0)
    assert "BLOCK" in r.reason and "because" in r.reason
    assert domain.tick(r, STEPS, 5.0, now=1e9) is None


def test_needs_review_sends_a_canary_to_zero_until_approved() -> None:
    progressing = domain.on_decision(_canary(), _decision("PASS"), STEPS, 5.0, now=0.0)
    held = domain.on_decision(progressing, _decision("NEEDS_REVIEW"), STEPS, 5.0, now=1.0)
    assert (held.phase, held.weight, held.admitted) == ("idle", 0.0, "")
    assert domain.tick(held, STEPS, 5.0, now=1e9) is None
    fresh = domain.on_decision(_canary(), _decision("NEEDS_REVIEW"), STEPS, 5.0, now=0.0)
    assert (fresh.weight, fresh.phase) == (0.0, "idle")
    with pytest.raises(domain.NotAdmitted):
        domain.manual_promote(held, None)


def test_allows_only_pass_for_exactly_that_release() -> None:
    assert domain.allows(_decision("PASS"), "r2")
    assert not domain.allows(_decision("PASS", release="r3"), "r2")
    assert not any(domain.allows(_decision(v), "r2") for v in ("NEEDS_REVIEW", "BLOCK", "ERROR"))
    assert not domain.allows(None, "r2")


def test_reject_after_promotion_rolls_back_to_previous_stable() -> None:
    r = domain.on_decision(_canary(), _decision("PASS"), STEPS, 5.0, now=0.0)
    r = domain.manual_promote(r, None)
    assert (r.stable.release, r.previous.release) == ("r2", "r1")
    back = domain.on_decision(r, _decision("BLOCK", id_="rej"), STEPS, 5.0, now=1.0, decisions=_ok(r))
    assert (back.stable.release, back.phase, back.weight, back.decision_id) == ("r1", "aborted", 0.0, "rej")
    assert domain.choose(back, "anyone", salt="")[1].release == "r1"


def test_break_glass_promotes_and_a_canary_override_stays_until_cleared() -> None:
    glass = domain.Override(release="r2", action="promote", actor="apikey:x(admin@t/a)", reason="incident", at=1.0)
    with pytest.raises(domain.NotAdmitted, match="no verified gate decision"):
        domain.manual_promote(_canary(), None)
    r = domain.manual_promote(_canary(), glass)
    # The promotion ends the rollout the statement was for: recorded in the reason, not kept to cover a later one.
    assert r.phase == "promoted" and r.override is None and "BREAK-GLASS by apikey:x(admin@t/a): incident" in r.reason
    with pytest.raises(InvalidRollout, match="no break-glass override to clear"):
        domain.clear_override(r)
    # Verified against the canary read before the change; a PATCH in between put another release there.
    other = msgspec.structs.replace(_canary(), canary=domain.Target(release="r3"))
    with pytest.raises(domain.NotAdmitted, match="override is for 'r2', but the canary of 'd' is now 'r3'"):
        domain.manual_promote(other, glass)
    canary_glass = msgspec.structs.replace(glass, action="canary", weight=30.0)
    held = domain.start_canary(domain.default_route("d"), CanaryRequest(
        stable_release="r1", canary_release="r2", initial_weight=30), stable=STABLE, canary=CANARY,
        first_step=10.0, override=canary_glass)
    assert held.weight == 30.0
    # The weight is the statement's: none asked is it, another is refused, and nothing raises it past it.
    assert domain.start_canary(domain.default_route("d"), CanaryRequest(stable_release="r1", canary_release="r2"),
                               stable=STABLE, canary=CANARY, first_step=10.0, override=canary_glass).weight == 30.0
    with pytest.raises(domain.OverrideExceeded, match="lets 'r2' take 30% of 'd', not the 50% asked"):
        domain.start_canary(domain.default_route("d"), CanaryRequest(
            stable_release="r1", canary_release="r2", initial_weight=50), stable=STABLE, canary=CANARY,
            first_step=10.0, override=canary_glass)
    with pytest.raises(domain.NotAdmitted, match="lets it take at most 30%"):
        progress.set_weight(held, 31, "ops")
    assert progress.set_weight(held, 20, "ops").weight == 20.0
    cleared = domain.clear_override(held)
    assert (cleared.weight, cleared.override) == (0.0, None)


def test_a_break_glass_promote_is_kept_on_the_route_until_the_gate_admits_the_release_or_it_serves_no_more() -> None:
    # Probe p28 (note): the promote kept its statement nowhere in the route, so `lockgate status` said "no break-glass
    # overrides" while a never-gated release served all traffic.
    glass = domain.Override(release="r2", action="promote", actor="carol", reason="incident", at=1.0)
    r = domain.manual_promote(msgspec.structs.replace(_canary(), good=[STABLE]), glass)
    assert (r.stable.release, r.override, r.glass_stable) == ("r2", None, glass)
    # A decision that does not admit r2, or one about another release, leaves it; a PASS of r2 ends it, once.
    assert domain.on_decision(r, _decision("PASS", "r1", "p1"), STEPS, 5.0, now=1.0) is None
    assert domain.hold_stable(r, None) is None
    admitted = domain.on_decision(r, _decision("PASS", "r2", "p2"), STEPS, 5.0, now=1.0)
    assert admitted.glass_stable is None and admitted.stable.release == "r2"
    assert "break-glass promote of r2 by carol ended: gate decision p2 admits it" in admitted.reason
    assert domain.on_decision(admitted, _decision("PASS", "r2", "p3"), STEPS, 5.0, now=2.0) is None
    # The router's periodic check of the stable ends it alike (a decision whose message it missed).
    assert domain.hold_stable(r, _decision("PASS", "r2", "p2")).glass_stable is None
    # Rolled back (a BLOCK made since): r2 serves no more, and nothing is shown for it.
    back = domain.on_decision(r, _decision("BLOCK", "r2", "b1"), STEPS, 5.0, now=1.0, decisions=_ok(r))
    assert (back.stable.release, back.glass_stable) == ("r1", None)


def test_decisions_for_other_releases_redeliveries_and_terminal_states_are_ignored() -> None:
    r = _canary()
    assert domain.on_decision(r, _decision("BLOCK", release="other"), STEPS, 5.0, now=0.0) is None
    d = _decision("PASS", id_="dec-1")
    progressed = domain.on_decision(r, d, STEPS, 5.0, now=0.0)
    assert domain.on_decision(progressed, d, STEPS, 5.0, now=0.0) is None
    aborted = domain.on_decision(progressed, _decision("BLOCK"), STEPS, 5.0, now=0.0)
    assert domain.on_decision(aborted, _decision("PASS"), STEPS, 5.0, now=0.0) is None


def test_manual_abort_and_promote_need_a_canary() -> None:
    with pytest.raises(InvalidRollout):
        domain.abort(domain.default_route("d"), "x")
    assert domain.promote(_canary(), "by operator").stable.release == "r2"


# A break-glass override covers the one rollout it was signed for.
GLASS = domain.Override(release="r2", action="canary", actor="boss", reason="incident 7", at=1.0, weight=30.0)


def _glassed() -> Route:
    """A canary of r2 given 30% by an admin's break-glass override (no decision allows r2)."""
    return domain.start_canary(domain.default_route("d"), CanaryRequest(
        stable_release="r1", canary_release="r2", initial_weight=30), stable=STABLE, canary=CANARY,
        first_step=10.0, override=GLASS)


@pytest.mark.parametrize(("end", "why"), [
    (lambda r: domain.abort(r, "by operator"), "its rollout was aborted"),
    (lambda r: domain.promote(r, "by operator"), "its rollout was promoted"),
    # the stable the canary started from is BLOCKed: back on the known-good before it, the canary with it
    (lambda r: domain.on_decision(msgspec.structs.replace(r, good=[Target(release="r0"), STABLE]),
                                  _decision("BLOCK", "r1", "b1"), STEPS, 5.0, now=1.0,
                                  decisions={"r0": _decision("PASS", "r0")}), "its rollout was rolled back"),
    (lambda r: domain.undo_to(msgspec.structs.replace(r, good=[Target(release="r0"), STABLE],
                                                      stable=Target(release="r9")), "r0",
                              _decision("PASS", "r0"), "ops"), "its rollout was undone"),
    (lambda r: domain.start_canary(r, CanaryRequest(stable_release="r1", canary_release="r2"), stable=STABLE,
                                   canary=CANARY, first_step=10.0), "a new rollout started without one"),
])
def test_a_break_glass_override_ends_with_its_rollout(end: Any, why: str) -> None:
    r = _glassed()
    assert (r.override, r.weight) == (GLASS, 30.0)
    ended = end(r)
    assert ended.override is None
    assert f"break-glass override by boss for r2 ended: {why}" in ended.reason


def test_an_override_of_an_earlier_rollout_never_covers_a_later_one_of_the_same_release() -> None:
    # Break glass for r2, abort; a later PUT of r2 without a statement: it waits at 0%, and neither a weight nor
    # a PATCH back to it is covered (before, the old override was carried into the new rollout and covered r2).
    aborted = domain.abort(_glassed(), "by operator")
    again = domain.start_canary(aborted, CanaryRequest(stable_release="r1", canary_release="r2"), stable=STABLE,
                                canary=CANARY, first_step=10.0)
    assert (again.override, again.weight) == (None, 0.0)
    live = msgspec.structs.replace(again, phase="progressing")
    with pytest.raises(domain.NotAdmitted, match="no verified gate decision"):
        progress.set_weight(live, 50, "ops")
    moved = progress.replace_canary(msgspec.structs.replace(live, canary=Target(release="r3")), CANARY, None, 5.0,
                                   60.0)
    assert (moved.weight, moved.phase) == (0.0, "idle")
    # A new statement for the new rollout is its own, and says the old one ended.
    fresh = msgspec.structs.replace(GLASS, reason="incident 8", at=2.0)
    renewed = domain.start_canary(_glassed(), CanaryRequest(stable_release="r1", canary_release="r2",
                                                            initial_weight=30), stable=STABLE, canary=CANARY,
                                  first_step=10.0, override=fresh)
    assert renewed.override == fresh and "ended: a new rollout started with its own" in renewed.reason


def test_a_retry_of_an_aborted_rollout_is_not_covered_by_an_override_left_in_its_route() -> None:
    # A route persisted before overrides ended with their rollout may still hold one on an aborted rollout.
    stale = msgspec.structs.replace(domain.abort(_glassed(), "x"), override=GLASS)
    retried = progress.retry(stale, "ops", 10.0)
    assert (retried.override, retried.weight, retried.phase) == (None, 0.0, "idle")
    assert "ended: a retry is a new attempt" in retried.reason


def test_a_block_ends_the_override_once_and_says_so() -> None:
    blocked = domain.on_decision(_glassed(), _decision("BLOCK", id_="b1"), STEPS, 5.0, now=1.0)
    assert blocked is not None and (blocked.override, blocked.phase, blocked.weight) == (None, "aborted", 0.0)
    assert blocked.reason.count("break-glass override by boss") == 1
    assert blocked.reason.endswith("break-glass override by boss ended by the gate's BLOCK")


def test_a_deployment_serves_the_releases_of_one_app() -> None:
    shop, lab, legacy = Target(release="r1", app="shop"), Target(release="x", app="lab"), Target(release="old")
    serving = Route(deployment="chat", stable=shop)
    domain.same_app(serving, Target(release="r2", app="shop"))
    with pytest.raises(InvalidRollout, match="release 'x' is of app 'lab', but 'chat' serves app 'shop' \\(r1\\)"):
        domain.same_app(serving, Target(release="r2", app="shop"), lab)
    # No stable yet: the releases named together must agree with each other.
    with pytest.raises(InvalidRollout, match="release 'x' is of app 'lab'"):
        domain.same_app(Route(deployment="chat", stable=Target(release="")), shop, lab)
    # An app nobody recorded (a route stored before apps were) constrains nothing.
    domain.same_app(Route(deployment="chat", stable=legacy), lab)
    with pytest.raises(InvalidRollout):
        domain.start_canary(serving, CanaryRequest(stable_release="r1", canary_release="x"), stable=shop, canary=lab,
                            first_step=10.0)


def test_a_spent_statement_is_refused_until_it_could_no_longer_verify() -> None:
    glass = domain.Override(release="r2", action="canary", actor="boss", reason="x", at=1000.0, signature="sig-a")
    route = Route(deployment="d", stable=Target(release="r1"))
    spent = domain.spend(route, glass, now=1001.0)
    route = msgspec.structs.replace(route, spent=spent)
    with pytest.raises(domain.OverrideReplayed, match="used already"):
        domain.spend(route, glass, now=1500.0)
    other = msgspec.structs.replace(glass, signature="sig-b")
    assert len(domain.spend(route, other, now=1500.0)) == 2
    # Past its life (signing time + 10 min + skew) it is forgotten: the signature check refuses it by then.
    assert domain.spend(route, other, now=1000.0 + domain.STATEMENT_LIFE_S + 1) == [
        (domain.spend(Route(deployment="d", stable=Target(release="r1")), other, 0.0)[0][0],
         1000.0 + domain.STATEMENT_LIFE_S)]


def test_readmit_takes_back_a_canary_whose_admitting_decision_no_longer_verifies() -> None:
    admitted = domain.on_decision(_canary(weight=0), _decision("PASS", id_="p1"), STEPS, 5.0, now=1.0)
    assert admitted is not None and (admitted.weight, admitted.admitted) == (10.0, "p1")
    assert domain.readmit(admitted, _decision("PASS", id_="p1")) is None  # still verifies
    assert domain.readmit(admitted, _decision("PASS", id_="p2")) is None  # a newer PASS allows it too
    gone = domain.readmit(admitted, None, "signed by revoked key id 'k1'")
    assert gone is not None and (gone.weight, gone.phase, gone.admitted, gone.decision_id) == (0.0, "idle", "", "")
    assert gone.reason == ("canary r2 back to 0%: admitted by gate decision p1, but it no longer verifies (signed by "
                           "revoked key id 'k1'); it waits for a decision a trusted key signed")
    held = domain.readmit(admitted, _decision("NEEDS_REVIEW", id_="n1"))
    assert held is not None and held.weight == 0.0 and "the current decision n1 is NEEDS_REVIEW" in held.reason
    # Nothing to check: a canary not admitted yet (one a break-glass override holds at its weight too), a finished
    # rollout.
    glass = domain.Override(release="r2", action="canary", actor="boss", reason="incident", at=1.0, weight=5.0)
    assert domain.readmit(_canary(weight=0), None) is None
    assert domain.readmit(msgspec.structs.replace(_canary(weight=0), override=glass, weight=5.0), None) is None
    assert domain.readmit(domain.abort(admitted, "x"), None) is None
    # A break-glass canary a decision admitted past its signed weight rests on that decision: back to 0%, its
    # override still covering it at no more than that weight. Before (probe p64 F1), it was never checked again.
    covered = msgspec.structs.replace(admitted, override=glass)
    assert domain.rests_on_admission(covered)
    gone = domain.readmit(covered, None, "signed by revoked key id 'k1'")
    assert gone is not None and (gone.weight, gone.phase, gone.admitted, gone.override) == (0.0, "idle", "", glass)
    assert gone.reason.endswith("a trusted key signed; the break-glass override by boss covers it still, at no more "
                                "than 5%")


def test_a_replica_cut_off_from_the_bus_serves_the_stable_release_only() -> None:
    from lockgate.services.router.strategy import HeaderRoute

    live = msgspec.structs.replace(_canary(weight=50, phase="progressing"),
                                   header_route=HeaderRoute(header="x-lockgate-canary", value="always"))
    tagged = {"x-lockgate-canary": "always"}
    assert domain.choose(live, "anyone", tagged, salt="", role="admin")[1] == CANARY
    cut = domain.stable_only(live)
    assert {domain.choose(cut, f"user-{i}", tagged, salt="", role="admin")[1].release for i in range(200)} == {"r1"}
    assert cut.canary is None  # nothing to mirror to either (Shadow.maybe_mirror)


def test_another_spelling_of_a_spent_signature_is_the_same_statement() -> None:
    # Found by a probe: base64 decoding ignores the unused bits of the last character before `==`, so 16 spellings
    # of one Ed25519 signature verify; each was a statement of its own, good once, so one statement served 16 times.
    import base64

    raw = bytes(range(64))
    text = base64.b64encode(raw).decode()
    assert text.endswith("==")
    respelled = text[:-3] + chr(ord(text[-3]) + 1) + "=="
    assert base64.b64decode(respelled, validate=True) == raw and respelled != text
    glass = domain.Override(release="r2", action="canary", actor="boss", reason="x", at=1000.0, signature=text)
    route = msgspec.structs.replace(Route(deployment="d", stable=Target(release="r1")),
                                    spent=domain.spend(Route(deployment="d", stable=Target(release="r1")), glass, 1001.0))
    with pytest.raises(domain.OverrideReplayed):
        domain.spend(route, msgspec.structs.replace(glass, signature=respelled), 1002.0)


def test_each_change_names_the_rollout_attempt_it_is_part_of_and_none_after_the_attempt_ended() -> None:
    # Before (probe p23 F9): RolloutState named no attempt, so OpenLineage keyed a rollout's run by deployment and
    # release: two canaries of one release were one run, and a rollback after promotion ended the promoted run again.
    first = msgspec.structs.replace(_canary(weight=0), started_at=1000.5)
    steps = [domain.to_state(first, domain.default_route("d"))]
    at10 = domain.on_decision(first, _decision("PASS", id_="p1"), STEPS, 60, now=1001)
    assert at10 is not None
    promoted = domain.promote(at10, "held")
    back = domain.rollback(promoted, "gate BLOCK after promotion", decision_id="b1",
                           decisions={"r1": _decision("PASS", release="r1")})
    steps += [domain.to_state(at10, first), domain.to_state(promoted, at10), domain.to_state(back, promoted)]
    assert [(s.phase, s.started_at, s.began) for s in steps] == [
        ("idle", 1000.5, True), ("progressing", 1000.5, False), ("promoted", 1000.5, False), ("aborted", 0.0, False)]
    again = msgspec.structs.replace(domain.start_canary(back, CanaryRequest(stable_release="r1", canary_release="r2"),
                                                       stable=STABLE, canary=CANARY, first_step=STEPS[0]),
                                    started_at=2000.25)
    aborted = domain.abort(again, "gate BLOCK")
    assert (domain.to_state(again, back).started_at, domain.to_state(again, back).began) == (2000.25, True)
    assert (domain.to_state(aborted, again).started_at, domain.to_state(aborted, again).began) == (2000.25, False)
    retried = progress.retry(aborted, "ann", now=3000.0)  # a retry is a new attempt of the same rollout
    assert (domain.to_state(retried, aborted).started_at, domain.to_state(retried, aborted).began) == (3000.0, True)


def test_a_promoted_route_names_its_promotion_in_every_announcement() -> None:
    # The drift monitor restarts its windows once per promotion: a later change of the promoted route (a BLOCK of
    # an old release, an analysis's deadline) repeats `promoted_at` (before, probe p69 F1, each restarted them).
    promoted = msgspec.structs.replace(domain.promote(_canary(weight=10), "held"), promoted_at=1234.5)
    again = msgspec.structs.replace(promoted, reason="gate BLOCK of known-good r0", version=promoted.version + 1)
    assert domain.to_state(promoted).promoted_at == domain.to_state(again, promoted).promoted_at == 1234.5
    assert domain.to_state(_canary(weight=10)).promoted_at == 0.0
    # A first release is no rollout; a route restored already finished begins nothing.
    released = domain.first_release(domain.default_route("d"), STABLE, _decision("PASS", release="r1"))
    assert domain.to_state(released, None).started_at == 0.0
    assert domain.attempt(promoted, None) == (0.0, False)
