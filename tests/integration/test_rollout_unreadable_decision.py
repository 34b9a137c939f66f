"""A canary whose release's current value in the gates bucket is no decision (probe p68 F1: a signed BLOCK whose rule's
threshold, -inf, JSON wrote `null`) is admitted by nothing: raising it is refused and takes it back to 0%."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from lockgate.codec import encode
from lockgate.contracts import GateDecided, RuleResult
from lockgate.signing import Signer
from lockgate.subjects import token
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import _pass, _start

router, http, keys, signer = analysis_tests.router, analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)


async def test_a_canary_whose_current_value_does_not_decode_is_not_raised_and_goes_back_to_zero(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    await _start(http, router, "same", {"steps": [10, 50, 100], "interval_s": 3600})
    await _pass(router, signer, "same")
    await router.rollouts.wait_for(lambda r: r["chat"].weight == 10.0, timeout=10)
    inf = RuleResult(rule="per-slice", metric="m", op=">=", threshold=float("-inf"), observed=None, verdict="NO_DATA")
    blocked = signer.sign(GateDecided(release="same", decision="BLOCK", rules=[inf]))
    bus = router.ctx.bus
    await (await bus.kv(bus.subjects.kv_gates)).put(token("same"), encode(blocked))  # as the gatekeeper stored it
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/set-weight", json={"weight": 90}) as resp:
        answer = await resp.json()
    assert resp.status == 409 and answer["error"]["code"] == "not_admitted", answer
    route = router.rollouts.route("chat")
    assert (route.weight, route.phase, route.stable.release) == (0.0, "idle", "r1"), route.reason
    assert "Expected `float`, got `null` - at `$.rules[0].threshold`" in route.reason, route.reason
