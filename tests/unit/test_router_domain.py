"""Router domain: sticky split, canary start validation and the rollout state machine."""

from __future__ import annotations

import msgspec
import pytest

from lockgate.contracts import GateDecided
from lockgate.services.router import domain
from lockgate.services.router.domain import CanaryRequest, InvalidRollout, Route, Target

pytestmark = pytest.mark.timeout(30)

STEPS = domain.normalize_steps((10, 25, 50, 100))
UP = "http://up/v1"


def _canary(weight: float = 10, phase: str = "idle") -> Route:
    base = domain.default_route("d", UP)
    r = domain.start_canary(base, CanaryRequest(stable_release="r1", canary_release="r2", initial_weight=weight),
                            default_canary_upstream="http://canary/v1", first_step=STEPS[0])
    return msgspec.structs.replace(r, phase=phase)


def _decision(verdict: str, release: str = "r2", id_: str | None = None) -> GateDecided:
    kw = {"id": id_} if id_ else {}
    return GateDecided(release=release, decision=verdict, rules=[], reason="because", **kw)


@pytest.mark.parametrize("weight", [0, 1, 10, 25, 50, 90, 100])
def test_split_matches_weight(weight: float) -> None:
    route = msgspec.structs.replace(_canary(), weight=float(weight))
    n = 20_000
    canary = sum(domain.choose(route, f"user-{i}")[0] == "canary" for i in range(n))
    assert abs(canary / n - weight / 100) < 0.015


def test_split_is_sticky_and_monotone() -> None:
    low = msgspec.structs.replace(_canary(), weight=10.0)
    high = msgspec.structs.replace(low, weight=50.0)
    users = [f"u{i}" for i in range(2000)]
    first = [domain.choose(low, u)[0] for u in users]
    assert first == [domain.choose(low, u)[0] for u in users]
    # raising the weight only moves stable users to canary, never back
    assert all(domain.choose(high, u)[0] == "canary" for u, v in zip(users, first, strict=True) if v == "canary")


def test_no_canary_routes_stable() -> None:
    route = domain.default_route("d", UP)
    assert domain.choose(route, "x") == ("stable", route.stable)


def test_user_hash_is_pseudonymous() -> None:
    assert domain.user_hash("alice") != "alice" and len(domain.user_hash("alice")) == 16
    assert domain.user_hash("") == ""


def test_normalize_steps_ends_at_100() -> None:
    assert domain.normalize_steps((50, 10, 10, 0, 150)) == (10.0, 50.0, 100.0)


def test_start_canary_defaults() -> None:
    r = _canary(weight=10)
    assert r.stable == Target(release="r1", upstream=UP)
    assert r.canary == Target(release="r2", upstream="http://canary/v1")
    assert (r.weight, r.phase, r.version) == (10.0, "idle", 1)


@pytest.mark.parametrize(
    ("body", "part"),
    [
        ({"stable_release": "a", "canary_release": "a"}, "differ"),
        # Blank and wildcard names break the name grammar (they once shared KV keys with others).
        ({"stable_release": "a", "canary_release": " "}, r"at `\$.canary_release`"),
        ({"stable_release": "a*b", "canary_release": "b"}, r"at `\$.stable_release`"),
        ({"stable_release": "a", "canary_release": "b", "initial_weight": 101}, r"<= 100.0 - at `\$.initial_weight`"),
        ({"stable_release": "a", "canary_release": "b", "canary_upstream": "ftp://x"},
         r"matching regex '\^https\?://' - at `\$.canary_upstream`"),
    ],
)
def test_bad_canary_requests_are_refused_when_decoded(body: dict, part: str) -> None:
    with pytest.raises(InvalidRollout, match=part):
        domain.decode_canary(msgspec.json.encode(body))


def test_pass_progresses_step_by_step_then_promotes() -> None:
    r = domain.on_decision(_canary(), _decision("PASS"), STEPS, 5.0, now=100.0)
    assert (r.phase, r.weight, r.step, r.next_step_at) == ("progressing", 25.0, 2, 105.0)
    assert domain.tick(r, STEPS, 5.0, now=104.9) is None  # not due yet
    weights = [r.weight]
    now = 105.0
    while r.phase == "progressing":
        r = domain.tick(r, STEPS, 5.0, now=now)
        weights.append(r.weight)
        now += 5.0
    assert weights == [25.0, 50.0, 100.0, 0.0]
    assert r.phase == "promoted" and r.stable.release == "r2"
    assert domain.choose(r, "anyone") == ("stable", r.stable)
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


def test_needs_review_holds_a_progressing_canary() -> None:
    progressing = domain.on_decision(_canary(), _decision("PASS"), STEPS, 5.0, now=0.0)
    held = domain.on_decision(progressing, _decision("NEEDS_REVIEW"), STEPS, 5.0, now=1.0)
    assert (held.phase, held.weight) == ("idle", 25.0)
    assert domain.tick(held, STEPS, 5.0, now=1e9) is None
    assert domain.on_decision(_canary(), _decision("NEEDS_REVIEW"), STEPS, 5.0, now=0.0) is None


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
        domain.abort(domain.default_route("d", UP), "x")
    assert domain.promote(_canary(), "by operator").stable.release == "r2"
