"""A client flooding a deployment during a rollout, on the real bus with the simulator, the drift monitor at the
production window sizes, the gatekeeper's drift policy and the router: a second app key of the tenant sends nine
requests to random users per real user's request, so nine in ten rows of both arms' windows are the flood's: with
`max_tokens: 1` one value (probe p46 F2), or with `max_tokens` drawn from 40-69 answers spread above every real one
(probe p49 F4). The canary whose real answers are three times stable's is still BLOCKed, and a canary answering as
stable is not."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import pytest

from lockgate import artifacts
from lockgate.codec import Codec
from lockgate.contracts import DriftReport
from lockgate.server.apikeys import KeyStore, bootstrap
from lockgate.server.service import ServiceContext
from lockgate.signing import ensure_signer_trusted
from lockgate_dev.sim import SimConfig, SimServer
from tests.helpers import register_model_release
from tests.integration.test_drift_canary import CANARY, PROMPTS, STABLE
from tests.integration.test_rollout_gate_drift import _decide

pytestmark = pytest.mark.timeout(180)

FLOOD = 9  # flood requests per real request
# The flood's `max_tokens`: one token (the simulator counts 2), or 40-69 of a long answer (39-69 tokens, above every
# real answer of stable, 4-16, and most of the canary's, 12-47).
FLOODS: dict[str, Callable[[random.Random], int]] = {"one-token": lambda rnd: 1,
                                                     "spread": lambda rnd: rnd.randint(40, 69)}
LONG = "long question"
WINDOW = 500  # the production default (`drift_window_size`, `drift_reference_size`)
# Nine in ten rows of either window are the flood's, so the real answers' shift weighs a tenth of each window: a canary
# three times as long reads PSI ~0.45 at 500 rows (with no flood, ~5), a canary answering as stable under 0.1.
POLICY = {"name": "canary-drift", "rules": [{"metric": "score", "op": ">=", "threshold": 0.8}],
          "drift": [{"compare": "canary_vs_stable", "max_psi": 0.3, "features": ["output_tokens"]}]}
_reports: Codec[DriftReport] = Codec(DriftReport)


def _answering_long(config: SimConfig) -> SimConfig:
    """`config` also answering LONG with 80 words, for the flood to cut."""
    spec = config.models["m"]
    long = msgspec.structs.replace(spec, answers={**spec.answers, LONG: " ".join(["word"] * 80)})
    return msgspec.structs.replace(config, models={"m": long})


async def _flooded_rollout(context: ServiceContext, run_services: Any, canary: SimConfig, real_requests: int,
                           flood: str) -> tuple[Any, list[DriftReport]]:
    """Roll out r2 (answering as `canary`) against r1 under the policy and send `real_requests` real users' requests,
    each with FLOOD requests of another key asking LONG cut at FLOODS[flood], until the rollout ends; the route and
    the canary-vs-stable reports."""
    signer = ensure_signer_trusted(context.settings)
    async with SimServer(_answering_long(STABLE)) as stable_sim, SimServer(_answering_long(canary)) as canary_sim:
        await register_model_release(context.bus, "r1", "m", "default", tenant="acme")
        await register_model_release(context.bus, "r2", "m", "canary", tenant="acme")
        context.settings = context.settings.replace(
            stable_upstream=stable_sim.url, canary_upstream=canary_sim.url, deployment="chat", app="shop",
            drift_reference_size=WINDOW, drift_window_size=WINDOW, drift_psi_threshold=1e9)  # the gate acts alone
        await _decide(context.bus, signer, "r1", "PASS", publish=False)
        router = (await run_services("drift", "gatekeeper", "router"))["router"]
        bus = router.ctx.bus
        reports = await bus.nc.subscribe(bus.subjects.drift("chat"))
        admin = bootstrap(context.settings.home, tenant="acme", app="shop").admin_key
        store = KeyStore(context.settings.home)
        real, _ = store.create("acme", "shop", description="real users")
        flooder, _ = store.create("acme", "shop", description="flooder")
        async with aiohttp.ClientSession() as s:
            policy = await artifacts.register(bus, "policy", "canary-drift", POLICY)
            body = {"stable_release": "r1", "canary_release": "r2",
                    "strategy": {"steps": [50, 100], "interval_s": 3600}}
            async with s.put(f"{router.url}/lockgate/v1/deployments/chat", json=body,
                             headers={"Authorization": f"Bearer {admin}"}) as resp:
                assert resp.status == 200, await resp.text()
            await _decide(bus, signer, "r2", "PASS", policy=policy.hash)
            await router.rollouts.wait_for(lambda r: r["chat"].phase == "progressing", timeout=10)
            rnd = random.Random(7)

            kind = flood

            async def one(key: str, i: int, flood: bool) -> None:
                req: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": PROMPTS[i % 10]}],
                                       "user": f"{'m' if flood else 'u'}-{i}-{rnd.random()}"}
                if flood:
                    req["max_tokens"] = FLOODS[kind](rnd)
                    req["messages"] = [{"role": "user", "content": LONG}]
                async with s.post(f"{router.url}/v1/chat/completions", json=req,
                                  headers={"Authorization": f"Bearer {key}"}) as resp:
                    assert resp.status == 200, await resp.text()

            sent = 0
            while sent < real_requests and router.rollouts.route("chat").phase == "progressing":
                await asyncio.gather(*(one(real, sent + i, False) for i in range(20)),
                                     *(one(flooder, (sent + i) * 100 + j, True) for i in range(20)
                                       for j in range(FLOOD)))
                sent += 20
        got = []
        while True:
            try:
                got.append(_reports.decode((await reports.next_msg(timeout=1)).data))
            except TimeoutError:
                break
        await reports.unsubscribe()
        return router.rollouts.route("chat"), [r for r in got if r.comparison == "canary_vs_stable"]


def _psi(report: DriftReport) -> float:
    return next(f.psi for f in report.features if f.feature == "output_tokens")


@pytest.mark.parametrize("flood", FLOODS)
async def test_a_flood_does_not_hide_a_canary_whose_answers_triple(
        context: ServiceContext, run_services: Any, flood: str) -> None:
    route, reports = await _flooded_rollout(context, run_services, CANARY, 600, flood)
    assert route.phase == "aborted", f"not aborted: {route.reason}; PSI {[round(_psi(r), 3) for r in reports]}"
    assert route.reason.startswith("aborted r2: gate BLOCK: drift policy 'canary-drift' of deployment 'chat' "
                                   "(canary vs stable)")
    assert "DRIFT in output_tokens (PSI" in route.reason
    acted = next(r for r in reports if _psi(r) > 0.3)
    out = next(f for f in acted.features if f.feature == "output_tokens")
    assert (out.reference_size, out.current_size) == (WINDOW, WINDOW)
    # Most of either window is the flood's answers: one token (2 as the simulator counts them), or 39-69 tokens.
    flood_mean = (2, 2) if flood == "one-token" else (39, 69)
    assert flood_mean[0] <= out.reference_mean <= flood_mean[1] + 2 and out.psi > 0.3
    assert flood_mean[0] <= out.current_mean <= flood_mean[1] + 6


@pytest.mark.parametrize("flood", FLOODS)
async def test_the_same_flood_with_a_canary_answering_as_stable_is_not_blocked(
        context: ServiceContext, run_services: Any, flood: str) -> None:
    route, reports = await _flooded_rollout(context, run_services, STABLE, 300, flood)
    assert route.phase == "progressing", route.reason
    assert len(reports) >= 2 and max(_psi(r) for r in reports) < 0.3
