"""Drift that acts, canary versus stable, on the real bus with the simulator: live traffic through the router,
the drift monitor comparing the canary's window with the stable variant's, the gatekeeper's drift policy
signing a BLOCK naming the feature, and the router rolling the canary back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from lockgate import artifacts
from lockgate.codec import Codec
from lockgate.contracts import DriftReport, GateDecided
from lockgate.server.apikeys import Bootstrap, bootstrap
from lockgate.server.service import ServiceContext
from lockgate.signing import Signer, Verifier, ensure_signer_trusted
from lockgate.subjects import token
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import register_model_release
from tests.integration.test_rollout_gate_drift import _decide

pytestmark = pytest.mark.timeout(120)

PROMPTS = [f"q{i}" for i in range(10)]
# Answers of 3 to 12 words on stable; the canary's are three times as long, for the same prompts.
STABLE = SimConfig(models={"m": ModelSpec(answers={p: " ".join(["word"] * (3 + i)) for i, p in enumerate(PROMPTS)})},
                   seed=3)
CANARY = SimConfig(models={"m": ModelSpec(answers={p: " ".join(["word"] * 3 * (3 + i))
                                                   for i, p in enumerate(PROMPTS)})}, seed=3)
POLICY = {"name": "canary-drift", "rules": [{"metric": "score", "op": ">=", "threshold": 0.8}],
          "drift": [{"compare": "canary_vs_stable", "max_psi": 0.5, "features": ["output_tokens"]}]}
_decided: Codec[GateDecided] = Codec(GateDecided)
_reports: Codec[DriftReport] = Codec(DriftReport)


@pytest.fixture
async def stack(context: ServiceContext, run_services: Any) -> AsyncIterator[tuple[Any, Signer]]:
    signer = ensure_signer_trusted(context.settings)  # the key the gatekeeper service signs with
    async with SimServer(STABLE) as stable, SimServer(CANARY) as canary:
        # Registered under the tenant whose key sends the traffic: a release is judged on its own tenant's events.
        await register_model_release(context.bus, "r1", "m", "default", tenant="acme")
        await register_model_release(context.bus, "r2", "m", "canary", tenant="acme")
        # The monitor's own alarm threshold is out of reach, so the router never aborts on a report by itself:
        # the rollback below is the gate's drift policy acting, nothing else.
        context.settings = context.settings.replace(stable_upstream=stable.url, canary_upstream=canary.url,
                                                    deployment="chat", app="shop", drift_psi_threshold=1e9)
        await _decide(context.bus, signer, "r1", "PASS", publish=False)
        services = await run_services("drift", "gatekeeper", "router")
        yield services["router"], signer


@pytest.fixture
async def http(context: ServiceContext) -> AsyncIterator[aiohttp.ClientSession]:
    keys: Bootstrap = bootstrap(context.settings.home, tenant="acme", app="shop")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as s:
        yield s


async def test_a_canary_whose_output_triples_against_stable_is_blocked_by_the_drift_policy_and_rolled_back(
        stack: tuple[Any, Signer], http: aiohttp.ClientSession) -> None:
    router, signer = stack
    bus = router.ctx.bus
    reports = await bus.nc.subscribe(bus.subjects.drift("chat"))
    policy = await artifacts.register(bus, "policy", "canary-drift", POLICY)
    body = {"stable_release": "r1", "canary_release": "r2", "strategy": {"steps": [50, 100], "interval_s": 3600}}
    async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=body) as resp:
        assert resp.status == 200, await resp.text()
    await _decide(bus, signer, "r2", "PASS", policy=policy.hash)
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "progressing", timeout=10)

    async def one(i: int) -> None:
        req = {"model": "m", "messages": [{"role": "user", "content": PROMPTS[i % 10]}], "user": f"user-{i}"}
        async with http.post(f"{router.url}/v1/chat/completions", json=req) as resp:
            assert resp.status == 200, await resp.text()

    sent = 0
    while router.rollouts.route("chat").phase == "progressing" and sent < 2000:  # half of users on the canary
        await asyncio.gather(*(one(sent + i) for i in range(40)))
        sent += 40
    route = router.rollouts.route("chat")
    assert route.phase == "aborted", f"not aborted after {sent} requests: {route.reason}"
    assert route.weight == 0.0 and route.stable.release == "r1"
    assert route.reason.startswith("aborted r2: gate BLOCK: drift policy 'canary-drift' of deployment 'chat' "
                                   "(canary vs stable)")
    assert "DRIFT in output_tokens (PSI" in route.reason and "of stable r1" in route.reason

    stored = _decided.decode((await (await bus.kv(bus.subjects.kv_gates)).get(token("r2"))).value)
    assert (stored.decision, stored.policy, stored.key_id) == ("BLOCK", policy.hash, signer.key_id)
    await Verifier(bus, router.ctx.settings).verify(stored)  # signed by the trusted gatekeeper key
    # the drift rule, and the veto that holds a re-run of the eval of the same content for an approver
    assert [(r.verdict, r.metric) for r in stored.rules] == [("FAIL", "drift_psi:output_tokens"), ("FAIL", "review")]

    # The report it acted on: the canary's window against the stable one's, the test and sizes per feature.
    while True:
        report = _reports.decode((await reports.next_msg(timeout=10)).data)
        if report.comparison == "canary_vs_stable":
            break
    await reports.unsubscribe()
    assert (report.release, report.reference_release) == ("r2", "r1") and not report.drifted
    out = next(f for f in report.features if f.feature == "output_tokens")
    assert out.test == "ks" and out.test_drifted and out.p_value is not None and out.p_value < 1e-6
    # Each window holds 50 requests whose prompt mix depends on how users fell into the arms (a salted hash drawn
    # per rollout), so the ratio of means varies around 3 by some 15%; twice stable's is far outside stable's own.
    assert out.current_mean > 2 * out.reference_mean and out.psi > 0.5
    assert (out.reference_size, out.current_size) == (50, 50)
    # Every feature is reported with its own sizes; only the policy's feature (output tokens) judged the canary
    # (the canary's longer answers take longer too, so latency may drift as much on a loaded machine).
    latency = next(f for f in report.features if f.feature == "latency_ms")
    assert (latency.reference_size, latency.current_size) == (50, 50)
