"""A blue-green release that degrades under its post-promotion analysis is rolled back for drift, whatever else the
router announces of its promoted route meanwhile (probe p69 F1): real router, gatekeeper and drift monitor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from lockgate.codec import Codec
from lockgate.contracts import RolloutState
from lockgate.server.apikeys import Bootstrap, bootstrap
from lockgate.server.service import ServiceContext
from lockgate.signing import Signer, ensure_signer_trusted
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import register_model_release
from tests.integration.test_rollout_gate_drift import _canary, _decide, _promote

pytestmark = pytest.mark.timeout(120)
PROMPTS = [f"q{i}" for i in range(10)]
SHORT = {p: " ".join(["word"] * (3 + i)) for i, p in enumerate(PROMPTS)}
LONG = {p: " ".join(["word"] * 8 * (3 + i)) for i, p in enumerate(PROMPTS)}  # the degraded release's: 8x as long
# Never ends on its own: the drift report rolls the release back.
NEVER = {"metrics": [{"name": "error_rate", "max_increase": 0.5}], "min_sample": 20, "count": 100000,
         "inconclusive_limit": 100000, "failure_limit": 100}
_states: Codec[RolloutState] = Codec(RolloutState)


@pytest.fixture
async def stack(context: ServiceContext, run_services: Any) -> AsyncIterator[tuple[Any, Any, Signer, SimServer]]:
    signer = ensure_signer_trusted(context.settings)
    async with SimServer(SimConfig(models={"m": ModelSpec(answers=SHORT)}, seed=3)) as stable, \
            SimServer(SimConfig(models={"m": ModelSpec(answers=SHORT)}, seed=3)) as canary:
        for release, endpoint in (("r1", "default"), ("r2", "canary"), ("r3", "canary")):
            await register_model_release(context.bus, release, "m", endpoint, tenant="acme")
        context.settings = context.settings.replace(stable_upstream=stable.url, canary_upstream=canary.url,
                                                    deployment="chat", app="shop")
        await _decide(context.bus, signer, "r1", "PASS", publish=False)
        services = await run_services("drift", "gatekeeper", "router")
        yield services["router"], services["drift"].handlers, signer, canary


@pytest.fixture
async def http(context: ServiceContext) -> AsyncIterator[aiohttp.ClientSession]:
    keys: Bootstrap = bootstrap(context.settings.home, tenant="acme", app="shop")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as s:
        yield s


async def _send(http: aiohttp.ClientSession, router: Any, drift: Any, n: int) -> None:
    """`n` requests one after another, then wait until the drift monitor observed their answers."""
    start = drift.events.count
    for i in range(n):
        req = {"model": "m", "messages": [{"role": "user", "content": PROMPTS[i % 10]}], "user": f"user-{i}"}
        async with http.post(f"{router.url}/v1/chat/completions", json=req) as resp:
            assert resp.status == 200, await resp.text()
    await drift.events.wait_for(start + n)


async def test_a_degrading_blue_green_release_is_rolled_back_for_drift_after_a_block_of_an_old_release(
        stack: tuple[Any, Any, Signer, SimServer], http: aiohttp.ClientSession) -> None:
    # The router announces the promoted route again on a BLOCK of an old known-good release that serves nowhere.
    # (The analysis passing its progress deadline is announced alike: test_drift_service's
    # test_a_promotion_announced_again_keeps_the_promoted_releases_reference covers both announcements.)
    router, drift, signer, canary = stack
    states: list[RolloutState] = []  # what the router announced, as the drift monitor reads it (in order)
    heard = asyncio.Event()

    async def on_state(msg: Any) -> None:
        states.append(_states.decode(msg.data))
        heard.set()

    await router.ctx.bus.nc.subscribe(router.ctx.bus.subjects.rollout("chat"), cb=on_state)
    # r1 -> r3 (promoted: known-good, the release to go back to), then blue-green r3 -> r2, promoted.
    await _canary(http, router, signer, "r1", "r3")
    await _promote(http, router)
    await _canary(http, router, signer, "r3", "r2",
                  strategy={"interval_s": 1, "blue_green": {"post_promotion_analysis": NEVER,
                                                            "scale_down_delay_s": 3600}})
    await _promote(http, router)
    await drift.resets.wait_for(2)  # each promotion restarted the windows
    await _send(http, router, drift, 50)  # r2's healthy answers: the monitor's new reference
    canary._models["m"].answers = dict(LONG)  # then r2 degrades
    await _send(http, router, drift, 20)
    await _decide(router.ctx.bus, signer, "r1", "BLOCK")  # known-good once, serving nowhere
    async with asyncio.timeout(30):  # until the router announced it ...
        while not any("gate BLOCK of known-good r1" in st.reason for st in states):
            heard.clear()
            await heard.wait()
    await drift.rollouts.wait_for(len(states))  # ... and the monitor read it
    route = router.rollouts.route("chat")
    assert (route.phase, route.stable.release, route.verifying) == ("promoted", "r2", True)
    # Before, probe p69 F1, the announcement restarted the windows: the reference refilled from the degraded
    # answers, and r2 served on. Now the next window's report is drift against r2's healthy reference.
    await _send(http, router, drift, 30)
    await router.rollouts.wait_for(lambda r: r["chat"].stable.release == "r3", timeout=30)
    reason = router.rollouts.route("chat").reason
    assert reason.startswith("rolled back r2: drift report ") and "DRIFT in output_tokens" in reason, reason
    await drift.resets.wait_for(3)  # the rollback restarted them with the release back in service
