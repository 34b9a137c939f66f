"""The analysis' `drift` metric on the real nats-server, chDB and the simulator: the drift monitor's report of
the canary's window against stable's is evidence for the router's analysis, which aborts a canary whose answers
triple in length (its signed, stored record naming the feature) and promotes a no-op one. No drift policy is
set, and the router's direct abort on a DRIFT report defers to the analysis: the abort is the analysis' own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner

from lockgate.cli.main import cli
from lockgate.contracts import GateDecided
from lockgate.server.service import ServiceContext
from lockgate.signing import Signer
from lockgate.subjects import token
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import register_model_release, sink_stored
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import _pass, _start, _traffic_until

http, keys, signer = analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)

ANSWER = "stable says hi to you"
STABLE = SimConfig(models={"m": ModelSpec(default=ANSWER)}, seed=3)
# On the canary upstream "echo" answers as stable does; "long" answers three times as long.
CANARY = SimConfig(models={"echo": ModelSpec(default=ANSWER), "long": ModelSpec(default=" ".join([ANSWER] * 3))},
                   seed=3)
DRIFT = {"metrics": [{"name": "drift", "max": 0, "features": ["output_tokens", "finish_reason", "status"]}],
         "min_sample": 20, "failure_limit": 0, "inconclusive_limit": 1000}


@pytest.fixture
async def router(context: ServiceContext, run_services: Any, signer: Signer) -> AsyncIterator[Any]:
    async with SimServer(STABLE) as stable, SimServer(CANARY) as canary:
        await register_model_release(context.bus, "r1", "m", "default")
        await register_model_release(context.bus, "echo", "echo", "canary")
        await register_model_release(context.bus, "long", "long", "canary")
        kv = await context.bus.kv(context.bus.subjects.kv_gates)
        await kv.put(token("r1"), msgspec.json.encode(signer.sign(GateDecided(release="r1", rules=[], decision="PASS"))))
        context.settings = context.settings.replace(stable_upstream=stable.url, canary_upstream=canary.url,
                                                    deployment="chat", app="shop")
        services = await run_services("sink", "drift", "router")
        router = services["router"]
        router.sink = services["sink"]
        router.drift = services["drift"]
        yield router


async def _reference(router: Any, http: Any) -> None:
    """Stable-only traffic while the canary waits for its decision: the drift monitor's reference."""
    reference = router.ctx.settings.drift_reference_size
    await _traffic_until(http, router, lambda r: False, limit=reference, batch=reference // 5)
    await router.drift.handlers.events.wait_for(reference, 30)


async def test_a_canary_whose_answers_triple_is_aborted_by_its_drift_metric_and_the_record_names_the_feature(
        router: Any, http: Any, signer: Signer) -> None:
    await _start(http, router, "long", {"steps": [50, 100], "interval_s": 0.2, "analysis": DRIFT})
    await _reference(router, http)
    await _pass(router, signer, "long")
    sent = await _traffic_until(http, router, lambda r: r.phase == "aborted", limit=3000)
    route = router.rollouts.route("chat")
    assert route.phase == "aborted", f"not aborted after {sent} requests: {route.reason}"
    assert (route.weight, route.stable.release) == (0.0, "r1")
    # The analysis aborted it (not the router's direct abort on the report: "drift report ... DRIFT in").
    assert route.reason.startswith("aborted long: analysis failed at step 1 (50%): drift 1 drifted features > max 0: "
                                   "DRIFT in output_tokens (PSI"), route.reason
    assert route.analysis is not None and route.analysis.last is not None
    (metric,) = route.analysis.last.metrics
    assert metric.features == ["output_tokens"] and metric.verdict == "FAILED"

    looks = route.analysis.look
    await router.rollouts.flush()
    await sink_stored(router.sink.handlers, analysis_runs=looks)
    shown = await _cli(router, "analysis", "chat", "--json")
    assert shown.exit_code == 0, shown.output
    last = msgspec.json.decode(shown.output)[0]  # newest first: the look that aborted it, signed and verified
    assert (last["verified"], last["phase"], last["outcome"], last["drifted_features"]) == (
        True, "Failed", "aborted", ["output_tokens"])
    (drift,) = last["metrics"]
    assert (drift["name"], drift["verdict"], drift["canary"], drift["threshold"]) == ("drift", "FAILED", 1.0, 0.0)
    assert drift["condition"] == "<= 0 drifted features among output_tokens, finish_reason, status"
    # The report it read: the canary's window against stable's, or (before one is due) now against the reference.
    assert "DRIFT in output_tokens (PSI" in drift["why"] and ("canary_vs_stable report" in drift["why"]
                                                              or "now_vs_reference report" in drift["why"])
    table = await _cli(router, "analysis", "chat")
    assert table.exit_code == 0 and "drifted" in table.output and "verified" in table.output


async def test_a_noop_canary_with_a_drift_metric_is_promoted(router: Any, http: Any, signer: Signer) -> None:
    await _start(http, router, "echo", {"steps": [50, 100], "interval_s": 0.2, "analysis": DRIFT})
    await _reference(router, http)
    await _pass(router, signer, "echo")
    sent = await _traffic_until(http, router, lambda r: r.phase == "promoted", limit=3000)
    route = router.rollouts.route("chat")
    assert route.phase == "promoted", f"not promoted after {sent} requests: {route.reason}"
    assert route.stable.release == "echo" and route.analysis is not None and route.analysis.last is not None
    (metric,) = route.analysis.last.metrics
    assert metric.verdict == "SUCCESSFUL" and metric.canary == 0.0 and "no harmful drift" in metric.why


def _base(router: Any) -> list[str]:
    s = router.ctx.settings
    return ["--home", s.home, "--nats", s.nats_url, "--prefix", s.prefix, "--database", s.database,
            "rollout", "--router", router.url]


async def _cli(router: Any, *args: str) -> Any:
    env = {"LOCKGATE_CLICKHOUSE_URL": router.ctx.settings.clickhouse_url}
    return await asyncio.to_thread(CliRunner().invoke, cli, [*_base(router), *args], env=env)
