"""The analysis' `drift` metric on the real nats-server, chDB and the simulator: the drift monitor's report of
the canary's window against stable's is evidence for the router's analysis, which aborts a canary whose answers
triple in length (its signed, stored record naming the feature) and promotes a no-op one. No drift policy is
set, and the router's direct abort on a DRIFT report defers to the analysis: the abort is the analysis' own.
While the canary has a stable arm only its own report against stable's, produced since its step began, judges
it (never the deployment's against its reference, which clients move by what they ask); after a blue-green
promotion the deployment's report is the promoted release's, and judges it."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from lockgate.contracts import DriftReport, FeatureDrift
from lockgate.server.service import Progress
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
    assert drift["condition"] == ("<= 0 drifted features among output_tokens, finish_reason, status "
                                  "in the canary_vs_stable report")
    # The report it read: the canary's window against stable's, never the deployment's against its reference
    # (before, that one was read while none of the canary's was due: mostly stable's traffic, moved by clients).
    assert "DRIFT in output_tokens (PSI" in drift["why"] and "canary_vs_stable report" in drift["why"]
    table = await _cli(router, "analysis", "chat")
    assert table.exit_code == 0 and "drifted" in table.output and "verified" in table.output


async def test_a_noop_canary_with_a_drift_metric_is_promoted(router: Any, http: Any, signer: Signer,
                                                             run_services: Any) -> None:
    route = await _rollout(router, http, signer, run_services, "echo", "promoted")
    assert route.stable.release == "echo" and route.analysis is not None and route.analysis.last is not None
    (metric,) = route.analysis.last.metrics
    assert metric.verdict == "SUCCESSFUL" and metric.canary == 0.0 and "no harmful drift" in metric.why


# Published on lg.drift.chat as the drift monitor publishes them, the monitor itself not running: which report
# the analysis reads, and when, is all these tests are about.
JUDGED = {"metrics": [{"name": "drift", "max": 0}], "min_sample": 20, "failure_limit": 0, "inconclusive_limit": 1000}


def _served(comparison: str, release: str, *, drifted: bool) -> DriftReport:
    """A report of served answers ending now: output_tokens drifted (the monitor's alarm, mean 2 -> 10.6, as a
    probe's client made the deployment's by what it asked) or calm."""
    now = datetime.now(UTC)
    arms = {"release": release, "reference_release": "r1"} if comparison == "canary_vs_stable" else {}
    feature = FeatureDrift(feature="output_tokens", psi=9.68 if drifted else 0.01, ks_stat=0.9, ks_pvalue=1e-9,
                           reference_mean=2.0, current_mean=10.64 if drifted else 2.0, drifted=drifted)
    return DriftReport(served=True, deployment="chat", app="shop", window_start=now, window_end=now, reference_n=500,
                       current_n=500, drifted=drifted, source="lockgate-drift", features=[feature],
                       comparison=comparison, **arms)  # type: ignore[arg-type]


async def _judged_rollout(router: Any, http: Any, signer: Signer, release: str) -> Progress:
    """`release` canaried at 50% with a drift metric alone, past its minimum sample (every look from here on reads
    a drift report); the Progress counts drift reports the router has handled."""
    handled, on_drift = Progress(), router.rollouts.on_drift

    async def counted(report: DriftReport) -> None:
        await on_drift(report)
        await handled.bump()

    router.rollouts.on_drift = counted
    await _start(http, router, release, {"steps": [50, 100], "interval_s": 0.2, "analysis": JUDGED})
    await _pass(router, signer, release)

    def sampled(r: Route) -> bool:
        last = r.analysis.last if r.analysis is not None else None
        return last is not None and min(last.canary_n, last.stable_n) >= JUDGED["min_sample"]

    sent = await _traffic_until(http, router, sampled, limit=4000, batch=20)  # stops once sampled
    assert sampled(router.rollouts.route("chat")), f"no sample after {sent} requests"
    return handled


async def _look_after(router: Any, at: float) -> Route:
    """The route once a look was taken after `at` (or the rollout left its step)."""
    await router.rollouts.wait_for(lambda r: r["chat"].analysis.at > at or r["chat"].phase != "progressing",
                                   timeout=10)
    return router.rollouts.route("chat")


async def _publish(router: Any, handled: Progress, report: DriftReport) -> float:
    bus = router.ctx.bus
    await bus.publish(bus.subjects.drift("chat"), report)
    await handled.wait_for(handled.count + 1, 10)
    return time.time()


async def test_the_deployments_report_never_aborts_a_canary_that_has_a_stable_arm(
        router: Any, http: Any, signer: Signer) -> None:
    # Found by a probe: a client that asked only other questions drifted the deployment's report (91% stable's
    # traffic), and the canary's drift metric, which fell back to it, aborted a canary identical to stable.
    handled = await _judged_rollout(router, http, signer, "echo")
    route = await _look_after(router, await _publish(router, handled, _served("now_vs_reference", "", drifted=True)))
    assert (route.phase, route.weight) == ("progressing", 50.0), route.reason
    (metric,) = route.analysis.last.metrics  # type: ignore[union-attr]
    assert metric.verdict == "WAITING" and "waiting for a drift report covering the canary" in metric.why
    # The canary's own window against stable's still aborts it.
    await _publish(router, handled, own := _served("canary_vs_stable", "echo", drifted=True))
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "aborted", timeout=10)
    reason = router.rollouts.route("chat").reason
    assert f"canary_vs_stable report {own.id} of echo vs r1" in reason and "DRIFT in output_tokens" in reason, reason


async def test_a_step_passes_only_on_the_canarys_own_report_produced_since_the_step_began(
        router: Any, http: Any, signer: Signer) -> None:
    # Found by a probe: a canary whose answers were wrong was promoted, both looks (the one at 100% included)
    # judging one calm report of the deployment's window, 95% stable's traffic, from before the step began.
    handled = await _judged_rollout(router, http, signer, "long")
    route = await _look_after(router, await _publish(router, handled, _served("now_vs_reference", "", drifted=False)))
    assert (route.phase, route.weight) == ("progressing", 50.0), route.reason  # no report of the canary: waits
    await _publish(router, handled, _served("canary_vs_stable", "long", drifted=False))
    await router.rollouts.wait_for(lambda r: r["chat"].weight == 100.0 or r["chat"].phase != "progressing", 10)
    advanced = router.rollouts.route("chat")
    assert advanced.weight == 100.0 and advanced.phase == "progressing", advanced.reason
    assert advanced.analysis is not None
    route = await _look_after(router, advanced.analysis.step_at)
    assert (route.phase, route.weight) == ("progressing", 100.0), route.reason  # that report passed step 1 only
    (metric,) = route.analysis.last.metrics  # type: ignore[union-attr]
    assert metric.verdict == "WAITING"
    # At 100% stable has no arm, so no canary-versus-stable report can be made (each pairs stable's rows of the same
    # time; before, the promotion waited for one made only if the step's first rows reached one as it began): the
    # deployment's report whose whole window lies in the step, the canary's traffic alone, judges the promotion.
    # One of the canary against stable's window, calm, changes nothing; the deployment's, drifted, aborts it.
    await _publish(router, handled, _served("canary_vs_stable", "long", drifted=False))
    route = await _look_after(router, time.time())
    assert (route.phase, route.weight) == ("progressing", 100.0), route.reason
    await _publish(router, handled, own := _served("now_vs_reference", "", drifted=True))
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "aborted", timeout=10)
    reason = router.rollouts.route("chat").reason
    assert reason.startswith("aborted long: analysis failed at step 2 (100%): drift 1"), reason
    assert f"now_vs_reference report {own.id}" in reason, reason


async def test_after_a_blue_green_promotion_the_deployments_report_judges_the_promoted_release(
        router: Any, http: Any, signer: Signer) -> None:
    # The promoted release serves everyone and the monitor's reference restarted with it: the deployment's report
    # is that release's own traffic, the one arm left, and its post-promotion drift metric reads it.
    handled, on_drift = Progress(), router.rollouts.on_drift

    async def counted(report: DriftReport) -> None:
        await on_drift(report)
        await handled.bump()

    router.rollouts.on_drift = counted
    await _start(http, router, "echo", {"interval_s": 0.2, "blue_green": {"post_promotion_analysis": JUDGED}})
    await _pass(router, signer, "echo")
    await _traffic_until(http, router, lambda r: False, limit=40, batch=20)  # r1's, the baseline before promotion
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/promote") as resp:
        assert resp.status == 200, await resp.text()

    def sampled(r: Route) -> bool:
        last = r.analysis.last if r.analysis is not None else None
        return last is not None and min(last.canary_n, last.stable_n) >= JUDGED["min_sample"]

    await _traffic_until(http, router, sampled, limit=4000, batch=20)  # stops once sampled
    route = router.rollouts.route("chat")
    assert route.verifying and sampled(route), route.reason
    report = _served("now_vs_reference", "", drifted=True)
    await _publish(router, handled, report)
    await router.rollouts.wait_for(lambda r: r["chat"].stable.release == "r1", timeout=10)
    reason = router.rollouts.route("chat").reason
    assert reason.startswith("rolled back echo: post-promotion analysis failed: drift 1"), reason
    assert f"now_vs_reference report {report.id}" in reason
