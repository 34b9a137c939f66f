"""Enforcement of the admission invariant through the admin API, on the real nats-server, chDB and the
simulator: a canary that no verified decision allows (and no break-glass override covers) never gets
traffic, whatever sequence of operator actions leads there."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from lockgate.cli.main import cli
from lockgate.contracts import GateDecided
from lockgate.server.apikeys import KeyStore
from lockgate.signing import Signer, revoke_key, revoke_person, trust_file_path, trust_key
from tests.helpers import break_glass, gate_decided, judged, register_model_release, store_decision
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_admission_race import _announce, _passed, _signed_pass
from tests.integration.test_rollout_analysis import _pass, _start
from tests.integration.test_rollout_strategies import _releases

router, http, keys, signer = analysis_tests.router, analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)
DEPLOYMENT = "/lockgate/v1/deployments/chat"


async def test_approving_a_pause_step_never_gives_weight_to_a_canary_no_decision_allows(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Held at a pause step waiting for approval, the operator patches in an ungated canary ("bad"): it drops
    # to 0% and waits for a decision; approving the old pause step must not run the program on for it.
    await _start(http, router, "same", {"steps": [{"pause": {}}, 50], "interval_s": 3600})
    await _pass(router, signer, "same")
    await router.rollouts.wait_for(lambda r: r["chat"].step_pause, timeout=10)
    operator, _ = KeyStore(router.ctx.settings.home).create("default", "ops", "operator", "on call")
    auth = {"Authorization": f"Bearer {operator}"}
    async with http.patch(f"{router.url}{DEPLOYMENT}", json={"canary_release": "bad"}, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
    route = router.rollouts.route("chat")
    assert (route.canary.release, route.weight, route.phase) == ("bad", 0.0, "idle")
    async with http.post(f"{router.url}{DEPLOYMENT}/approve", json={"step": route.step, "canary": "bad",
                                                                 "started_at": route.started_at},
                         headers=auth) as resp:
        body = await resp.text()
    route = router.rollouts.route("chat")
    assert route.weight == 0.0, body
    assert set(await _releases(http, router, 60)) == {"r1"}  # nobody is served the ungated canary


async def test_break_glass_for_a_canary_does_not_let_an_ungated_stable_take_all_traffic(
        router: Any, http: aiohttp.ClientSession) -> None:
    # The admin signed "canary of `same` on chat"; the PUT also names `bad`, never gated, as the new stable.
    glass = break_glass(router.ctx.settings, "chat", "same", "canary", "incident 7")
    body = {"stable_release": "bad", "canary_release": "same", "initial_weight": 10, "break_glass": glass}
    async with http.put(f"{router.url}{DEPLOYMENT}", json=body) as resp:
        answer = await resp.json()
    assert resp.status == 409 and answer["error"]["code"] == "not_admitted", answer
    assert "stable release 'bad' has no verified gate decision" in answer["error"]["message"]
    assert router.rollouts.route("chat").stable.release != "bad"
    # The override still does what it was signed for, from a stable a decision allows.
    async with http.put(f"{router.url}{DEPLOYMENT}", json={**body, "stable_release": "r1"}) as resp:
        assert resp.status == 200, await resp.text()
    route = router.rollouts.route("chat")
    assert (route.stable.release, route.canary.release, route.weight) == ("r1", "same", 10.0)


async def test_a_pass_superseded_by_a_block_does_not_admit_the_canary_when_it_arrives_late(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # The gatekeeper passed `bad` (d1), then blocked it (d2, current in KV). d1 reaches the router late (a
    # redelivery after a nack): the release's current decision is the BLOCK, so d1 must admit nothing.
    passed = signer.sign(GateDecided(release="bad", rules=[], decision="PASS", artifacts=await judged(router.ctx.bus, "bad")))
    blocked = signer.sign(GateDecided(release="bad", rules=[], decision="BLOCK", reason="toxicity"))
    bus = router.ctx.bus
    await _start(http, router, "same", {"steps": [50, 100], "interval_s": 3600})
    await _pass(router, signer, "same")
    async with http.patch(f"{router.url}{DEPLOYMENT}", json={"canary_release": "bad"}) as resp:
        assert resp.status == 200, await resp.text()
    assert (router.rollouts.route("chat").weight, router.rollouts.route("chat").phase) == (0.0, "idle")
    await store_decision(bus, blocked)
    await bus.publish(bus.subjects.gate_decided("bad"), passed)  # d1 again, not stored: it is not the current one
    await router.rollouts.wait_for(lambda r: r["chat"].decision_id in (passed.id, blocked.id), timeout=10)
    route = router.rollouts.route("chat")
    assert (route.weight, route.phase, route.decision_id) == (0.0, "aborted", blocked.id), route.reason
    assert set(await _releases(http, router, 40)) == {"r1"}


def _handled(router: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, asyncio.Event]:
    """An event per decision id, set once the router's gate handler has handled that message (acted on it or not):
    what a test waits on when the right outcome is that nothing changes."""
    rollouts, on_decision = router.rollouts, router.rollouts.on_decision
    handled: dict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def handle(decision: GateDecided) -> None:
        await on_decision(decision)
        handled[decision.id].set()

    monkeypatch.setattr(rollouts, "on_decision", handle)
    return handled


async def test_a_pass_stamped_later_than_the_current_decision_does_not_admit_the_canary_when_it_arrives_late(
        router: Any, http: aiohttp.ClientSession, signer: Signer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by a probe: a gatekeeper replica whose clock ran 300 s ahead signed a PASS of `bad`; a person then
    # rejected it and its re-run is NEEDS_REVIEW under the veto (current in KV, stamped by a correct clock). The old
    # PASS reaches the router again (a redelivery). Before: the router compared the two decisions' times, took the
    # PASS for the newer one and put the vetoed canary at 50% until its next step.
    bus = router.ctx.bus
    handled = _handled(router, monkeypatch)
    ahead = signer.sign(GateDecided(release="bad", rules=[], decision="PASS", artifacts=await judged(bus, "bad"),
                                    time=datetime.now(UTC) + timedelta(seconds=300)))
    await store_decision(bus, ahead)
    held = signer.sign(GateDecided(release="bad", rules=[], decision="NEEDS_REVIEW", reason="vetoed: rejected by alice",
                                   review_required="vetoed", artifacts=await judged(bus, "bad")))
    await store_decision(bus, held)
    await _start(http, router, "bad", {"steps": [50, 100], "interval_s": 3600})
    route = router.rollouts.route("chat")
    assert (route.weight, route.phase, route.decision_id) == (0.0, "idle", held.id), route.reason
    await bus.publish(bus.subjects.gate_decided("bad"), ahead)  # the redelivery: not the current decision
    await asyncio.wait_for(handled[ahead.id].wait(), 10)
    route = router.rollouts.route("chat")
    assert (route.weight, route.phase, route.decision_id, route.admitted) == (0.0, "idle", held.id, ""), route.reason
    assert set(await _releases(http, router, 40)) == {"r1"}


async def test_a_pass_announced_without_a_verified_current_decision_admits_nothing(
        router: Any, http: aiohttp.ClientSession, signer: Signer, monkeypatch: pytest.MonkeyPatch) -> None:
    # A PASS of `same` on the bus while KV holds no decision of it that verifies: none at all, or one signed by a key
    # revoked since. A message alone is no current decision (the gatekeeper stores before it announces), so it
    # admits nothing. Before: it was applied, and the canary got 50%.
    bus = router.ctx.bus
    handled = _handled(router, monkeypatch)
    await _start(http, router, "same", {"steps": [50, 100], "interval_s": 3600})
    retired = Signer.generate()
    trust_key(trust_file_path(router.ctx.settings), retired.public)
    unverified = retired.sign(GateDecided(release="same", rules=[], decision="BLOCK", reason="toxicity"))
    for stored in (None, unverified):
        if stored is not None:
            await store_decision(bus, stored)
            revoke_key(trust_file_path(router.ctx.settings), retired.key_id)
        passed = await _signed_pass(router, signer, "same")
        await bus.publish(bus.subjects.gate_decided("same"), passed)
        await asyncio.wait_for(handled[passed.id].wait(), 10)
        route = router.rollouts.route("chat")
        assert (route.weight, route.phase, route.admitted) == (0.0, "idle", ""), (stored and stored.id, route.reason)
    assert set(await _releases(http, router, 40)) == {"r1"}
    # A message that allows nothing is still acted on: it can only make the route stricter.
    blocked = signer.sign(GateDecided(release="same", rules=[], decision="BLOCK", reason="leaks PII"))
    await bus.publish(bus.subjects.gate_decided("same"), blocked)
    await router.rollouts.wait_for(lambda r: r["chat"].decision_id == blocked.id, timeout=10)
    assert router.rollouts.route("chat").phase == "aborted"


async def test_a_block_of_the_stable_rolls_it_back_while_a_canary_of_another_release_waits(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # `same` was promoted (known-good); a canary of `echo` then starts from it and waits for its decision. The
    # gate now BLOCKs `same`: it must stop serving (back to r1, the newest known-good), not keep 100%.
    await _promoted_then_canary(router, http, signer)
    bus = router.ctx.bus
    blocked = signer.sign(GateDecided(release="same", rules=[], decision="BLOCK", reason="leaks PII"))
    await gate_decided(bus, blocked)
    await router.rollouts.wait_for(lambda r: "same" not in {t.release for t in r["chat"].good}, timeout=10)
    route = router.rollouts.route("chat")
    assert (route.stable.release, route.weight, route.phase) == ("r1", 0.0, "aborted"), route.reason
    assert set(await _releases(http, router, 40)) == {"r1"}


async def _promoted_then_canary(router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    """`same` promoted from r1 (both known-good), then a canary of `echo` started from it, waiting at 0%."""
    await _start(http, router, "same", {"steps": [50, 100], "interval_s": 3600})
    await _pass(router, signer, "same")
    async with http.post(f"{router.url}{DEPLOYMENT}/promote") as resp:
        assert resp.status == 200, await resp.text()
    # Steps an hour apart: at the tests' router interval (0.05 s) the canary was promoted before a test could abort it.
    async with http.put(f"{router.url}{DEPLOYMENT}", json={"stable_release": "same", "canary_release": "echo",
                                                           "strategy": {"steps": [50, 100], "interval_s": 3600}}) as resp:
        assert resp.status == 200, await resp.text()


async def test_a_stable_decision_the_route_never_acted_on_rolls_it_back_all_the_same(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Probe p14 F1: the serving stable's current decision is NEEDS_REVIEW (here stored, never announced: a replica
    # that missed it, a route stored before the router acted on it), with `echo` in the canary slot. Nothing but
    # that decision's message looked at the stable's decision (not the timer, the trust watch, a restart), so it
    # kept all traffic for good. Now the router reads every serving stable's decision again every few seconds.
    await _promoted_then_canary(router, http, signer)
    bus = router.ctx.bus
    held = signer.sign(GateDecided(release="same", rules=[], decision="NEEDS_REVIEW", reason="vetoed: rejected by alice",
                                   review_required="vetoed", artifacts=await judged(bus, "same")))
    await store_decision(bus, held)
    await router.rollouts.wait_for(lambda r: r["chat"].stable.release == "r1", timeout=30)
    route = router.rollouts.route("chat")
    assert (route.phase, route.weight, route.decision_id) == ("aborted", 0.0, held.id), route.reason
    assert route.reason.startswith("rolled back same: gate NEEDS_REVIEW of known-good same: vetoed: rejected by alice")
    assert set(await _releases(http, router, 40)) == {"r1"}


async def test_a_router_that_starts_rolls_back_a_stored_stable_no_decision_allows_now(
        router: Any, http: aiohttp.ClientSession, signer: Signer, run_services: Any) -> None:
    # Probe p14 F1 survived restarts: the route in KV served `same`, NEEDS_REVIEW, and a router that started loaded it
    # as it was. Here the first replica stands for one that ran before stables were checked again; one that starts on
    # the same routes (a restart) rolls the stable back at once, and the first follows its write.
    router.rollouts.stable_check_s = 3600.0
    await _promoted_then_canary(router, http, signer)
    bus = router.ctx.bus
    held = signer.sign(GateDecided(release="same", rules=[], decision="NEEDS_REVIEW", reason="vetoed: rejected by alice",
                                   artifacts=await judged(bus, "same")))
    await store_decision(bus, held)
    assert router.rollouts.route("chat").stable.release == "same"
    restarted = (await run_services("router"))["router"]
    # Rolled back before it serves its first request (probe p50 F2: the look ran beside the first requests).
    assert restarted.rollouts.route("chat").stable.release == "r1"
    assert set(await _releases(http, restarted, 40)) == {"r1"}
    await router.rollouts.wait_for(lambda r: r["chat"].stable.release == "r1", timeout=20)
    assert router.rollouts.route("chat").decision_id == held.id


async def test_a_router_that_starts_serves_no_request_to_a_canary_blocked_while_no_replica_ran(
        router: Any, http: aiohttp.ClientSession, signer: Signer, run_services: Any) -> None:
    # Probe p50 F2: every replica down while the gate BLOCKed the live canary (stored, its message long gone); a
    # replica that started restored the route at 50% from KV and served the BLOCKed canary to 7 of its first 20
    # requests before its trust watch, in the background, aborted it. Now the start reads every restored route's
    # decisions before it serves. The first replica stands for the ones that were down (it never looks again).
    router.rollouts.stable_check_s = 3600.0
    await _start(http, router, "same", {"steps": [50, 100], "interval_s": 3600})
    await _pass(router, signer, "same")
    bus = router.ctx.bus
    blocked = signer.sign(GateDecided(release="same", rules=[], decision="BLOCK", reason="toxicity"))
    await store_decision(bus, blocked)
    assert router.rollouts.route("chat").weight == 50.0
    restarted = (await run_services("router"))["router"]
    route = restarted.rollouts.route("chat")
    assert (route.phase, route.weight, route.decision_id) == ("aborted", 0.0, blocked.id), route.reason
    assert set(await _releases(http, restarted, 40)) == {"r1"}


async def test_an_abort_never_hands_all_traffic_back_to_a_stable_the_gate_does_not_allow(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Probe p14 F1b: with the stable `same` NEEDS_REVIEW, its canary `echo` went live and the operator aborted it:
    # 100% went back to `same`. Now the abort goes on to the last known-good release a decision allows, r1.
    router.rollouts.stable_check_s = 3600.0  # the abort itself, not the periodic check, must do it
    await _promoted_then_canary(router, http, signer)
    bus = router.ctx.bus
    await gate_decided(bus, signer.sign(GateDecided(release="echo", rules=[], decision="PASS",
                                                    artifacts=await judged(bus, "echo"))))
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "progressing", timeout=10)
    held = signer.sign(GateDecided(release="same", rules=[], decision="NEEDS_REVIEW", reason="vetoed: rejected by alice",
                                   artifacts=await judged(bus, "same")))
    await store_decision(bus, held)  # never announced: the route still serves `same` as its stable
    assert router.rollouts.route("chat").stable.release == "same"
    async with http.post(f"{router.url}{DEPLOYMENT}/abort") as resp:
        answer = await resp.json()
    assert resp.status == 200, answer
    assert (answer["stable"]["release"], answer["phase"], answer["weight"]) == ("r1", "aborted", 0.0), answer["reason"]
    assert answer["reason"].startswith("rolled back same: gate NEEDS_REVIEW of known-good same")
    assert set(await _releases(http, router, 40)) == {"r1"}


async def test_a_rollback_after_a_blue_green_promotion_never_puts_back_a_blocked_release(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # `same` was promoted blue-green from r1 (post-promotion analysis running, r1 kept for instant rollback).
    # The gate BLOCKs r1, then `same`. Before: with no known-good release left, the rollback fell back to the
    # previous release, r1, BLOCKed, and all traffic went to it.
    await _start(http, router, "same", {"interval_s": 0.1, "blue_green": {
        "post_promotion_analysis": analysis_tests.ERRORS, "scale_down_delay_s": 600}})
    await _pass(router, signer, "same")
    async with http.post(f"{router.url}{DEPLOYMENT}/promote") as resp:
        promoted = await resp.json()
    assert resp.status == 200 and promoted["verifying"], promoted
    assert [t["release"] for t in promoted["good"]] == ["r1"]  # `same` is known-good once its analysis passes
    bus = router.ctx.bus
    old = signer.sign(GateDecided(release="r1", rules=[], decision="BLOCK", reason="a sunset artifact"))
    await gate_decided(bus, old)
    await router.rollouts.wait_for(lambda r: not r["chat"].good, timeout=10)  # r1 is no longer known-good
    new = signer.sign(GateDecided(release="same", rules=[], decision="BLOCK", reason="leaks PII"))
    await gate_decided(bus, new)
    await router.rollouts.wait_for(lambda r: r["chat"].decision_id == new.id, timeout=10)
    route = router.rollouts.route("chat")
    assert (route.stable.release, route.good, route.verifying) == ("same", [], False), route.reason
    assert "rolled back" not in route.reason
    assert "gate BLOCK after promotion: leaks PII; NO known-good release to roll back to: still serving same" \
        in route.reason
    assert set(await _releases(http, router, 40)) == {"same"}  # never the BLOCKed r1
    # Nor does an operator's abort in the scale-down window swap the BLOCKed r1 back.
    async with http.post(f"{router.url}{DEPLOYMENT}/abort") as resp:
        assert resp.status == 200, await resp.text()
    assert router.rollouts.route("chat").stable.release == "same"


async def _glass_canary(router: Any, http: aiohttp.ClientSession, weight: int = 10) -> dict[str, Any]:
    """`bad` (never gated) put on chat as a canary at `weight`% by boss's break-glass statement; the request body."""
    glass = break_glass(router.ctx.settings, "chat", "bad", "canary", "incident 7", weight=weight)
    body = {"stable_release": "r1", "canary_release": "bad", "initial_weight": weight, "break_glass": glass}
    async with http.put(f"{router.url}{DEPLOYMENT}", json=body) as resp:
        assert resp.status == 200, await resp.text()
    return body


async def test_a_rollback_never_puts_back_a_release_only_a_break_glass_override_promoted(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Probe p8 (F1): `bad` (never gated) was promoted by an admin's break-glass statement, `same` (PASS) promoted
    # from it after. Before, a BLOCK of `same` rolled back to the newest known-good release, `bad`: never-gated
    # content on all traffic, no override shown, while `undo --to bad` was refused. Now the rollback goes only to a
    # known-good release a verified decision allows now: r1.
    await _glass_canary(router, http)
    promote = {"break_glass": break_glass(router.ctx.settings, "chat", "bad", "promote", "incident 7")}
    async with http.post(f"{router.url}{DEPLOYMENT}/promote", json=promote) as resp:
        assert resp.status == 200, await resp.text()
    async with http.put(f"{router.url}{DEPLOYMENT}", json={"stable_release": "bad", "canary_release": "same"}) as resp:
        assert resp.status == 200, await resp.text()
    await _pass(router, signer, "same")
    async with http.post(f"{router.url}{DEPLOYMENT}/promote") as resp:
        promoted = await resp.json()
    assert resp.status == 200 and [t["release"] for t in promoted["good"]] == ["r1", "bad", "same"], promoted
    blocked = signer.sign(GateDecided(release="same", rules=[], decision="BLOCK", reason="leaks PII"))
    await gate_decided(router.ctx.bus, blocked)
    await router.rollouts.wait_for(lambda r: r["chat"].decision_id == blocked.id, timeout=10)
    async with http.get(f"{router.url}{DEPLOYMENT}") as resp:
        shown = await resp.json()
    assert (shown["stable"]["release"], shown["phase"], shown["override"]) == ("r1", "aborted", None), shown
    assert "back on last known-good r1 (known-good bad skipped: no verified gate decision allows it now)" \
        in shown["reason"], shown["reason"]
    assert set(await _releases(http, router, 40)) == {"r1"}


async def test_a_break_glass_promotion_keeps_serving_until_a_decision_made_since_says_otherwise(
        router: Any, http: aiohttp.ClientSession, signer: Signer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Probe p18 F2: an admin's break-glass promote of a release awaiting review answered 200 "promoted", then the
    # router's check of serving stables (every 5 s) rolled it back on the very decision the admin overrode.
    review = signer.sign(GateDecided(release="bad", rules=[], decision="NEEDS_REVIEW", reason="judge unsure"))
    await store_decision(router.ctx.bus, review)
    await _glass_canary(router, http)
    promote = {"break_glass": break_glass(router.ctx.settings, "chat", "bad", "promote", "incident 7")}
    async with http.post(f"{router.url}{DEPLOYMENT}/promote", json=promote) as resp:
        assert resp.status == 200, await resp.text()
    await router.rollouts._hold_stables()  # what the router runs every few seconds and at start
    handled = _handled(router, monkeypatch)
    await gate_decided(router.ctx.bus, review)  # the overridden decision again (a redelivery)
    await asyncio.wait_for(handled[review.id].wait(), 10)
    route = router.rollouts.route("chat")
    assert (route.stable.release, route.phase) == ("bad", "promoted"), route.reason
    # A decision made since the override is the gate speaking again: it rolls the release back.
    blocked = signer.sign(GateDecided(release="bad", rules=[], decision="BLOCK", reason="leaks PII"))
    await store_decision(router.ctx.bus, blocked)
    await router.rollouts._hold_stables()
    route = router.rollouts.route("chat")
    assert (route.stable.release, route.phase, route.decision_id) == ("r1", "aborted", blocked.id), route.reason
    assert set(await _releases(http, router, 40)) == {"r1"}


async def test_a_break_glass_promotion_is_shown_in_status_until_a_decision_admits_the_release(
        router: Any, http: aiohttp.ClientSession, signer: Signer, keys: Any) -> None:
    # Probe p28 (note): after boss's break-glass promote of `bad` (never gated) it served all traffic, while `lockgate
    # status` said "no break-glass overrides" and `rollout get` "override -": only the route's reason said it.
    await _glass_canary(router, http)
    promote = {"break_glass": break_glass(router.ctx.settings, "chat", "bad", "promote", "incident 7")}
    async with http.post(f"{router.url}{DEPLOYMENT}/promote", json=promote) as resp:
        assert resp.status == 200, await resp.text()
    s = router.ctx.settings
    where = ["--home", s.home, "--nats", s.nats_url, "--prefix", s.prefix]

    async def lockgate(*args: str) -> Any:
        result = await asyncio.to_thread(CliRunner().invoke, cli, [*where, *args])
        assert result.exit_code == 0, result.output
        return result

    status = json.loads((await lockgate("status", "--json")).stdout)
    assert [(o["deployment"], o["release"], o["action"], o["by"], o["reason"]) for o in status["overrides"]] == [
        ("chat", "bad", "promote", "boss", "incident 7")], status["overrides"]
    got = await lockgate("rollout", "--router", router.url, "--api-key", keys.admin_key, "get", "chat")
    assert "stable bad serves by BREAK-GLASS promote of boss: incident 7" in " ".join(got.stdout.split()), got.stdout

    # A PASS of `bad` admits it: the gate speaks for it now, and the statement is no longer shown.
    await gate_decided(router.ctx.bus, signer.sign(GateDecided(release="bad", rules=[], decision="PASS",
                                                               artifacts=await judged(router.ctx.bus, "bad"))))
    await router.rollouts.wait_for(lambda r: r["chat"].glass_stable is None, timeout=10)
    await router.rollouts.flush()  # written to KV, where `status` reads the routes
    assert json.loads((await lockgate("status", "--json")).stdout)["overrides"] == []
    got = await lockgate("rollout", "--router", router.url, "--api-key", keys.admin_key, "get", "chat")
    assert "BREAK-GLASS promote" not in got.stdout and router.rollouts.route("chat").stable.release == "bad"


async def _admitted_by_a_new_key(router: Any) -> tuple[Signer, GateDecided]:
    """The canary of `same` admitted by a PASS a key trusted just now signed (the key that leaks: revoked later)."""
    leaked = Signer.generate()
    trust_key(trust_file_path(router.ctx.settings), leaked.public)
    passed = await _signed_pass(router, leaked, "same")
    await _announce(router, passed)
    return leaked, passed


async def test_a_canary_admitted_by_a_revoked_key_is_neither_raised_nor_promoted(
        router: Any, http: aiohttp.ClientSession, signer: Signer, run_services: Any) -> None:
    # A gatekeeper key (trusted, then revoked with `lockgate gate revoke`) signed the PASS that admitted `same` at
    # 10%. Before: a new PUT of it was refused, but set-weight 90 and promote were 200, on the admission the route
    # had cached, and the timer's steps went on too.
    s = router.ctx.settings
    await run_services("gatekeeper")  # chains the audit entry of each `gate revoke` (the command waits for it)
    await _start(http, router, "same", {"steps": [10, 50, 100], "interval_s": 3600})
    attempts = [("POST", "/promote", None), ("POST", "/set-weight", {"weight": 90}), ("PATCH", "", {"weight": 90}),
                ("POST", "/resume", None)]
    for method, action, body in attempts:
        leaked, passed = await _admitted_by_a_new_key(router)  # a key of its own each time: a new PASS admits it
        assert router.rollouts.route("chat").weight == 10.0
        if action == "/resume":
            async with http.post(f"{router.url}{DEPLOYMENT}/pause") as resp:  # holding traffic needs no check
                assert resp.status == 200, await resp.text()
        revoked = await asyncio.to_thread(CliRunner().invoke, cli, ["--home", s.home, "--nats", s.nats_url, "--prefix",
                                                                    s.prefix, "gate", "revoke", leaked.key_id])
        assert revoked.exit_code == 0, revoked.output
        # The trust watch takes the canary back to 0% within a second (run_trust_watch); what the operator asks
        # for next finds it there and may not raise it again.
        await router.rollouts.wait_for(lambda r: r["chat"].weight == 0.0, timeout=10)
        reason = router.rollouts.route("chat").reason
        assert f"canary same back to 0%: admitted by gate decision {passed.id}, but it no longer verifies" in reason
        assert f"signed by revoked key id {leaked.key_id!r}" in reason
        async with http.request(method, f"{router.url}{DEPLOYMENT}{action}", json=body) as resp:
            answer = await resp.json()
        # Raising or promoting is refused; resuming a canary at 0% waiting for a decision is allowed, and raises nothing.
        assert resp.status == (200 if action == "/resume" else 409), (action, answer)
        route = router.rollouts.route("chat")
        assert (route.weight, route.phase, route.admitted, route.stable.release) == (0.0, "idle", "", "r1"), action
        assert set(await _releases(http, router, 40)) == {"r1"}


async def test_the_timer_does_not_step_a_canary_whose_admitting_key_was_revoked(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # The same revocation while the steps run on their own: the next step un-admits the canary, never raises it.
    s = router.ctx.settings
    await _start(http, router, "same", {"steps": [10, 50, 100], "interval_s": 0.3})
    leaked, _ = await _admitted_by_a_new_key(router)
    await router.rollouts.wait_for(lambda r: r["chat"].weight == 10.0, timeout=10)
    revoke_key(trust_file_path(s), leaked.key_id)
    await router.rollouts.wait_for(lambda r: r["chat"].weight != 10.0, timeout=10)  # the next step is due
    route = router.rollouts.route("chat")
    assert (route.weight, route.phase) == (0.0, "idle"), route.reason
    assert "it no longer verifies" in route.reason


async def test_a_revocation_takes_a_paused_canary_it_admitted_back_to_zero_at_once(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Before: a canary a leaked key admitted kept its 10% until something would raise it; paused, for good.
    s = router.ctx.settings
    await _start(http, router, "same", {"steps": [10, 50, 100], "interval_s": 3600})
    leaked, passed = await _admitted_by_a_new_key(router)
    async with http.post(f"{router.url}{DEPLOYMENT}/pause") as resp:
        assert resp.status == 200, await resp.text()
    assert router.rollouts.route("chat").weight == 10.0
    revoke_key(trust_file_path(s), leaked.key_id)  # as `lockgate gate revoke` writes it: nothing else is told
    await router.rollouts.wait_for(lambda r: r["chat"].weight == 0.0, timeout=10)
    route = router.rollouts.route("chat")
    assert (route.phase, route.admitted, route.stable.release) == ("idle", "", "r1"), route.reason
    assert f"canary same back to 0%: admitted by gate decision {passed.id}, but it no longer verifies" in route.reason
    assert f"signed by revoked key id {leaked.key_id!r}" in route.reason
    assert set(await _releases(http, router, 40)) == {"r1"}


async def test_a_malformed_trust_file_does_not_stop_the_router_acting_on_the_next_revocation(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Probe p5: a hand edit left trust.json malformed for a moment; the router's trust watch died of the read
    # (unseen), and a retirement after the file was mended left the canary it admitted at 50% for good.
    s = router.ctx.settings
    path = trust_file_path(s)
    await _start(http, router, "same", {"steps": [10, 50, 100], "interval_s": 3600})
    leaked, _ = await _admitted_by_a_new_key(router)
    good = path.read_bytes()
    seen = threading.Event()

    class Noticed(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "trust roots changed, not acted on yet" in record.getMessage():
                seen.set()

    handler = Noticed()
    logging.getLogger("lockgate.router").addHandler(handler)
    try:
        broken = path.with_suffix(".edit")
        broken.write_bytes(good[:-2] + b",}")  # a trailing comma
        os.replace(broken, path)
        assert await asyncio.to_thread(seen.wait, 10), "the watch never read the malformed file"
    finally:
        logging.getLogger("lockgate.router").removeHandler(handler)
    mended = path.with_suffix(".edit")
    mended.write_bytes(good)
    os.replace(mended, path)
    revoke_key(path, leaked.key_id)
    await router.rollouts.wait_for(lambda r: r["chat"].weight == 0.0, timeout=10)
    assert "it no longer verifies" in router.rollouts.route("chat").reason


async def test_revoking_the_admin_who_broke_glass_ends_the_override_at_once(
        router: Any, http: aiohttp.ClientSession) -> None:
    # Probe p5: after `gate revoke --person boss` (his key leaked), the never-gated canary he broke glass for kept its
    # 20%; only new statements of his were refused.
    await _glass_canary(router, http, 20)
    assert router.rollouts.route("chat").weight == 20.0
    revoke_person(trust_file_path(router.ctx.settings), "boss")
    await router.rollouts.wait_for(lambda r: r["chat"].override is None, timeout=10)
    route = router.rollouts.route("chat")
    assert (route.weight, route.canary.release) == (0.0, "bad"), route.reason
    assert "break-glass override by boss ended: boss's key" in route.reason and "is revoked" in route.reason
    assert set(await _releases(http, router, 40)) == {"r1"}


async def test_a_block_ends_the_break_glass_override_of_its_release(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # An admin broke glass for `bad` on chat; the gate then BLOCKed it. The override stays in the route until an
    # admin clears it, but must no longer cover `bad`: an operator patching it back in gets it no traffic.
    await _glass_canary(router, http)
    bus = router.ctx.bus
    blocked = signer.sign(GateDecided(release="bad", rules=[], decision="BLOCK", reason="toxicity"))
    await gate_decided(bus, blocked)
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "aborted", timeout=10)
    operator, _ = KeyStore(router.ctx.settings.home).create("default", "ops", "operator", "on call")
    auth = {"Authorization": f"Bearer {operator}"}
    async with http.put(f"{router.url}{DEPLOYMENT}", json={"stable_release": "r1", "canary_release": "same",
                                                           "strategy": {"steps": [50, 100], "interval_s": 3600}},
                        headers=auth) as resp:
        assert resp.status == 200, await resp.text()
    await _pass(router, signer, "same")
    async with http.patch(f"{router.url}{DEPLOYMENT}", json={"canary_release": "bad"}, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
    async with http.post(f"{router.url}{DEPLOYMENT}/set-weight", json={"weight": 50}, headers=auth) as resp:
        assert resp.status == 409, await resp.text()
    route = router.rollouts.route("chat")
    assert (route.canary.release, route.weight) == ("bad", 0.0), route.reason
    assert set(await _releases(http, router, 40)) == {"r1"}


async def test_a_break_glass_override_covers_only_the_rollout_it_was_signed_for(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # An admin broke glass for a canary of the never-gated `bad` (10%); the rollout was aborted. Weeks later an
    # operator starts `bad` again with a plain PUT. Before: the old override was carried into the new rollout and
    # still covered `bad`, so set-weight gave it 50% (200) with no decision and no new statement.
    await _glass_canary(router, http)
    assert (router.rollouts.route("chat").weight, router.rollouts.route("chat").override.actor) == (10.0, "boss")
    operator, _ = KeyStore(router.ctx.settings.home).create("default", "ops", "operator", "on call")
    auth = {"Authorization": f"Bearer {operator}"}
    async with http.post(f"{router.url}{DEPLOYMENT}/abort", headers=auth) as resp:
        aborted = await resp.json()
    assert resp.status == 200 and aborted["override"] is None, aborted
    assert "break-glass override by boss for bad ended: its rollout was aborted" in aborted["reason"]

    again = {"stable_release": "r1", "canary_release": "bad", "strategy": {"steps": [50, 100], "interval_s": 3600}}
    async with http.put(f"{router.url}{DEPLOYMENT}", json=again, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
    async with http.post(f"{router.url}{DEPLOYMENT}/set-weight", json={"weight": 50}, headers=auth) as resp:
        refused = await resp.json()
    assert resp.status == 409 and refused["error"]["code"] == "not_admitted", refused
    # Nor does a new rollout of another release bring the old statement back for `bad` by a PATCH.
    async with http.put(f"{router.url}{DEPLOYMENT}", json={**again, "canary_release": "same"}, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
    await _pass(router, signer, "same")
    async with http.patch(f"{router.url}{DEPLOYMENT}", json={"canary_release": "bad"}, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
    route = router.rollouts.route("chat")
    assert (route.canary.release, route.weight, route.override) == ("bad", 0.0, None), route.reason
    assert set(await _releases(http, router, 40)) == {"r1"}  # nobody is served `bad`


async def test_a_break_glass_statement_is_good_once(router: Any, http: aiohttp.ClientSession) -> None:
    # Before: a statement stayed valid for its ten minutes however often it was sent. It is shown in the rollout
    # event and the audit log, so an admin API key without any personal key could, after an abort, put the
    # never-gated `bad` back at 10% with the same statement (or promote twice with one promote statement).
    body = await _glass_canary(router, http)
    async with http.post(f"{router.url}{DEPLOYMENT}/abort") as resp:
        assert resp.status == 200, await resp.text()
    async with http.put(f"{router.url}{DEPLOYMENT}", json=body) as resp:
        replayed = await resp.json()
    assert resp.status == 403 and replayed["error"]["code"] == "invalid_break_glass", replayed
    assert "was used already; each is good once" in replayed["error"]["message"]
    assert router.rollouts.route("chat").phase == "aborted" and router.rollouts.route("chat").weight == 0.0
    # A fresh statement does it again, and a promote statement promotes once.
    fresh = break_glass(router.ctx.settings, "chat", "bad", "canary", "incident 7, again")
    async with http.put(f"{router.url}{DEPLOYMENT}", json={**body, "break_glass": fresh}) as resp:
        assert resp.status == 200, await resp.text()
    promote = {"break_glass": break_glass(router.ctx.settings, "chat", "bad", "promote", "incident 7")}
    async with http.post(f"{router.url}{DEPLOYMENT}/promote", json=promote) as resp:
        assert resp.status == 200, await resp.text()
    assert router.rollouts.route("chat").stable.release == "bad"
    # Back to r1 (which a decision allows), `bad` a canary again at 0%: the same promote statement is spent.
    async with http.put(f"{router.url}{DEPLOYMENT}", json={"stable_release": "r1", "canary_release": "bad"}) as resp:
        assert resp.status == 200, await resp.text()
    async with http.post(f"{router.url}{DEPLOYMENT}/promote", json=promote) as resp:
        again = await resp.json()
    assert resp.status == 403 and "was used already" in again["error"]["message"], again
    assert (router.rollouts.route("chat").stable.release, router.rollouts.route("chat").weight) == ("r1", 0.0)


async def test_a_release_of_another_app_cannot_be_rolled_out_on_a_deployment(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # The gates file requires app shop's releases to pass policy strict. An operator registered `other` under
    # app `lab` (which the file does not cover), gated it with a policy of their own (PASS), then rolled it out
    # on shop's deployment: the gatekeeper applies requirements by a release's app, so nothing stopped it.
    await register_model_release(router.ctx.bus, "other", "same", "canary", app="lab")
    await _passed(router, signer, "other")  # stored, with no rollout of it to act on
    await _start(http, router, "same", {"steps": [50], "interval_s": 3600})  # shop's r1 serves; `same` waits
    attempts = [("PUT", {"stable_release": "r1", "canary_release": "other", "initial_weight": 50}, 400),
                ("PUT", {"stable_release": "other", "canary_release": "same"}, 400),  # as the new stable
                ("PATCH", {"canary_release": "other"}, 409)]  # in place of the live rollout's canary (a conflict)
    for method, body, status in attempts:
        async with http.request(method, f"{router.url}{DEPLOYMENT}", json=body) as resp:
            answer = await resp.json()
        assert resp.status == status, (method, body, answer)
        assert ("release 'other' is of app 'lab', but 'chat' serves app 'shop' (r1): a deployment's releases are "
                "of one app") in answer["error"]["message"], answer
    route = router.rollouts.route("chat")
    assert (route.stable.release, route.canary.release, route.weight) == ("r1", "same", 0.0)
    assert set(await _releases(http, router, 60)) == {"r1"}  # `other` is served to nobody


async def test_a_break_glass_canary_is_still_judged_by_its_analysis(router: Any, http: aiohttp.ClientSession) -> None:
    # Found by a probe: a break-glass canary started with steps and an analysis served its weight with neither
    # (phase idle, analysis none) for as long as nobody looked; only a deployment-wide drift report stopped it.
    # The override skips the gate, not the live evidence: a failing canary is aborted, a passing one held.
    strategy = {"steps": [20, 50, 100], "interval_s": 0.2, "analysis": analysis_tests.ERRORS}
    for canary, outcome in (("bad", "aborted"), ("same", "idle")):
        glass = break_glass(router.ctx.settings, "chat", canary, "canary", f"incident with {canary}", weight=50)
        body = {"stable_release": "r1", "canary_release": canary, "initial_weight": 50, "strategy": strategy,
                "break_glass": glass}
        async with http.put(f"{router.url}{DEPLOYMENT}", json=body) as resp:
            assert resp.status == 200, await resp.text()
        looked = (lambda r: r.phase == "aborted") if outcome == "aborted" else (
            lambda r: r.analysis is not None and r.analysis.last is not None and r.analysis.last.verdict == "PASSED")
        await analysis_tests._traffic_until(http, router, looked, limit=4000)
        route = router.rollouts.route("chat")
        assert route.phase == outcome, route.reason
        if outcome == "aborted":
            assert "analysis failed" in route.reason and route.weight == 0.0
        else:  # passed, and still at the weight the statement was signed for: no step without a decision
            assert (route.weight, route.step) == (50.0, 0) and "held there by the break-glass override" in route.reason


async def test_a_break_glass_canary_gets_no_more_weight_than_its_admin_signed_for(
        router: Any, http: aiohttp.ClientSession) -> None:
    # The admin signed "canary of the never-gated `bad` on chat, 10%". Before: the statement did not name the
    # weight, so the admin API key chose it (100% as well), and an operator's set-weight then gave `bad` 90%.
    glass = break_glass(router.ctx.settings, "chat", "bad", "canary", "incident 7", weight=10)
    body = {"stable_release": "r1", "canary_release": "bad", "initial_weight": 100, "break_glass": glass}
    async with http.put(f"{router.url}{DEPLOYMENT}", json=body) as resp:
        refused = await resp.json()
    assert resp.status == 403 and refused["error"]["code"] == "invalid_break_glass", refused
    assert "lets 'bad' take 10% of 'chat', not the 100% asked" in refused["error"]["message"]
    assert "chat" not in router.rollouts.routes or router.rollouts.route("chat").canary is None
    # A weight the statement does not say is no weight at all: the signature covers it.
    async with http.put(f"{router.url}{DEPLOYMENT}", json={**body, "initial_weight": None,
                                                           "break_glass": {**glass, "weight": 100}}) as resp:
        refused = await resp.json()
    assert resp.status == 403 and "altered" in refused["error"]["message"], refused
    del body["initial_weight"]  # the statement's weight
    async with http.put(f"{router.url}{DEPLOYMENT}", json={**body, "break_glass": break_glass(
            router.ctx.settings, "chat", "bad", "canary", "incident 7", weight=10)}) as resp:
        assert resp.status == 200, await resp.text()
    assert router.rollouts.route("chat").weight == 10.0

    operator, _ = KeyStore(router.ctx.settings.home).create("default", "ops", "operator", "on call")
    auth = {"Authorization": f"Bearer {operator}"}
    for method, action, payload in [("POST", "/set-weight", {"weight": 90}), ("PATCH", "", {"weight": 90})]:
        async with http.request(method, f"{router.url}{DEPLOYMENT}{action}", json=payload, headers=auth) as resp:
            refused = await resp.json()
        assert resp.status == 409 and refused["error"]["code"] == "not_admitted", (action, refused)
        assert "the break-glass override by boss lets it take at most 10%" in refused["error"]["message"]
        assert router.rollouts.route("chat").weight == 10.0, action
    async with http.post(f"{router.url}{DEPLOYMENT}/set-weight", json={"weight": 5}, headers=auth) as resp:
        assert resp.status == 200, await resp.text()  # less traffic for it needs nothing
    share = await _releases(http, router, 200)
    assert share.count("bad") < 30, share.count("bad")


async def test_swapping_canaries_never_gives_a_break_glass_release_more_weight_than_signed(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Found by a probe: the admin broke glass for the never-gated `bad` at 10%; an operator swapped an allowed
    # canary in, set it to 100% and swapped `bad` back: `bad` served every request, the override still saying 10%.
    glass = break_glass(router.ctx.settings, "chat", "bad", "canary", "incident 7", weight=10)
    body = {"stable_release": "r1", "canary_release": "bad", "break_glass": glass}
    async with http.put(f"{router.url}{DEPLOYMENT}", json=body) as resp:
        assert resp.status == 200, await resp.text()
    await gate_decided(router.ctx.bus, signer.sign(GateDecided(release="same", rules=[], decision="PASS",
                                                               artifacts=await judged(router.ctx.bus, "same"))))
    operator, _ = KeyStore(router.ctx.settings.home).create("default", "ops", "operator", "on call")
    auth = {"Authorization": f"Bearer {operator}"}
    reasons = []
    for method, action, payload in [("PATCH", "", {"canary_release": "same"}),
                                    ("POST", "/set-weight", {"weight": 100}),
                                    ("PATCH", "", {"canary_release": "bad"})]:
        async with http.request(method, f"{router.url}{DEPLOYMENT}{action}", json=payload, headers=auth) as resp:
            assert resp.status == 200, (action, payload, await resp.text())
            reasons.append((await resp.json())["reason"])
    # The swap to `same` ended the override (it covered `bad` while it stayed the canary): `bad` is back at 0%.
    assert "break-glass override by boss for bad ended: same took the canary's place" in reasons[0]
    route = router.rollouts.route("chat")
    assert (route.canary.release, route.weight, route.override) == ("bad", 0.0, None), route.reason
    share = await _releases(http, router, 100)
    assert share.count("bad") == 0, share.count("bad")
