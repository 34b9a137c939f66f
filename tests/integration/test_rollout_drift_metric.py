"""The analysis' `drift` metric on the real nats-server, chDB and the simulator: the drift monitor's report of
the canary's window against stable's is evidence for the router's analysis, which aborts a canary whose answers
triple in length (its signed, stored record naming the feature) and promotes a no-op one. No drift policy is
set, and the router's direct abort on a DRIFT report defers to the analysis: the abort is the analysis' own."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from lockgate.services.router.domain import Route
from lockgate.signing import Signer
from tests.helpers import sink_stored
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import _pass, _start, _traffic_until
from tests.integration.test_rollout_operate import _cli

router, http, keys, signer = analysis_tests.router, analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)

DRIFT = {"metrics": [{"name": "drift", "max": 0, "features": ["output_tokens", "finish_reason", "status"]}],
         "min_sample": 20, "failure_limit": 0, "inconclusive_limit": 1000}


async def _rollout(router: Any, http: Any, signer: Signer, run_services: Any, release: str, until: str) -> Route:
    """A canary judged by the drift metric, with the drift monitor running: stable-only traffic (while the canary
    waits for its decision) makes the monitor's reference, then traffic until the rollout is `until`. Stable
    answers "stable says hi"; on the canary upstream "echo" answers the same, "long" three times as long."""
    drift = (await run_services("drift"))["drift"]
    await _start(http, router, release, {"steps": [50, 100], "interval_s": 0.2, "analysis": DRIFT})
    reference = router.ctx.settings.drift_reference_size
    await _traffic_until(http, router, lambda r: False, limit=reference, batch=reference // 5)
    await drift.handlers.events.wait_for(reference, 30)
    await _pass(router, signer, release)
    sent = await _traffic_until(http, router, lambda r: r.phase == until, limit=3000)
    route = router.rollouts.route("chat")
    assert route.phase == until, f"not {until} after {sent} requests: {route.reason}"
    return route


async def test_a_canary_whose_answers_triple_is_aborted_by_its_drift_metric_and_the_record_names_the_feature(
        router: Any, http: Any, signer: Signer, run_services: Any) -> None:
    route = await _rollout(router, http, signer, run_services, "long", "aborted")
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


async def test_a_noop_canary_with_a_drift_metric_is_promoted(router: Any, http: Any, signer: Signer,
                                                             run_services: Any) -> None:
    route = await _rollout(router, http, signer, run_services, "echo", "promoted")
    assert route.stable.release == "echo" and route.analysis is not None and route.analysis.last is not None
    (metric,) = route.analysis.last.metrics
    assert metric.verdict == "SUCCESSFUL" and metric.canary == 0.0 and "no harmful drift" in metric.why
