"""Reproducible runs: an eval run records what it ran on (versions, packages hash, host, seeds, model,
endpoint and sampling) in its `eval_runs` row, and the gate decision names the release's prompt and model
config versions it judged (signed with the rest of the decision)."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from typing import Any

import pytest

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.signing import Keyring, Signer, default_key_path
from lockgate.store import Store
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import sink_stored
from tests.integration.test_eval_gate import next_decision, qa_answers, register_qa, request, subscribe  # noqa: F401

pytestmark = pytest.mark.timeout(90)


async def test_an_eval_run_records_its_environment_and_the_decision_its_release_versions(
    bus: Bus, store: Store, settings: Settings, context: Any, run_services: Callable[..., Any],
    subscribe: Callable[[str], Any],  # noqa: F811
) -> None:
    suite, policy = await register_qa(bus)
    prompt = await artifacts.register(bus, "prompt", "answer", {"template": "{question}"})
    model = await artifacts.register(bus, "model_config", "good", {"model": "good", "endpoint": "default"})
    await artifacts.register_release(bus, "v-env", "shop", {"prompt/answer": prompt.hash,
                                                            "model_config/good": model.hash})
    gates = await subscribe(bus.subjects.gate_decided_all)
    async with SimServer(SimConfig(models={"good": ModelSpec(answers=qa_answers(), latency_ms=1)})) as sim:
        context.settings = context.settings.replace(stable_upstream=sim.url)  # where v-env ships
        svcs = await run_services("sink", "query", "lineage", "evaluator", "gatekeeper")
        await sink_stored(svcs["sink"].handlers, releases=1)  # the evaluator asks the store for the release
        req = request(release="v-env", suite=suite, endpoint="", model="", policy=policy)  # as it ships
        await bus.publish(bus.subjects.eval_requested, req)
        decision = await next_decision(gates)
        await sink_stored(svcs["sink"].handlers, eval_runs=1)

    [row] = store.rows("SELECT environment FROM eval_runs WHERE run_id = {r:String}", {"r": req.run_id})
    env = dict(row["environment"])
    assert env["python"] == platform.python_version() and env["lockgate"]
    assert env["packages_sha256"].startswith("sha256:") and int(env["packages"]) > 10
    assert (env["model"], env["endpoint"], env["seed"]) == ("good", "default", "0")  # the release's model config
    assert json.loads(env["sampling"]) == {"temperature": 0} and env["suite"] == suite
    assert env["prompt"] == f"prompt/answer={prompt.hash}"  # each case was asked with the release's prompt
    assert env["machine"] == platform.machine() and env["cpu_count"] and env["gpu"]
    # The decision names the release's prompt and model config versions, under its signature.
    assert decision.artifacts["prompt/answer"] == prompt.hash
    assert decision.artifacts["model_config/good"] == model.hash
    assert decision.artifacts["eval_suite"] == suite and decision.artifacts["policy"] == policy
    gatekeeper = Signer.load_or_create(default_key_path(settings))
    assert Keyring([gatekeeper.public]).verify(decision) == gatekeeper.key_id


async def test_the_gate_blocks_a_release_using_a_sunset_artifact_and_names_its_successor(
    bus: Bus, settings: Settings, run_services: Callable[..., Any],
    subscribe: Callable[[str], Any],  # noqa: F811
) -> None:
    from datetime import UTC, datetime, timedelta

    from lockgate.provenance import lifecycle
    from tests.helpers import person

    ann = person(settings, "ann", "operator")
    suite, policy = await register_qa(bus)
    old = await artifacts.register(bus, "prompt", "answer", {"template": "{question}"})
    new = await artifacts.register(bus, "prompt", "answer", {"template": "Q: {question}"})
    model = await artifacts.register(bus, "model_config", "good", {"model": "good"})
    await artifacts.register_release(bus, "v-old", "shop", {"prompt/answer": old.hash, "model_config/good": model.hash})
    await lifecycle.deprecate(bus, settings, ann, old.hash, successor=new.hash,
                              sunset=datetime.now(UTC) - timedelta(days=1), reason="injection-prone")
    await lifecycle.deprecate(bus, settings, ann, model.hash, sunset=datetime.now(UTC) + timedelta(days=30))
    gates = await subscribe(bus.subjects.gate_decided_all)
    async with SimServer(SimConfig(models={"good": ModelSpec(answers=qa_answers(), latency_ms=1)})) as sim:
        svcs = await run_services("sink", "query", "lineage", "evaluator", "gatekeeper")
        await sink_stored(svcs["sink"].handlers, releases=1)
        await bus.publish(bus.subjects.eval_requested, request(release="v-old", suite=suite, endpoint=sim.url,
                                                               model="good", policy=policy))
        decision = await next_decision(gates)
    # Every quality rule passed; the sunset prompt alone blocks, and the reason says what to use instead.
    assert decision.decision == "BLOCK"
    assert decision.reason.startswith("prompt/answer") and f"use its successor {new.hash}" in decision.reason
    lifecycle_rules = {r.rule: r.verdict for r in decision.rules if r.rule.startswith("lifecycle")}
    assert lifecycle_rules == {"lifecycle prompt/answer": "FAIL", "lifecycle model_config/good": "PASS"}
    assert "is deprecated" in decision.reason  # the deprecated model config is named too
