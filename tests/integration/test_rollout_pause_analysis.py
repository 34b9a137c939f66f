"""A timed pause step of an analysed canary ends on a passing look, never on the clock alone (probe p75 F2), on the
real nats-server, chDB and the simulator."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from lockgate.signing import Signer
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import ERRORS, _pass, _start, _traffic_until

http, keys, router, signer = analysis_tests.http, analysis_tests.keys, analysis_tests.router, analysis_tests.signer

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("steps", [
    [{"pause": {"duration_s": 1}}],
    [{"set_header_route": {"header": "x-lockgate-canary", "value": "always"}}, {"pause": {"duration_s": 1}}],
])
async def test_a_timed_pause_over_without_evidence_never_promotes_an_analysed_canary(
        router: Any, http: aiohttp.ClientSession, signer: Signer, steps: list[Any]) -> None:
    # "bad" fails 5% of its calls, and no request is sent: no look can pass (min_sample 100).
    await _start(http, router, "bad", {"steps": steps, "interval_s": 0.5, "analysis": ERRORS})
    await _pass(router, signer, "bad")
    paused = router.rollouts.route("chat")
    assert paused.step_pause and paused.resume_at > 0, paused.reason

    def looked_after_the_pause(routes: dict[str, Any]) -> bool:
        r = routes["chat"]
        return r.phase != "progressing" or (r.analysis is not None and r.analysis.at >= paused.resume_at)

    await router.rollouts.wait_for(looked_after_the_pause, timeout=30)
    route = router.rollouts.route("chat")
    assert (route.phase, route.stable.release, route.weight) == ("progressing", "r1", 0.0), route.reason
    assert route.analysis.last.verdict == "WAITING" and route.paused  # it waits for evidence, as a step does


async def test_a_canary_slow_during_its_final_timed_pause_is_aborted_not_promoted(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # The pause ends when its first look is due (duration = interval = window): before, the clock ended it first and
    # promoted the canary with nothing of the pause judged.
    await _start(http, router, "same", {"steps": [50, {"pause": {"duration_s": 1}}], "interval_s": 1.0,
                                        "analysis": {**ERRORS, "window_s": 1.0, "min_sample": 10}})
    await _pass(router, signer, "same")
    spec = router.canary_sim._models["same"].spec
    was = spec.latency_ms

    async def slow_from_the_pause() -> None:
        await router.rollouts.wait_for(lambda r: r["chat"].step >= 2 or r["chat"].phase != "progressing",
                                       timeout=60)
        spec.latency_ms = 400.0  # 400 ms slower from the pause on (no breaker trips on latency)

    slowing = asyncio.create_task(slow_from_the_pause())
    try:
        await _traffic_until(http, router, lambda r: r.phase != "progressing", batch=20)
        await slowing
    finally:
        spec.latency_ms = was
    route = router.rollouts.route("chat")
    assert (route.phase, route.stable.release) == ("aborted", "r1"), route.reason
    assert "latency_p95" in route.reason and "at step 2 (50%)" in route.reason, route.reason
