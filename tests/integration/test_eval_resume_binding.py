"""A run resumed after an evaluator restart evaluates the binding it started on (probe p12, F7).

Before, each delivery of an EvalRequested read the release's binding afresh. An operator requested an eval of a
name nobody had registered (its cases asked with the suite's prompt), registered the name with another prompt
while the run was in flight, and the evaluator restarted: the redelivery read the new binding, kept the cases
stored before the restart and asked only the last one with the release's prompt. The result named the release's
binding as what it started on, and the gate signed a PASS for a prompt the answers never saw.

Here the stack runs as `lockgate up` does (embedded nats-server with every identity's permissions), the operator
acts with its own credential and the CLI, and the evaluator runs as `lockgate serve evaluator` does beside it: a
process of its own, stopped mid-run and started again on the same nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from lockgate import artifacts, credentials
from lockgate.bus import Bus
from lockgate.codec import Codec, encode
from lockgate.config import Settings
from lockgate.contracts import EvalCaseResult, EvalCasesRecorded, EvalCompleted, EvalRequested, GateDecided
from lockgate.evalruns import EvalRun, binding_digest
from lockgate.server.runtime import Runtime
from lockgate.services.query.evals import eval_cases
from lockgate.subjects import Subjects, token
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import eventually, run_cli
from tests.integration.test_eval_gate import qa_answers, request

pytestmark = pytest.mark.timeout(120)
FIXTURES = Path(__file__).parent.parent / "fixtures"
completed: Codec[EvalCompleted] = Codec(EvalCompleted)
decided: Codec[GateDecided] = Codec(GateDecided)
PIRATE = "{question} Reply in pirate speak."  # the release's prompt: the simulator knows no answer asked so
ANSWERED = 18  # calls the simulator answers before it holds the next one (qa.jsonl has 20 cases)


class HoldingSim(SimServer):
    """The simulator answering the first ANSWERED chat calls and holding each later one until `go` is set;
    `held` is set when one is held. `users` keeps every call's last user message."""

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config)
        self.users: list[str] = []
        self.held = asyncio.Event()
        self.go = asyncio.Event()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()  # aiohttp keeps the body: the simulator reads it again
        self.users.append([m["content"] for m in body["messages"] if m["role"] == "user"][-1])
        if len(self.users) > ANSWERED:
            self.held.set()
            await self.go.wait()
        return await super()._chat(request)


@contextlib.asynccontextmanager
async def evaluator(settings: Settings) -> AsyncIterator[Runtime]:
    """`lockgate serve evaluator`: the evaluator alone, connected as itself to the running stack's nats-server."""
    runtime = Runtime(settings, services=["evaluator"], embedded_nats=False)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def _operator(settings: Settings) -> Bus:
    bus = Bus(settings.nats_url, Subjects(settings.prefix), name="test-operator",
              auth=credentials.for_identity(settings, "operator"), manage_topology=False)
    await bus.connect()
    return bus


async def _answer_on_stop(evaluator: Runtime, sim: HoldingSim) -> None:
    """Let the held call through once the evaluator is stopping (it then starts no other case)."""
    assert evaluator.services is not None
    await evaluator.services["evaluator"].handlers.stopping.wait()
    sim.go.set()


async def stopped_mid_run(settings: Settings, sim: HoldingSim, operator: Bus, req: EvalRequested) -> None:
    """`req` published by the operator and run by an evaluator stopped mid-run: the held case is answered once it
    stops starting new ones, and every answered case is published before it exits; the last is never asked."""
    async with evaluator(settings) as first:
        await operator.publish(operator.subjects.eval_requested, req)
        await asyncio.wait_for(sim.held.wait(), 30)
        answer = asyncio.create_task(_answer_on_stop(first, sim))
    await answer
    assert len(sim.users) == ANSWERED + 1  # the run stopped before its last case


@pytest.fixture
async def sim() -> AsyncIterator[HoldingSim]:
    async with HoldingSim(SimConfig(models={"good": ModelSpec(answers=qa_answers())})) as server:
        yield server


@pytest.fixture
async def stack(settings: Settings, sim: HoldingSim) -> AsyncIterator[Runtime]:
    """The embedded stack without an evaluator; the allow-list's `default` endpoint is the simulator."""
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", stable_upstream=sim.url),
                      services=["sink", "query", "gatekeeper"])
    await runtime.start()
    yield runtime
    await runtime.stop()



async def _register_parts(operator: Bus) -> tuple[str, str, str, str]:
    """The suite (and its dataset), the policy, and the model config and pirate prompt a release will bind, registered
    by the operator: their hashes."""
    await artifacts.register_file(operator, "dataset", FIXTURES / "suites" / "qa.jsonl")
    suite = (await artifacts.register_file(operator, "eval_suite", FIXTURES / "suites" / "qa.yaml")).hash
    policy = (await artifacts.register_file(operator, "policy", FIXTURES / "policies" / "default.yaml")).hash
    config = (await artifacts.register(operator, "model_config", "p-config",
                                       {"model": "good", "endpoint": "default"})).hash
    prompt = (await artifacts.register(operator, "prompt", "p-answer", {"template": PIRATE})).hash
    return suite, policy, config, prompt

async def test_a_run_resumed_after_a_restart_evaluates_the_binding_it_started_on_not_one_registered_since(
    stack: Runtime, sim: HoldingSim
) -> None:
    admin = stack.ctx.bus  # only watches: every act below is the operator's
    evals = await admin.nc.subscribe(admin.subjects.eval_completed)
    gates = await admin.nc.subscribe(admin.subjects.gate_decided_all)
    operator = await _operator(stack.settings)
    try:
        suite, policy, config, prompt = await _register_parts(operator)
        # A run of a name nobody registered, asking for exactly what the release will ship, one case at a time.
        req = request(release="p-late", suite=suite, policy=policy, endpoint="default", model="good",
                      concurrency=1, cache=False, timeout_s=30.0)
        await stopped_mid_run(stack.settings, sim, operator, req)
        # Whether or not the sink has stored them yet, the resumed run reads the cases it published
        # (test_eval_resume_unstored.py).

        # While no evaluator runs, the operator registers the name with a prompt the model cannot answer under.
        created = await run_cli(stack, "release", "create", "p-late", "--app", "shop",
                                "--artifact", f"model_config/p-config={config}",
                                "--artifact", f"prompt/p-answer={prompt}")
        assert created.exit_code == 0, created.output

        async with evaluator(stack.settings):  # the same request, redelivered, resumes
            done = completed.decode((await evals.next_msg(timeout=60)).data)
            decision = decided.decode((await gates.next_msg(timeout=30)).data)
    finally:
        await operator.close()
        await evals.unsubscribe()
        await gates.unsubscribe()

    # The gate blocks, saying why: the name was not registered when the run started.
    assert (decision.release, decision.eval_run, decision.decision) == ("p-late", req.run_id, "BLOCK")
    assert [r.rule for r in decision.rules if r.verdict == "FAIL"] == ["release_registered"]
    assert f"release 'p-late' was not registered when eval run {req.run_id} started" in decision.reason
    # Every case was asked as the run started: with the suite's prompt, none with the release's, none twice.
    assert len(sim.users) == 20 and not any(u.endswith("pirate speak.") for u in sim.users)
    assert (done.run_id, done.status, done.n_cases) == (req.run_id, "completed", 20)
    assert done.binding is not None and not done.binding.registered and done.environment["prompt"] == "suite"
    assert done.metrics["exact_match"] == 1.0  # what the suite's prompt got


async def test_stored_cases_that_say_no_binding_are_not_resumed_and_the_run_is_blocked(
    stack: Runtime, sim: HoldingSim
) -> None:
    # An evaluator before runs recorded their binding left a run in flight: its record is the bare request, and
    # the cases it stored say nothing of what they were asked under. Resumed, they would be judged as the
    # binding's now (the release registered since, with its prompt): the run fails instead, calling nothing.
    admin = stack.ctx.bus  # stands in for that older evaluator's writes, and watches
    sink = stack.services["sink"].handlers  # type: ignore[index]
    evals = await admin.nc.subscribe(admin.subjects.eval_completed)
    gates = await admin.nc.subscribe(admin.subjects.gate_decided_all)
    operator = await _operator(stack.settings)
    try:
        suite, policy, config, prompt = await _register_parts(operator)
        await artifacts.register_release(operator, "p-old", "shop",
                                         {"model_config/p-config": config, "prompt/p-answer": prompt})
        req = request(release="p-old", suite=suite, policy=policy, endpoint="", model="", concurrency=1,
                      timeout_s=30.0)
        rows = [json.loads(line) for line in (FIXTURES / "suites" / "qa.jsonl").read_text().splitlines()]
        cases = [EvalCaseResult(case_id=r["id"], input=r["vars"]["question"], expected=r["expected"],
                                output=r["expected"], scores={"exact_match": 1.0, "token_f1": 1.0}) for r in rows]
        await (await admin.kv(admin.subjects.kv_eval_runs)).put(token(req.run_id), encode(req))
        await admin.publish(admin.subjects.eval_cases,
                            EvalCasesRecorded(run_id=req.run_id, release="p-old", cases=cases[:19]))
        await eventually(lambda: len(eval_cases(stack.ctx.store, req.run_id)) == 19,  # type: ignore[arg-type]
                         [sink.progress("eval_cases")], what="the older evaluator's cases stored")
        async with evaluator(stack.settings):
            await operator.publish(operator.subjects.eval_requested, req)  # its redelivery
            done = completed.decode((await evals.next_msg(timeout=60)).data)
            decision = decided.decode((await gates.next_msg(timeout=30)).data)
        record = await (await admin.kv(admin.subjects.kv_eval_runs)).get(token(req.run_id))
    finally:
        await operator.close()
        await evals.unsubscribe()
        await gates.unsubscribe()

    assert sim.users == []  # nothing asked: no case of the run is taken as asked under this binding
    assert (done.run_id, done.status) == (req.run_id, "failed")
    assert done.error.startswith(f"eval run {req.run_id} cannot resume: 19 of its 19 stored cases (first ")
    assert done.binding is not None
    assert f"not asked under the binding of release 'p-old' the run started on ({binding_digest(done.binding)})" \
        in done.error
    assert (decision.eval_run, decision.decision) == (req.run_id, "BLOCK")
    # The record now holds the binding, so a later delivery evaluates the same one.
    run = Codec(EvalRun).decode(record.value)
    assert run.request == req and run.binding == done.binding and run.binding.registered
