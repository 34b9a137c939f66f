"""A step whose evidence never comes, on the real nats-server, chDB and the simulator: past the analysis's progress
deadline its looks count as inconclusive, so a canary pauses for an operator and a release under post-promotion
analysis is rolled back (probe p15 F3: before, such looks were WAITING for ever and nothing escalated)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from lockgate.codec import Codec
from lockgate.contracts import AnalysisRun
from lockgate.signing import Signer
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import _pass, _start, _states_of, _traffic_until
from tests.integration.test_rollout_strategies import _post, _releases

# The router stack of the analysis tests (simulated stable and canary upstreams, releases, signed decisions).
router, http, keys, signer = analysis_tests.router, analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)
_runs: Codec[AnalysisRun] = Codec(AnalysisRun)


async def test_a_canary_judged_on_scores_nobody_makes_pauses_past_its_progress_deadline(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Online evaluation is off (no evaluator runs here): the score metric can never get a score. Before, every
    # look was WAITING for ever, the canary held 50% of the traffic unpaused, and its reason said `canary at 50%`.
    bus = router.ctx.bus
    sub = await bus.nc.subscribe(bus.subjects.rollout("chat"))
    analysis = {"metrics": [{"name": "error_rate", "max_increase": 0.05},
                            {"name": "score", "scorer": "pii_free", "max_decrease": 0.01}],
                "min_sample": 20, "inconclusive_limit": 2, "progress_deadline_s": 1.0}
    await _start(http, router, "same", {"steps": [50, 100], "interval_s": 0.1, "analysis": analysis})
    await _pass(router, signer, "same")
    sent = await _traffic_until(http, router, lambda r: r.paused, limit=4000)
    route = router.rollouts.route("chat")
    assert route.paused, f"not paused after {sent} requests: {route.reason}"
    assert (route.phase, route.weight, route.stable.release) == ("progressing", 50.0, "r1")
    assert route.reason.startswith("paused at step 1 (50%): analysis inconclusive 3 times (score:pii_free: no "
                                   "evidence for ")
    assert "past the progress deadline (1 s): waiting for 30 scores per variant (is online evaluation on?)" \
        in route.reason
    assert route.analysis is not None and route.analysis.last is not None
    # The looks that paused it were inconclusive; a look after the pause may be WAITING again (a pause starts the wait
    # for evidence anew, `waiting_since`), as a ci-local run read it, so the count is asserted, not the latest verdict.
    assert route.analysis.inconclusives >= 3, route.analysis
    # Announced (history, `lg.rollout`): the step waiting past its deadline, for what, then the pause.
    reasons = [s.reason for s in await _states_of(sub)]
    overdue = [r for r in reasons if "; waiting " in r and "past the progress deadline" in r]
    assert overdue and "for evidence: score:pii_free: no evidence for " in overdue[0]
    assert reasons[-1] == route.reason


async def test_a_blue_green_release_without_evidence_after_its_promotion_is_rolled_back(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Probe p15 F1c: every request to the promoted release hung and its client hung up, so its sample never
    # filled; the release kept all the traffic, verifying for ever. README: an unverified release does not keep
    # all the traffic for ever. Here nobody sends it a request at all: no sample either.
    post = {"metrics": [{"name": "error_rate", "max_increase": 0.05, "max": 0.05}], "min_sample": 30,
            "inconclusive_limit": 1, "progress_deadline_s": 0.5}
    await _start(http, router, "same", {"interval_s": 0.1, "blue_green": {"post_promotion_analysis": post,
                                                                          "scale_down_delay_s": 600}})
    await _pass(router, signer, "same")
    bus = router.ctx.bus
    sub = await bus.nc.subscribe(bus.subjects.analysis_runs)
    status, body = await _post(http, router, "promote")
    assert status == 200 and body["verifying"], body
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "aborted", timeout=20)
    route = router.rollouts.route("chat")
    assert route.stable.release == "r1" and route.reason.startswith(
        "rolled back same: post-promotion analysis inconclusive 2 times: error_rate: no evidence for ")
    assert "past the progress deadline (0.5 s): waiting for 30 events per variant (canary 0, stable 0)" in route.reason
    assert set(await _releases(http, router, 20)) == {"r1"}
    # The signed records say what the rollout counted: two inconclusive looks, the second rolling it back.
    runs = [_runs.decode((await sub.next_msg(timeout=10)).data) for _ in range(2)]
    assert [(r.template, r.phase, r.outcome, r.inconclusives) for r in runs] == [
        ("post-promotion", "Inconclusive", "held", 1), ("post-promotion", "Inconclusive", "rolled back", 2)]
    assert runs[1].metrics[0].why.startswith("no evidence for ")
