"""`lockgate lineage export --format openlineage` names a past release's and eval run's inputs as they were used:
by the key the release bound, and where a name is looked up (the suite, dataset and policy) by the first
registration of the release's tenant at or before the event; every export says the same (probe p29 F1). And
`lockgate lineage DATASET` shows each eval outcome's metrics with their intervals (probe p29 F5)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.contracts import EvalCompleted, GateAudited, LineageRun, MetricInterval
from tests.helpers import sink_stored
from tests.integration.test_aliases import lockgate

pytestmark = pytest.mark.timeout(120)

MODEL = {"endpoint": "default", "model": "sim-stable", "temperature": 0}


def _export(settings: Settings) -> list[dict[str, Any]]:
    result = lockgate(settings, "lineage", "export", "--format", "openlineage", "--release", "shop-v1")
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]


def _inputs(events: list[dict[str, Any]], job: str) -> set[tuple[str, str]]:
    [event] = [e for e in events if e["job"]["name"] == job]
    return {(d["name"], d["facets"]["version"]["datasetVersion"]) for d in event["inputs"]}


async def test_an_export_names_inputs_as_their_release_bound_them_whatever_is_registered_later(
        run_services: Any, bus: Bus, settings: Settings) -> None:
    svcs = await run_services("sink", "query", "lineage")
    cases = [{"id": "c1", "input": "q"}]
    # Another tenant registered the dataset's bytes first, under its own name.
    await artifacts.register(bus, "dataset", "zz-their-cases", cases, tenant="other")
    data = await artifacts.register(bus, "dataset", "qa-cases", cases)
    suite = await artifacts.register(bus, "eval_suite", "qa", {"name": "qa", "dataset": data.hash})
    model = await artifacts.register(bus, "model_config", "shop-sim-stable", MODEL)
    # A release may bind a stored artifact under a key of its own: the bytes were registered as `answer-v1`.
    prompt = await artifacts.register(bus, "prompt", "answer-v1", {"template": "{{q}}"})
    policy = await artifacts.register(bus, "policy", "gate", {"rules": []})
    await artifacts.register_release(bus, "shop-v1", "shop", {"model_config/shop-sim-stable": model.hash,
                                                              "prompt/answer": prompt.hash})
    await bus.publish(bus.subjects.eval_completed, EvalCompleted(
        run_id="run-1", release="shop-v1", suite=suite.hash, policy=policy.hash, n_cases=1, metrics={"acc": 1.0}))
    await bus.publish(bus.subjects.lineage_run, LineageRun(run_id="run-1", kind="eval", release="shop-v1",
                                                           inputs=[suite.hash, data.hash], outputs=["run-1"]))
    await bus.publish(bus.subjects.gate_audit, GateAudited(release="shop-v1", action="decided", actor="gatekeeper",
                                                           decision="PASS", eval_run="run-1", policy=policy.hash))
    # After all that, the same bytes under other names: another app's GitOps folder (another tenant), and any
    # operator of the release's own tenant relabelling what it used.
    await artifacts.register(bus, "model_config", "gitshop-sim-stable", MODEL, tenant="other")
    await artifacts.register(bus, "tool", "approved-by-security", MODEL)
    await artifacts.register(bus, "dataset", "aa-renamed", cases)
    await artifacts.register(bus, "eval_suite", "aa-suite", {"name": "qa", "dataset": data.hash})
    await artifacts.register(bus, "policy", "aa-lax", {"rules": []})
    await sink_stored(svcs["sink"].handlers, artifacts=11, releases=1, eval_runs=1, lineage_runs=1, gate_decisions=1)

    exports = [await asyncio.to_thread(_export, settings) for _ in range(3)]
    assert exports[0] == exports[1] == exports[2]  # before: each export could name them otherwise
    events = exports[0]
    bound = {("model_config/shop-sim-stable", model.hash), ("prompt/answer", prompt.hash)}
    assert _inputs(events, "release/shop") == bound
    # The eval run's job and inputs: the release's keys, then the suite and dataset as first registered.
    assert _inputs(events, "eval/qa") == bound | {("eval_suite/qa", suite.hash), ("dataset/qa-cases", data.hash)}
    [gate] = [e for e in events if e["job"]["name"] == "gate/shop-v1"]
    assert {d["name"] for d in gate["inputs"]} == {"eval_result/run-1", "policy/gate"}


async def test_lineage_of_a_dataset_lists_each_outcome_with_its_intervals(
        run_services: Any, bus: Bus, settings: Settings) -> None:
    svcs = await run_services("sink", "query", "lineage")
    data = await artifacts.register(bus, "dataset", "qa-cases", [{"id": "c1", "input": "q"}])
    suite = await artifacts.register(bus, "eval_suite", "qa", {"name": "qa", "dataset": data.hash})
    await bus.publish(bus.subjects.eval_completed, EvalCompleted(
        run_id="run-1", release="shop-v1", suite=suite.hash, n_cases=40, metrics={"accuracy": 0.82, "cost": 0.5},
        intervals={"accuracy": MetricInterval(estimate=0.82, low=0.74, high=0.88, method="wilson", n=40),
                   "cost": MetricInterval(estimate=0.5, n=40)}))  # a bound the sample could not estimate
    await bus.publish(bus.subjects.lineage_run, LineageRun(run_id="run-1", kind="eval", release="shop-v1",
                                                           inputs=[suite.hash, data.hash], outputs=["run-1"]))
    await bus.publish(bus.subjects.gate_audit, GateAudited(release="shop-v1", action="decided", actor="gatekeeper",
                                                           decision="PASS", eval_run="run-1"))
    await sink_stored(svcs["sink"].handlers, artifacts=2, eval_runs=1, lineage_runs=1, gate_decisions=1)

    shown = await asyncio.to_thread(lockgate, settings, "lineage", data.hash, "--json")
    assert shown.exit_code == 0, shown.output
    [outcome] = json.loads(shown.output)["outcomes"]
    assert (outcome["run_id"], outcome["release"], outcome["decision"]) == ("run-1", "shop-v1", "PASS")
    accuracy = outcome["intervals"]["accuracy"]
    assert (accuracy["estimate"], accuracy["low"], accuracy["high"], accuracy["n"]) == (0.82, 0.74, 0.88, 40)
    table = await asyncio.to_thread(lockgate, settings, "lineage", data.hash)
    assert table.exit_code == 0, table.output
    assert "accuracy 0.82 [0.74, 0.88]" in table.output and "cost 0.5 [?, ?]" in table.output
