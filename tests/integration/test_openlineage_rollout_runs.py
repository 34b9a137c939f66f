"""OpenLineage rollout runs over the real router: each rollout attempt is one run, START to its COMPLETE or ABORT,
nothing after it; `lockgate lineage export` and the live feed map the router's events alike (probe p23 F9)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from lockgate.codec import Codec
from lockgate.contracts import RolloutState
from lockgate.services.lineage import live
from tests.helpers import gate_decided, sink_stored
from tests.integration import test_router
from tests.integration.test_aliases import lockgate
from tests.integration.test_router import _put, gate
from tests.openlineage_spec import check

pytestmark = pytest.mark.timeout(120)

# The router's fixtures (sink and router on the test's bus, r1 stable and gated, r2 its canary, a trusted signer).
sims, passthrough, gateway_policy, services, router = (test_router.sims, test_router.passthrough,
                                                        test_router.gateway_policy, test_router.services,
                                                        test_router.router)
signer, keys, http = test_router.signer, test_router.keys, test_router.http

_states: Codec[RolloutState] = Codec(RolloutState)
NS = "lockgate://test"


def _runs(events: list[dict[str, Any]]) -> list[list[str]]:
    """Each run's event types, in the order of its first event."""
    runs: dict[str, list[str]] = {}
    for e in events:
        runs.setdefault(e["run"]["runId"], []).append(e["eventType"])
    return list(runs.values())


async def test_two_canaries_of_one_release_are_two_runs_and_a_rollback_after_promotion_ends_no_run(
        router: Any, services: Any, run_services: Any, http: aiohttp.ClientSession, signer: Any) -> None:
    # Before: every rollout change of r2 on `chat` was one run (`rollout:chat:r2`): the promoted canary's run
    # COMPLETEd, then got the rollback's ABORT and the second canary's events after it.
    bus = router.ctx.bus
    sub = await bus.nc.subscribe(bus.subjects.rollout("chat"))
    await run_services("query")
    status, _ = await _put(http, router)  # canary r2 of r1, then PASS: promoted
    assert status == 200
    await gate_decided(bus, await gate(bus, signer, decision="PASS"))
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "promoted", timeout=20)
    rejected = await gate(bus, signer, decision="BLOCK", reason="rejected by ann")  # rolls r2 back to r1
    await gate_decided(bus, rejected)
    await router.rollouts.wait_for(lambda r: r["chat"].decision_id == rejected.id, timeout=10)
    assert router.rollouts.route("chat").stable.release == "r1"
    status, again = await _put(http, router)  # a second canary of r2: its BLOCK aborts it at once
    assert status == 200 and again["phase"] == "aborted"
    await router.rollouts.flush()

    states: list[RolloutState] = []
    while sum(s.phase == "aborted" for s in states) < 2:  # the rollback's, then the second canary's
        states.append(_states.decode((await sub.next_msg(timeout=10)).data))
    await sink_stored(services["sink"].handlers, rollout_events=len(states))

    result = await asyncio.to_thread(lockgate, router.ctx.settings, "lineage", "export", "--format", "openlineage")
    assert result.exit_code == 0, result.output
    exported = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    rollout = [e for e in exported if e["job"]["name"] == "rollout/chat"]
    for event in rollout:
        check(event)
    assert len(rollout) == len(states)
    runs = _runs(rollout)
    # The promoted canary, the rollback (a change of its own), the second canary: three runs.
    assert runs == [["START", "RUNNING", "RUNNING", "RUNNING", "RUNNING", "COMPLETE"], ["COMPLETE"],
                    ["START", "ABORT"]], runs
    weights = [e["run"]["facets"]["lockgate_rollout"]["weights"] for e in rollout]
    assert weights[6] == {"r1": 100.0} and weights[-1] == {"r1": 100.0}

    # The live feed maps the router's own events with the same function: same runs, same types, same order.
    tracker = live.RunTracker()
    posted = [ev for s in states for ev in tracker.order(live.run_events(s, live.Names(), NS), {})]
    assert [(e["run"]["runId"], e["eventType"]) for e in posted] == \
        [(e["run"]["runId"], e["eventType"]) for e in rollout]
