"""A break-glass canary that a gate decision then admitted past its signed weight, through the admin API on the real
nats-server, chDB and the simulator: from then on it rests on that decision, checked again before whatever raises
or promotes it as any admitted canary is; its override holds it at no more than its signed weight once that decision
no longer allows it. Before (probe p64 F1), the override exempted it from every check: with the key of its only PASS
revoked, it stepped on to 100% and was promoted, by the timer, blue-green auto-promotion or an operator, and a BLOCK
stored only in KV never aborted it."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from lockgate.config import Settings
from lockgate.contracts import GateDecided
from lockgate.identity import sign_override
from lockgate.server.apikeys import KeyStore
from lockgate.signing import Signer, revoke_key, trust_file_path, trust_key
from tests.helpers import gate_decided, judged, person, store_decision
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_strategies import _releases

router, http, keys, signer = analysis_tests.router, analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)
DEPLOYMENT = "/lockgate/v1/deployments/chat"
STEPS = {"steps": [50, 100], "interval_s": 3600}


@pytest.fixture
def boss(settings: Settings) -> Any:
    """The admin who breaks glass, trusted before the router starts (asked for before `router`): a trust file
    written later makes the router's trust watch read every live canary's decision again, at a moment of its own,
    and so see a decision meant for the path under test first."""
    return person(settings, "boss", "admin")


async def _admitted_glass_canary(router: Any, http: aiohttp.ClientSession, boss: Any, by: Signer,
                                 strategy: dict[str, Any], weight: float = 10.0) -> GateDecided:
    """`bad` (never gated before) put on chat by boss's break-glass statement at `weight`%, then admitted past it by
    a PASS `by` signed (its rollout progressing); that PASS."""
    glass = sign_override(boss, deployment="chat", release="bad", action="canary", reason="incident 7",
                          at=int(time.time()), weight=weight)
    body = {"stable_release": "r1", "canary_release": "bad", "strategy": strategy, "break_glass": glass}
    async with http.put(f"{router.url}{DEPLOYMENT}", json=body) as resp:
        assert resp.status == 200, await resp.text()
    bus = router.ctx.bus
    passed = by.sign(GateDecided(release="bad", rules=[], decision="PASS", artifacts=await judged(bus, "bad")))
    await gate_decided(bus, passed)
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "progressing", timeout=10)
    route = router.rollouts.route("chat")
    assert route.admitted == passed.id and route.override is not None, route.reason
    return passed


async def _superseded_in_kv(router: Any, signer: Signer, decision: str = "NEEDS_REVIEW") -> GateDecided:
    """`bad`'s current decision made `decision` in KV alone: its message lost (probe p19 F2), and the periodic re-read
    of live canaries put off, so only the path under test can see it."""
    router.rollouts.stable_check_s = 3600.0
    newer = signer.sign(GateDecided(release="bad", rules=[], decision=decision, reason="toxicity"))
    await store_decision(router.ctx.bus, newer)
    return newer


def _operator(router: Any) -> dict[str, str]:
    key, _ = KeyStore(router.ctx.settings.home).create("default", "ops", "operator", "on call")
    return {"Authorization": f"Bearer {key}"}


async def test_revoking_the_key_of_the_pass_that_admitted_a_break_glass_canary_takes_it_back_to_zero(
        boss: Any, router: Any, http: aiohttp.ClientSession) -> None:
    # Before: it stayed at 50% progressing, and an operator's set-weight 100 and promote answered 200.
    s = router.ctx.settings
    leaked = Signer.generate()  # a gatekeeper key, later found leaked
    trust_key(trust_file_path(s), leaked.public)
    passed = await _admitted_glass_canary(router, http, boss, leaked, STEPS)
    assert router.rollouts.route("chat").weight == 50.0
    revoke_key(trust_file_path(s), leaked.key_id)  # as `lockgate gate revoke` writes it: nothing else is told
    await router.rollouts.wait_for(lambda r: r["chat"].weight == 0.0, timeout=10)
    route = router.rollouts.route("chat")
    assert (route.phase, route.admitted, route.stable.release) == ("idle", "", "r1"), route.reason
    assert f"canary bad back to 0%: admitted by gate decision {passed.id}, but it no longer verifies" in route.reason
    assert "the break-glass override by boss covers it still, at no more than 10%" in route.reason
    assert set(await _releases(http, router, 40)) == {"r1"}
    auth = _operator(router)
    async with http.post(f"{router.url}{DEPLOYMENT}/set-weight", json={"weight": 100}, headers=auth) as resp:
        refused = await resp.json()
    assert resp.status == 409 and refused["error"]["code"] == "not_admitted", refused
    assert "the break-glass override by boss lets it take at most 10%" in refused["error"]["message"]
    async with http.post(f"{router.url}{DEPLOYMENT}/promote", headers=auth) as resp:
        refused = await resp.json()
    assert resp.status == 409 and refused["error"]["code"] == "not_admitted", refused
    # What the admin signed for still holds: the canary may have its 10% again, and no more.
    async with http.post(f"{router.url}{DEPLOYMENT}/set-weight", json={"weight": 10}, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
    route = router.rollouts.route("chat")
    assert (route.weight, route.phase, route.stable.release) == (10.0, "idle", "r1"), route.reason


async def test_a_block_stored_only_in_kv_aborts_a_break_glass_canary_a_pass_admitted(
        boss: Any, router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # The periodic re-read of live canaries (probe p19 F2) is all that sees a BLOCK whose message was lost. Before, it
    # skipped the canary its override covered: 50% of requests went to the BLOCKed release for good.
    await _admitted_glass_canary(router, http, boss, signer, STEPS)
    newer = signer.sign(GateDecided(release="bad", rules=[], decision="BLOCK", reason="toxicity"))
    await store_decision(router.ctx.bus, newer)
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "aborted", timeout=3 * router.rollouts.stable_check_s)
    route = router.rollouts.route("chat")
    assert (route.weight, route.override, route.stable.release) == (0.0, None, "r1"), route.reason
    assert "break-glass override by boss ended by the gate's BLOCK" in route.reason
    assert set(await _releases(http, router, 40)) == {"r1"}


@pytest.mark.parametrize(("method", "action", "body"), [("POST", "/set-weight", {"weight": 100}),
                                                        ("PATCH", "", {"weight": 100}),
                                                        ("POST", "/promote", None),
                                                        ("POST", "/resume", None)])
async def test_an_operator_cannot_raise_or_promote_a_break_glass_canary_its_decision_no_longer_allows(
        boss: Any, router: Any, http: aiohttp.ClientSession, signer: Signer, method: str, action: str,
        body: dict[str, Any] | None) -> None:
    # Before: 200, on the admission the route had cached; set-weight and promote put `bad` on every request.
    await _admitted_glass_canary(router, http, boss, signer, STEPS)
    auth = _operator(router)
    if action == "/resume":
        async with http.post(f"{router.url}{DEPLOYMENT}/pause", headers=auth) as resp:  # holding needs no check
            assert resp.status == 200, await resp.text()
    newer = await _superseded_in_kv(router, signer)
    async with http.request(method, f"{router.url}{DEPLOYMENT}{action}", json=body, headers=auth) as resp:
        refused = await resp.json()
    assert resp.status == 409 and refused["error"]["code"] == "not_admitted", (action, refused)
    assert f"the current decision {newer.id} is NEEDS_REVIEW" in refused["error"]["message"]
    route = router.rollouts.route("chat")
    assert (route.weight, route.phase, route.admitted, route.stable.release) == (0.0, "idle", "", "r1"), route.reason
    assert set(await _releases(http, router, 40)) == {"r1"}


async def test_the_timer_does_not_step_a_break_glass_canary_its_decision_no_longer_allows(
        boss: Any, router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Before: the step clock alone took it to 100% and promoted it.
    await _admitted_glass_canary(router, http, boss, signer, {"steps": [50, 100], "interval_s": 2})
    await _superseded_in_kv(router, signer)
    await router.rollouts.wait_for(lambda r: (r["chat"].phase, r["chat"].weight) != ("progressing", 50.0), timeout=10)
    route = router.rollouts.route("chat")
    assert (route.weight, route.phase, route.stable.release) == (0.0, "idle", "r1"), route.reason
    assert "is NEEDS_REVIEW" in route.reason


async def test_a_blue_green_break_glass_preview_its_decision_no_longer_allows_is_not_promoted(
        boss: Any, router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Before: its auto-promotion gave it all traffic when due.
    await _admitted_glass_canary(router, http, boss, signer, {"blue_green": {"auto_promotion_s": 3}}, weight=1.0)
    await _superseded_in_kv(router, signer)
    await router.rollouts.wait_for(lambda r: r["chat"].phase != "progressing", timeout=10)
    route = router.rollouts.route("chat")
    assert (route.phase, route.stable.release, route.canary.release) == ("idle", "r1", "bad"), route.reason
    assert "is NEEDS_REVIEW" in route.reason
    assert set(await _releases(http, router, 40)) == {"r1"}
