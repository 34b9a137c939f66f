"""A PATCH restarts or retimes a live rollout's clocks as the stored strategy says (admin API, the real router on
nats-server, chDB and the simulator): a canary or blue-green preview swapped in is timed from when it took the place,
not by its predecessor's clocks; a new `interval_s` or `auto_promotion_s` times the step or promotion under way
(probe p57 F1, F2), a changed pause at the step held at the pause (probe p58 F1). Each clock is read from the route the
PATCH answers, never waited for."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from lockgate.contracts import GateDecided
from lockgate.signing import Signer
from tests.helpers import judged, store_decision
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import _pass, _start

router, http, keys, signer = analysis_tests.router, analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)
DEPLOYMENT = "/lockgate/v1/deployments/chat"
HOUR = 3600.0
BLUE_GREEN = {"interval_s": HOUR, "blue_green": {"auto_promotion_s": HOUR, "scale_down_delay_s": 600}}


async def _patch(http: aiohttp.ClientSession, router: Any, body: dict[str, Any]) -> dict[str, Any]:
    async with http.patch(f"{router.url}{DEPLOYMENT}", json=body,
                          headers={"content-type": "application/merge-patch+json"}) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
        return answer


@pytest.mark.parametrize(("strategy", "clock", "after"), [
    ({"steps": [100], "interval_s": HOUR}, "next_step_at", HOUR),  # at 100%: the clock that promotes it
    ({"steps": [{"pause": {"duration_s": HOUR}}, 100], "interval_s": 2 * HOUR}, "resume_at", HOUR),  # a timed pause
    (BLUE_GREEN, "promote_at", HOUR),  # a preview's auto-promotion
])
async def test_a_canary_swapped_in_by_patch_is_timed_from_when_it_took_the_place(
        router: Any, http: aiohttp.ClientSession, signer: Signer, strategy: dict[str, Any], clock: str,
        after: float) -> None:
    # Before (probe p57 F1) the new release kept its predecessor's clocks: a preview swapped in 2 s before the old
    # one's auto-promotion was promoted 2 s after it went live, a canary at 100% after 1 s of its own interval.
    await _start(http, router, "same", strategy)
    await _pass(router, signer, "same")
    await store_decision(router.ctx.bus, signer.sign(GateDecided(
        release="echo", rules=[], decision="PASS", artifacts=await judged(router.ctx.bus, "echo"))))
    old = router.rollouts.route("chat")
    assert getattr(old, clock) > 0, old
    swapped = time.time()  # after the old canary's clocks were set
    route = await _patch(http, router, {"canary_release": "echo"})
    assert (route["canary"]["release"], route["phase"]) == ("echo", "progressing"), route
    assert route[clock] >= swapped + after, (clock, route[clock] - swapped, route["reason"])
    assert route["next_step_at"] >= swapped + strategy["interval_s"], route
    if clock == "promote_at":  # its reason says when, as a preview going live does
        assert route["live_at"] >= swapped and route["promote_at"] == route["live_at"] + HOUR, route
        assert "preview echo live by header" in route["reason"] and "promotes itself at" in route["reason"], route


async def test_a_patch_of_auto_promotion_times_the_live_preview_from_when_it_went_live(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Before (probe p57 F2) the route kept its promotion time: a preview patched to promote by hand (null) promoted
    # itself at the old time all the same, its reason still saying so.
    await _start(http, router, "same", BLUE_GREEN)
    await _pass(router, signer, "same")
    live = router.rollouts.route("chat")
    assert live.promote_at > 0, live
    by_hand = await _patch(http, router, {"strategy": {"blue_green": {"auto_promotion_s": None}}})
    assert by_hand["promote_at"] == 0.0, by_hand
    assert live.promote_at == live.live_at + HOUR, live
    assert by_hand["reason"].endswith("preview same: promote by hand (lockgate rollout promote)"), by_hand
    assert router.rollouts.route("chat").promote_at == 0.0
    for delay in (2 * HOUR, HOUR / 2):  # none -> a value, then a changed one: from when it went live, not from now
        timed = await _patch(http, router, {"strategy": {"blue_green": {"auto_promotion_s": delay}}})
        assert (timed["live_at"], timed["promote_at"]) == (live.live_at, live.live_at + delay), timed
        assert "preview same: promotes itself at" in timed["reason"], timed


async def test_a_patch_of_the_interval_times_the_step_under_way_from_when_it_began(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Before, the step under way kept the old interval's due time whatever the stored strategy said.
    await _start(http, router, "same", {"steps": [10, 50, 100], "interval_s": HOUR})
    await _pass(router, signer, "same")
    began = router.rollouts.route("chat").next_step_at - HOUR
    longer = await _patch(http, router, {"strategy": {"interval_s": 2 * HOUR}})
    assert (longer["weight"], longer["step"]) == (10.0, 1), longer
    assert longer["next_step_at"] == pytest.approx(began + 2 * HOUR, abs=1e-3), longer
    shorter = await _patch(http, router, {"strategy": {"interval_s": HOUR / 4}})
    assert shorter["next_step_at"] == pytest.approx(began + HOUR / 4, abs=1e-3), shorter


async def test_a_patch_of_the_pause_held_at_times_it_from_when_it_began_or_leaves_it_to_an_approval(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Before (probe p58 F1) the route kept the old pause's end: a timed pause patched to wait for approval ended by
    # itself at the old time and the canary went on to 100% with no approval; a changed duration was not retimed.
    rest = [50, 100]
    await _start(http, router, "same", {"steps": [{"pause": {"duration_s": HOUR}}, *rest], "interval_s": HOUR})
    await _pass(router, signer, "same")
    timed = router.rollouts.route("chat")
    began = timed.step_paused_at
    assert (timed.step, timed.step_pause, timed.resume_at) == (1, True, began + HOUR), timed
    untimed = await _patch(http, router, {"strategy": {"steps": [{"pause": {}}, *rest]}})
    assert (untimed["step"], untimed["paused"], untimed["step_pause"]) == (1, True, True), untimed
    assert untimed["resume_at"] == 0.0 and "paused until approved" in untimed["reason"], untimed
    for duration in (2 * HOUR, HOUR / 2):  # from when the pause began, not from the PATCH
        longer = await _patch(http, router, {"strategy": {"steps": [{"pause": {"duration_s": duration}}, *rest]}})
        assert (longer["step_paused_at"], longer["resume_at"]) == (began, began + duration), longer
    weight = await _patch(http, router, {"strategy": {"steps": [30, *rest]}})  # no pause at step 1 now
    assert (weight["weight"], weight["step"], weight["paused"], weight["resume_at"]) == (0.0, 1, True, 0.0), weight
    assert weight["reason"].endswith("step 1/3 is no pause now: held at 0% until approved (lockgate rollout "
                                     "approve)"), weight
    async with http.post(f"{router.url}{DEPLOYMENT}/approve", json={"step": 1, "canary": "same",
                                                                    "started_at": timed.started_at}) as resp:
        approved = await resp.json()
        assert resp.status == 200, approved
    assert (approved["weight"], approved["step"], approved["paused"]) == (50.0, 2, False), approved
