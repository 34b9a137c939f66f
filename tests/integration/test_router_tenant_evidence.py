"""Another tenant's answers under a deployment's name are never that deployment's evidence, on the real nats-server
with the simulator, the router's HTTP API and the evaluator scoring what the router served (probe p25 F2).

Before: under passthrough, tenant acme's own app key naming tenant default's deployment `chat` was served by the
default route (right: as a name nobody configured), recorded under the name `chat`; the evaluator scored those
answers as served ones of `chat`, and the router counted each release-less score as the stable release's: acme's
short answers, averaged into stable's, aborted default's good canary on a `score:length` metric."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from lockgate.codec import Codec
from lockgate.contracts import InferenceScored
from lockgate.server.apikeys import KeyStore, bootstrap
from lockgate.server.service import ServiceContext
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate_dev.sim import SimServer
from tests.helpers import chat_releases, eventually
from tests.integration.test_online_eval import CANARY, STABLE
from tests.integration.test_rollout_analysis import _pass, _start

pytestmark = pytest.mark.timeout(120)
_scored: Codec[InferenceScored] = Codec(InferenceScored)
N = 20  # requests of each tenant
# Collecting (a score metric) but never deciding within the test: the canary keeps its first step.
WAITING = {"metrics": [{"name": "score", "scorer": "length", "max_increase": 5, "min_scores": 100_000}],
           "min_sample": 100_000, "failure_limit": 0, "inconclusive_limit": 1000}


@pytest.fixture
async def stack(context: ServiceContext, run_services: Any) -> AsyncIterator[tuple[Any, Any, Signer]]:
    signer = Signer.generate()
    trust_key(trust_file_path(context.settings), signer.public)
    async with SimServer(STABLE) as stable, SimServer(CANARY) as canary:
        # Passthrough: a name nobody configured (so another tenant's deployment) is served by the default route.
        await chat_releases(context, signer, stable.url, canary.url, ("leaky",), online_eval_sample=1.0,
                            passthrough=True)
        services = await run_services("router", "evaluator")
        yield services["router"], services["evaluator"], signer


def _held(router: Any) -> set[str]:
    """The answers whose scores the router holds as evidence of either arm of `chat`."""
    rings = router.rollouts.evidence._scores
    return {event_id for release in ("r1", "leaky") for ring in rings.get(("chat", release), {}).values()
            for event_id in ring}


async def _send(router: Any, key: str, n: int, **headers: str) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}", **headers}) as http:
        for i in range(n):
            body = {"model": "m", "max_tokens": 1, "user": f"user-{i}",
                    "messages": [{"role": "user", "content": f"question {i}"}]}
            async with http.post(f"{router.url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()


async def test_another_tenants_answers_under_a_deployments_name_are_not_its_evidence(
        stack: tuple[Any, Any, Signer], context: ServiceContext) -> None:
    router, evaluator, signer = stack
    keys = bootstrap(context.settings.home, tenant="default", app="shop")  # the tenant whose releases `chat` serves
    acme, _ = KeyStore(context.settings.home).create("acme", "shop")  # another tenant's app key, same app name
    bus = context.bus
    seen: list[InferenceScored] = []

    async def on(msg: Any) -> None:
        seen.append(_scored.decode(msg.data))

    await bus.nc.subscribe(bus.subjects.eval_scores("chat"), cb=on)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as http:
        await _start(http, router, "leaky", {"steps": [50, 100], "interval_s": 3600, "analysis": WAITING})
    await _pass(router, signer, "leaky")

    # acme's app key names default's deployment: answered by the default route, as a name nobody configured.
    await _send(router, acme, N, **{"x-lockgate-deployment": "chat"})
    await evaluator.online.scored.wait_for(N, timeout_s=30)
    theirs = {s.event_id for s in seen if s.tenant == "acme"}
    assert len(theirs) == N and {(s.served, s.release) for s in seen if s.tenant == "acme"} == {(True, "")}

    # Then default's own users: once the router holds their scores, it has taken (or dropped) acme's, scored first.
    await _send(router, keys.app_key, N)
    await evaluator.online.scored.wait_for(2 * N, timeout_s=30)

    def own() -> set[str]:
        return {s.event_id for s in seen if s.tenant == "default"}

    await eventually(lambda: len(own()) == N, [evaluator.online.scored], timeout_s=30, what="default's scores")
    await router.rollouts.wait_for_scores(lambda: own() <= _held(router), timeout=30)
    assert _held(router) & theirs == set(), "another tenant's answers counted as the deployment's evidence"
    assert _held(router) == own()
    route = router.rollouts.route("chat")
    assert (route.phase, route.weight) == ("progressing", 50)
