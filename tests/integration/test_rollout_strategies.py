"""Canary step kinds and blue-green on the real nats-server, chDB and the simulator: header routes send
tagged requests to the candidate, pause steps hold until approved, a blue-green preview is reachable
only by header, promotes all at once, and a failed post-promotion analysis rolls back."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec
import pytest
from click.testing import CliRunner

from lockgate.cli.main import cli
from lockgate.contracts import GateDecided
from lockgate.server.apikeys import KeyStore
from lockgate.services.router import progress
from lockgate.signing import Signer
from lockgate.subjects import token
from tests.helpers import gate_decided, judged
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import ERRORS, _pass, _start, _traffic_until

# The router stack of the analysis tests (simulated stable and canary upstreams, releases, signed decisions).
router, http, keys, signer = analysis_tests.router, analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)
TESTER = {"x-lockgate-canary": "always"}
PREVIEW = {"x-lockgate-preview": "always"}


async def _releases(http: aiohttp.ClientSession, router: Any, n: int, headers: dict[str, str] | None = None) -> list[str]:
    """The release that answered each of n requests from distinct users."""
    url = f"{router.url}/v1/chat/completions"

    async def one(i: int) -> str:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": f"user-{i}"}
        async with http.post(url, json=body, headers=headers or {}) as resp:
            await resp.read()
            return resp.headers["x-lockgate-release"]

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _post(http: aiohttp.ClientSession, router: Any, action: str, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/{action}", headers=headers) as resp:
        return resp.status, await resp.json()


async def test_header_route_sends_tagged_requests_to_the_canary_at_zero_weight(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    await _start(http, router, "same", {"steps": [{"set_header_route": {"header": "X-Lockgate-Canary",
                                                                        "value": "always"}},
                                                  {"pause": {}}, 50], "interval_s": 0.1})
    assert set(await _releases(http, router, 20, TESTER)) == {"r1"}  # no decision yet: no canary for anyone
    await _pass(router, signer, "same")
    route = router.rollouts.route("chat")
    assert (route.weight, route.paused, route.step_pause) == (0.0, True, True)
    assert set(await _releases(http, router, 40, TESTER)) == {"same"}  # internal testers see the canary first
    assert set(await _releases(http, router, 100)) == {"r1"}  # everyone else: stable
    assert set(await _releases(http, router, 20, {"x-lockgate-canary": "never"})) == {"r1"}


async def test_pause_until_approved_holds_until_an_operator_resumes(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # An interval long enough that the approval's answer shows the 100% step, not the promotion after it.
    await _start(http, router, "same", {"steps": [20, {"pause": {}}, 100], "interval_s": 1})
    await _pass(router, signer, "same")
    await router.rollouts.wait_for(lambda r: r["chat"].step_pause, timeout=10)
    held = router.rollouts.route("chat")
    assert (held.weight, held.paused, held.phase) == (20.0, True, "progressing")
    assert "paused until approved" in held.reason and progress.due_at(held) is None  # nothing will move it
    await _traffic_until(http, router, lambda r: False, limit=200)
    assert router.rollouts.route("chat") == held  # traffic and the timer leave it where it is

    viewer, _ = KeyStore(router.ctx.settings.home).create("acme", "ops", "viewer")
    status, _ = await _post(http, router, "approve", viewer)
    assert status == 403 and router.rollouts.route("chat").paused
    operator, rec = KeyStore(router.ctx.settings.home).create("default", "ops", "operator", "on call")
    s = router.ctx.settings
    result = await asyncio.to_thread(
        CliRunner().invoke, cli, ["--home", s.home, "--nats", s.nats_url, "--prefix", s.prefix, "rollout",
                                  "--router", router.url, "--api-key", operator, "approve", "chat"])
    assert result.exit_code == 0, result.output
    assert f"approved at step 2 (20%) by {rec.label}" in result.output and "canary at 100%" in result.output
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "promoted", timeout=10)


async def test_blue_green_preview_by_header_only_promotion_switches_all_traffic_abort_swaps_back(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    await _start(http, router, "same", {"interval_s": 0.1, "blue_green": {"scale_down_delay_s": 3600}})
    await _pass(router, signer, "same")
    assert set(await _releases(http, router, 200)) == {"r1"}  # the preview gets no user traffic
    assert set(await _releases(http, router, 20, PREVIEW)) == {"same"}
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/set-weight", json={"weight": 10}) as resp:
        assert resp.status == 409 and "blue-green" in (await resp.json())["error"]["message"]
    status, body = await _post(http, router, "promote")
    assert status == 200, body
    assert body["stable"]["release"] == "same" and "r1 kept for instant rollback for 3600 s" in body["reason"]
    assert set(await _releases(http, router, 100)) == {"same"}  # promotion switches all traffic at once
    status, body = await _post(http, router, "abort")
    assert status == 200, body
    assert body["stable"]["release"] == "r1" and body["reason"].startswith("rolled back same: aborted by apikey:")
    assert set(await _releases(http, router, 100)) == {"r1"}


async def test_a_blue_green_release_aborted_after_its_promotion_is_no_longer_known_good(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Found by a probe (p5): an abort within the scale-down window swapped back but left the aborted release in the
    # route's known-good history, so a later BLOCK of the old stable put all traffic back on the release the
    # operator had stopped a minute earlier.
    await _start(http, router, "same", {"interval_s": 0.1, "blue_green": {"scale_down_delay_s": 3600}})
    await _pass(router, signer, "same")
    status, body = await _post(http, router, "promote")
    assert status == 200 and [t["release"] for t in body["good"]] == ["r1", "same"], body
    status, body = await _post(http, router, "abort")
    assert status == 200 and body["stable"]["release"] == "r1", body
    assert [t["release"] for t in body["good"]] == ["r1"], body
    bus = router.ctx.bus
    await gate_decided(bus, signer.sign(GateDecided(
        release="r1", rules=[], decision="BLOCK", reason="a sunset artifact")))
    await router.rollouts.wait_for(lambda r: "gate BLOCK" in r["chat"].reason, timeout=10)
    route = router.rollouts.route("chat")
    assert route.stable.release == "r1" and "NO known-good release to roll back to: still serving r1" in route.reason
    assert set(await _releases(http, router, 50)) == {"r1"}


async def test_blue_green_undo_puts_the_previous_release_back_only_if_its_gate_allows_it_now(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # The previous release was known-good when it was replaced; the gate may have BLOCKed it since (as `undo --to`
    # checks). An abort, the operator stopping the new release, still swaps back: it is always allowed.
    await _start(http, router, "same", {"interval_s": 0.1, "blue_green": {"scale_down_delay_s": 3600}})
    await _pass(router, signer, "same")
    status, body = await _post(http, router, "promote")
    assert status == 200 and body["stable"]["release"] == "same", body
    kv = await router.ctx.bus.kv(router.ctx.bus.subjects.kv_gates)
    blocked = signer.sign(GateDecided(release="r1", rules=[], decision="BLOCK", reason="a sunset artifact"))
    await kv.put(token("r1"), msgspec.json.encode(blocked))
    status, body = await _post(http, router, "undo")
    assert status == 409 and "previous release 'r1' is BLOCKed by the gate" in body["error"]["message"], body
    assert router.rollouts.route("chat").stable.release == "same" and set(await _releases(http, router, 20)) == {"same"}
    await kv.put(token("r1"), msgspec.json.encode(signer.sign(GateDecided(
        release="r1", rules=[], decision="PASS", artifacts=await judged(router.ctx.bus, "r1")))))
    status, body = await _post(http, router, "undo")
    assert status == 200 and body["stable"]["release"] == "r1", body


@pytest.mark.parametrize("action", ["abort", "undo"])
async def test_a_promotion_under_post_promotion_analysis_swaps_back_with_no_scale_down_delay(
        router: Any, http: aiohttp.ClientSession, signer: Signer, action: str) -> None:
    # Found by a probe (p83 F3): with `scale_down_delay_s: 0` and the post-promotion analysis running, an abort was
    # refused ("canary of 'chat' is already promoted") and an undo too ("old release 'r1' ... is scaled down ... start
    # a new rollout"), while an automatic rollback and `undo --to r1` went back to it. Until the analysis ends the old
    # release is where a rollback goes: an abort rolls back as a failed analysis does, an undo swaps it back.
    post = {"metrics": [{"name": "error_rate", "max_increase": 0.01}], "min_sample": 5000, "failure_limit": 0,
            "inconclusive_limit": 1000}
    await _start(http, router, "same", {"interval_s": 0.2, "blue_green": {"scale_down_delay_s": 0,
                                                                          "post_promotion_analysis": post}})
    await _pass(router, signer, "same")
    status, body = await _post(http, router, "promote")
    assert status == 200 and body["verifying"] and body["stable"]["release"] == "same", body
    status, body = await _post(http, router, action)
    assert status == 200 and body["stable"]["release"] == "r1", body
    assert set(await _releases(http, router, 20)) == {"r1"}


async def test_an_undo_after_the_scale_down_names_the_undo_that_reaches_the_old_release(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # The old release scaled down, a bare undo is refused, naming what still puts it back (probe p83 F3: it said
    # "start a new rollout", yet `undo --to r1` did).
    await _start(http, router, "same", {"interval_s": 0.1, "blue_green": {"scale_down_delay_s": 0}})
    await _pass(router, signer, "same")
    status, body = await _post(http, router, "promote")
    assert status == 200 and not body["verifying"], body
    status, body = await _post(http, router, "undo")
    assert status == 409 and "lockgate rollout undo chat --to r1" in body["error"]["message"], body
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/undo", json={"to": "r1"}) as resp:
        status, body = resp.status, await resp.json()
    assert status == 200 and body["stable"]["release"] == "r1", body


async def test_blue_green_failed_post_promotion_analysis_rolls_back(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    await _start(http, router, "bad", {"interval_s": 0.1, "blue_green": {"post_promotion_analysis": ERRORS}})
    await _pass(router, signer, "bad")
    await _traffic_until(http, router, lambda r: False, limit=400)  # the old release's evidence
    status, body = await _post(http, router, "promote")
    assert status == 200 and body["verifying"], body
    sent = await _traffic_until(http, router, lambda r: r.phase == "aborted")
    route = router.rollouts.route("chat")
    assert route.phase == "aborted", f"not rolled back after {sent} requests: {route.reason}"
    assert route.stable.release == "r1" and route.reason.startswith(
        "rolled back bad: post-promotion analysis failed: error_rate ")
    assert "> threshold" in route.reason
    assert set(await _releases(http, router, 50)) == {"r1"}
