"""The admission invariant under interleavings, through the real router (HTTP control API, nats-server, chDB):
a release whose current verified decision is not an allowing one is never admitted by an operator action, however
the gate's BLOCK interleaves with it; what raises a canary rests on the release's current decision; and `undo`
puts back exactly the release whose decision it checked.

The races are made deterministic at one seam, the router's read of a stored decision (`Rollouts._read_decision`):
the operator's read is held while the gate BLOCKs the release and the router's gate handler has acted on it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest

from lockgate.contracts import GateDecided
from lockgate.signing import Signer, revoke_key, trust_file_path, trust_key
from lockgate.subjects import token
from tests.helpers import gate_decided, judged, store_decision
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import _pass, _start
from tests.integration.test_rollout_strategies import _releases

router, http, keys, signer = analysis_tests.router, analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)
DEPLOYMENT = "/lockgate/v1/deployments/chat"
STEPS = {"steps": [10, 50, 100], "interval_s": 3600}


async def _signed_pass(router: Any, signer: Signer, release: str) -> GateDecided:
    return signer.sign(GateDecided(release=release, rules=[], decision="PASS",
                                   artifacts=await judged(router.ctx.bus, release)))


async def _passed(router: Any, signer: Signer, release: str) -> GateDecided:
    """A fresh PASS of `release`, stored as its current decision (not announced)."""
    decision = await _signed_pass(router, signer, release)
    await store_decision(router.ctx.bus, decision)
    return decision


async def _announce(router: Any, decision: GateDecided) -> None:
    """`decision` stored, then announced, as the gatekeeper does; returns once the router admitted the canary by it."""
    await gate_decided(router.ctx.bus, decision)
    await router.rollouts.wait_for(lambda r: r["chat"].admitted == decision.id, timeout=10)


async def _block_during_read(router: Any, signer: Signer, release: str,
                             action: Callable[[], Awaitable[tuple[int, Any]]],
                             monkeypatch: pytest.MonkeyPatch) -> tuple[tuple[int, Any], GateDecided]:
    """Run `action` (an operator's request) with its first read of `release`'s stored decision held: it reads the
    PASS stored now, then waits while the gate BLOCKs the release (stored, then announced) and the router's gate
    handler has acted on the BLOCK; then the read returns the PASS it read. The request's answer and the BLOCK."""
    rollouts = router.rollouts
    read, on_decision = rollouts._read_decision, rollouts.on_decision
    held, go, handled = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def read_held(name: str) -> Any:
        result = await read(name)
        if name == release and not held.is_set():
            held.set()
            await go.wait()
        return result

    async def handle(decision: GateDecided) -> None:
        await on_decision(decision)
        if decision.release == release:
            handled.set()

    monkeypatch.setattr(rollouts, "_read_decision", read_held)
    monkeypatch.setattr(rollouts, "on_decision", handle)
    request = asyncio.create_task(action())
    await asyncio.wait_for(held.wait(), 10)
    blocked = signer.sign(GateDecided(release=release, rules=[], decision="BLOCK", reason="toxicity"))
    await gate_decided(router.ctx.bus, blocked)
    await asyncio.wait_for(handled.wait(), 10)
    go.set()
    return await request, blocked


async def _call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as resp:
        return resp.status, await resp.json()


def _never_served(route: Any, release: str, blocked: GateDecided) -> None:
    """The canary of `release` ends aborted by the BLOCK (terminal: no step or promotion follows)."""
    assert route.canary is not None and route.canary.release == release, route
    assert (route.phase, route.weight, route.decision_id) == ("aborted", 0.0, blocked.id), route.reason
    assert release not in {t.release for t in route.good}


async def test_a_block_landing_while_a_canary_starts_is_not_overwritten_by_the_pass_read_before_it(
        router: Any, http: aiohttp.ClientSession, signer: Signer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by a probe: the PUT read the canary's PASS, then awaited other reads; the gate's BLOCK landed and the
    # gate handler acted on the route as it was (no canary of `bad` yet); the PUT then started the canary and applied
    # its stale PASS (10%). The BLOCK message was acked, never applied again, and the timer promoted `bad` to 100%.
    await _passed(router, signer, "bad")
    body = {"stable_release": "r1", "canary_release": "bad", "strategy": STEPS}
    (status, answer), blocked = await _block_during_read(
        router, signer, "bad", lambda: _call(http, "PUT", f"{router.url}{DEPLOYMENT}", body), monkeypatch)
    assert status == 200, answer
    _never_served(router.rollouts.route("chat"), "bad", blocked)
    assert set(await _releases(http, router, 40)) == {"r1"}


async def test_a_block_landing_while_a_canary_is_patched_in_or_retried_is_applied(
        router: Any, http: aiohttp.ClientSession, signer: Signer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same read-then-apply in a PATCH of the canary release (the new one kept the step on its stale PASS) ...
    await _start(http, router, "same", STEPS)
    await _pass(router, signer, "same")
    await _passed(router, signer, "bad")
    (status, answer), blocked = await _block_during_read(
        router, signer, "bad", lambda: _call(http, "PATCH", f"{router.url}{DEPLOYMENT}", {"canary_release": "bad"}),
        monkeypatch)
    assert status == 200, answer
    _never_served(router.rollouts.route("chat"), "bad", blocked)
    monkeypatch.undo()
    # ... and in a retry of an aborted rollout (restarted at its first step on the PASS read before the BLOCK).
    await _start(http, router, "flaky", STEPS)
    await _passed(router, signer, "flaky")
    await _pass(router, signer, "flaky")
    assert (await _call(http, "POST", f"{router.url}{DEPLOYMENT}/abort"))[0] == 200
    (status, answer), blocked = await _block_during_read(
        router, signer, "flaky", lambda: _call(http, "POST", f"{router.url}{DEPLOYMENT}/retry"), monkeypatch)
    assert status == 200, answer
    _never_served(router.rollouts.route("chat"), "flaky", blocked)
    assert set(await _releases(http, router, 40)) == {"r1"}


async def test_a_canary_is_raised_only_while_its_admitting_decision_is_still_the_current_one(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # `same` was admitted at 10% by a PASS; the gate's current decision for it is now a BLOCK that never reached
    # this router (stored, not announced: a message lost, or acked by a replica that did not have the canary).
    # Before: set-weight, PATCH weight, promote and the timer checked only that the admitting key was still
    # trusted, so each raised the BLOCKed canary (200).
    await _start(http, router, "same", STEPS)
    await _announce(router, await _signed_pass(router, signer, "same"))
    assert router.rollouts.route("chat").weight == 10.0
    blocked = signer.sign(GateDecided(release="same", rules=[], decision="BLOCK", reason="toxicity"))
    await store_decision(router.ctx.bus, blocked)
    for method, action, body in [("POST", "/promote", None), ("POST", "/set-weight", {"weight": 90}),
                                 ("PATCH", "", {"weight": 90})]:
        status, refused = await _call(http, method, f"{router.url}{DEPLOYMENT}{action}", body)
        assert status == 409 and refused["error"]["code"] == "not_admitted", (action, refused)
        assert f"the current decision {blocked.id} is BLOCK" in refused["error"]["message"], refused
        route = router.rollouts.route("chat")
        assert (route.weight, route.phase, route.admitted) == (0.0, "idle", ""), action
        await _announce(router, await _signed_pass(router, signer, "same"))  # admitted again for the next attempt
        await store_decision(router.ctx.bus, blocked)
    # The timer's next step alike: back to 0%, never on to 50%.
    await _passed(router, signer, "same")
    await _start(http, router, "same", {**STEPS, "interval_s": 1.0})  # admitted at once by its stored PASS
    assert router.rollouts.route("chat").weight == 10.0
    await store_decision(router.ctx.bus, blocked)
    await router.rollouts.wait_for(lambda r: r["chat"].weight != 10.0, timeout=10)  # the next step is due
    route = router.rollouts.route("chat")
    assert (route.weight, route.phase) == (0.0, "idle"), route.reason
    assert set(await _releases(http, router, 40)) == {"r1"}


async def test_a_canary_left_live_by_a_rollback_with_nowhere_to_go_is_still_checked_before_each_step(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # r1 (the stable, the only known-good release) is BLOCKed while a canary of `same` runs: nothing to roll back
    # to, so r1 keeps serving and the canary goes on. Before, that rollback cleared the canary's admission, so the
    # timer no longer checked it at all: after the key that admitted it was revoked, it was still stepped on.
    s = router.ctx.settings
    leaked = Signer.generate()
    trust_key(trust_file_path(s), leaked.public)
    await _start(http, router, "same", {"steps": [10, 50, 100], "interval_s": 0.3})
    passed = leaked.sign(GateDecided(release="same", rules=[], decision="PASS",
                                     artifacts=await judged(router.ctx.bus, "same")))
    await _announce(router, passed)
    assert router.rollouts.route("chat").weight == 10.0
    blocked = signer.sign(GateDecided(release="r1", rules=[], decision="BLOCK", reason="a sunset artifact"))
    await gate_decided(router.ctx.bus, blocked)
    await router.rollouts.wait_for(lambda r: r["chat"].decision_id == blocked.id, timeout=10)
    route = router.rollouts.route("chat")
    assert "NO known-good release to roll back to: still serving r1" in route.reason
    assert (route.phase, route.canary.release, route.weight) == ("progressing", "same", 10.0), route
    revoke_key(trust_file_path(s), leaked.key_id)
    await router.rollouts.wait_for(lambda r: r["chat"].weight != 10.0, timeout=10)  # the next step is due
    route = router.rollouts.route("chat")
    assert (route.weight, route.phase) == (0.0, "idle"), route.reason
    assert "it no longer verifies" in route.reason


async def test_undo_puts_back_exactly_the_previous_release_whose_decision_it_checked(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Found by a probe: `same` was promoted blue-green from r1 (post-promotion analysis still running, so not
    # known-good), then `echo` was promoted from it as a canary: previous is `same`, the known-good history r1 and
    # `echo`. The gate then put r1 back under review. Before: undo checked the decision of `same` but put back the
    # newest known-good release, r1, awaiting review: 200, and r1 served everyone.
    never_ends = {**analysis_tests.ERRORS, "min_sample": 100_000}
    await _start(http, router, "same", {"interval_s": 3600, "blue_green": {
        "post_promotion_analysis": never_ends, "scale_down_delay_s": 600}})
    await _pass(router, signer, "same")
    status, promoted = await _call(http, "POST", f"{router.url}{DEPLOYMENT}/promote")
    assert status == 200 and promoted["verifying"] and [t["release"] for t in promoted["good"]] == ["r1"], promoted
    body = {"stable_release": "same", "canary_release": "echo", "strategy": STEPS}
    assert (await _call(http, "PUT", f"{router.url}{DEPLOYMENT}", body))[0] == 200
    await _passed(router, signer, "echo")
    await _pass(router, signer, "echo")
    status, promoted = await _call(http, "POST", f"{router.url}{DEPLOYMENT}/promote")
    assert status == 200 and promoted["previous"]["release"] == "same", promoted
    assert [t["release"] for t in promoted["good"]] == ["r1", "echo"], promoted
    for release in ("r1", "same"):
        await store_decision(router.ctx.bus, signer.sign(GateDecided(
            release=release, rules=[], decision="NEEDS_REVIEW", reason="re-gated",
            artifacts=await judged(router.ctx.bus, release))))
    # The release undo puts back is awaiting review: refused, and nothing else is put back in its place.
    status, refused = await _call(http, "POST", f"{router.url}{DEPLOYMENT}/undo")
    assert status == 409 and refused["error"]["code"] == "not_admitted", refused
    assert "previous release 'same' is awaiting review" in refused["error"]["message"], refused
    assert router.rollouts.route("chat").stable.release == "echo"
    # Approved (a PASS): undo puts back `same`, the release it checked, never r1.
    await _passed(router, signer, "same")
    status, undone = await _call(http, "POST", f"{router.url}{DEPLOYMENT}/undo")
    assert status == 200 and undone["stable"]["release"] == "same", undone
    assert set(await _releases(http, router, 40)) == {"same"}


async def test_a_block_is_acted_on_routes_that_hold_every_replicas_write_before_it(
        router: Any, http: aiohttp.ClientSession, signer: Signer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another replica (the test, writing the routes bucket as one does) started a canary of `bad` on the PASS it read
    # just before the gate stored its BLOCK. The BLOCK reaches this replica (one replica takes each decision), whose
    # KV watch has not applied that write yet: before, it acted on the route it held (a canary of `same`, waiting),
    # changed nothing and acked, and `bad` kept its 10% on both replicas, never to be aborted.
    await _start(http, router, "same", STEPS)
    rollouts, bus = router.rollouts, router.ctx.bus
    held: list[Any] = []
    on_entry = rollouts._on_entry
    monkeypatch.setattr(rollouts, "_on_entry", held.append)  # this replica's watch lags from here

    passed = await _passed(router, signer, "bad")
    mine = rollouts.route("chat")
    theirs = msgspec.structs.replace(
        mine, canary=await rollouts.target("bad"), phase="progressing", weight=10.0, step=1, admitted=passed.id,
        admitted_by=passed.key_id, decision_id=passed.id, version=mine.version + 1, next_step_at=time.time() + 3600,
        reason="gate PASS; canary at 10%")
    routes = await bus.kv(bus.subjects.kv_routes)
    await routes.update(token("chat"), msgspec.json.encode(theirs), last=rollouts._revisions["chat"])

    read, decided = rollouts._read_decision, asyncio.Event()

    async def read_seen(name: str) -> Any:  # the gate handler's read of the BLOCK
        result = await read(name)
        if name == "bad" and result[0] is not None and result[0].decision == "BLOCK":
            decided.set()
        return result

    monkeypatch.setattr(rollouts, "_read_decision", read_seen)
    blocked = signer.sign(GateDecided(release="bad", rules=[], decision="BLOCK", reason="toxicity"))
    await gate_decided(bus, blocked)
    await asyncio.wait_for(decided.wait(), 10)
    monkeypatch.setattr(rollouts, "_on_entry", on_entry)  # the watch catches up
    for entry in held:
        on_entry(entry)
    watcher = await routes.watch(token("chat"))
    written = None  # the route in KV, as every replica reads it
    try:
        async with asyncio.timeout(10):
            while written is None or written.decision_id != blocked.id:
                entry = await watcher.updates(timeout=10)  # None: the watch's initial values are all in
                written = None if entry is None else msgspec.json.decode(entry.value, type=type(theirs))
    finally:
        await watcher.stop()
    _never_served(written, "bad", blocked)
    _never_served(rollouts.route("chat"), "bad", blocked)
    assert set(await _releases(http, router, 40)) == {"r1"}
