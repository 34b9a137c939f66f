"""Evaluator + gatekeeper on a real nats-server and chDB, against the OpenAI-compatible simulator."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.cli.gate import current_decision
from lockgate.cli.main import cli
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import DeadLetter, EvalCompleted, EvalRequested, GateDecided, LineageRun
from lockgate.evalruns import binding_of
from lockgate.ids import uuid7
from lockgate.server.apikeys import bootstrap
from lockgate.services.query.decisions import decisions, latest_decision
from lockgate.services.query.evals import eval_cases, eval_runs
from lockgate.signing import (
    Keyring,
    Signer,
    default_key_path,
    ensure_signer_trusted,
    revoke_key,
    trust_file_path,
)
from lockgate.store import Store
from lockgate.subjects import token
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import (
    admin_headers,
    eventually,
    register_model_release,
    served_events,
    sink_stored,
    store_pass,
)
from tests.integration.test_rollout_operate import _cli

pytestmark = pytest.mark.timeout(90)
FIXTURES = Path(__file__).parent.parent / "fixtures"
decided: Codec[GateDecided] = Codec(GateDecided)


def qa_answers(wrong_every: int = 0) -> dict[str, str]:
    """Simulator answers for qa.jsonl: all right, or every n-th one wrong."""
    out = {}
    for i, line in enumerate((FIXTURES / "suites" / "qa.jsonl").read_text().splitlines()):
        case = json.loads(line)
        wrong = wrong_every and i % wrong_every == 0
        out[case["vars"]["question"]] = "I am not sure" if wrong else case["expected"]
    return out


async def register_qa(bus: Bus) -> tuple[str, str]:
    """Register the fixture dataset, suite and default policy; returns (suite hash, policy hash)."""
    await artifacts.register_file(bus, "dataset", FIXTURES / "suites" / "qa.jsonl")
    suite = await artifacts.register_file(bus, "eval_suite", FIXTURES / "suites" / "qa.yaml")
    policy = await artifacts.register_file(bus, "policy", FIXTURES / "policies" / "default.yaml")
    return suite.hash, policy.hash


@pytest.fixture
async def subscribe(bus: Bus) -> AsyncIterator[Callable[[str], Any]]:
    """Core NATS subscriptions that are dropped before the bus drains (unread messages would stall drain)."""
    subs: list[Any] = []

    async def sub(subject: str) -> Any:
        subs.append(await bus.nc.subscribe(subject))
        return subs[-1]

    yield sub
    for s in subs:
        await s.unsubscribe()


async def next_decision(sub: Any, timeout: float = 30) -> GateDecided:
    return decided.decode((await sub.next_msg(timeout=timeout)).data)


def good_and_bad() -> SimConfig:
    """The simulator with a model right on every qa.jsonl case ("good") and one wrong on every other ("bad")."""
    return SimConfig(models={"good": ModelSpec(answers=qa_answers()), "bad": ModelSpec(answers=qa_answers(wrong_every=2))})


def request(**fields: Any) -> EvalRequested:
    return EvalRequested(**{"run_id": uuid7(), "concurrency": 4, "timeout_s": 5.0, **fields})


async def test_good_candidate_passes_and_regressed_one_is_blocked(
    bus: Bus, store: Store, context: Any, run_services: Callable[..., Any], subscribe: Callable[[str], Any]
) -> None:
    suite, policy = await register_qa(bus)
    good_arts = await register_model_release(bus, "v-good", "good")  # the gate passes registered releases only
    await register_model_release(bus, "v-bad", "bad")
    config = SimConfig(models={"good": ModelSpec(answers=qa_answers(), latency_ms=2),
                               "bad": ModelSpec(answers=qa_answers(wrong_every=2), latency_ms=2)})
    gates = await subscribe(bus.subjects.gate_decided_all)
    evals = await subscribe(bus.subjects.eval_completed)
    lineage = await subscribe(bus.subjects.lineage_run)
    async with SimServer(config) as sim:
        # The releases ship to the allow-list's `default` endpoint: here, the simulator.
        context.settings = context.settings.replace(stable_upstream=sim.url)
        sink = (await run_services("sink", "query", "evaluator", "gatekeeper"))["sink"].handlers
        good = request(release="v-good", suite=suite, endpoint=sim.url, model="good", policy=policy)
        await bus.publish(bus.subjects.eval_requested, good)
        first = await next_decision(gates)
        bad = request(release="v-bad", suite=suite, endpoint=sim.url, model="bad", policy=policy)
        await bus.publish(bus.subjects.eval_requested, bad)
        second = await next_decision(gates)
        assert sim.requests == {"good": 20, "bad": 20}

    assert (first.release, first.decision, first.eval_run) == ("v-good", "PASS", good.run_id)
    assert [r.verdict for r in first.rules] == ["PASS", "PASS", "PASS"]
    assert (second.release, second.decision) == ("v-bad", "BLOCK")
    failing = [r for r in second.rules if r.verdict == "FAIL"]
    assert [(r.rule, r.metric, r.observed) for r in failing] == [("accuracy", "exact_match", 0.5)]
    # Decisions also carry the release's registered artifact hashes.
    assert first.artifacts == {**good_arts, "eval_suite": suite, "policy": policy}
    assert "accuracy" in second.reason and {"eval_suite": suite, "policy": policy}.items() <= second.artifacts.items()

    done = Codec(EvalCompleted).decode((await evals.next_msg(timeout=5)).data)
    assert done.status == "completed" and done.n_cases == 20 and done.metrics["exact_match"] == 1.0
    assert {"score", "token_f1", "latency_p50_ms", "latency_p95_ms", "error_rate", "n"} <= set(done.metrics)
    run = Codec(LineageRun).decode((await lineage.next_msg(timeout=5)).data)
    dataset = json.loads((FIXTURES / "suites" / "qa.yaml").read_text().split("dataset: ")[1].split("\n")[0])
    # The run's environment is an input too: the `environment` artifact the evaluator registered (probe p29 F9).
    assert (run.kind, run.run_id, run.release, run.inputs, run.outputs) == (
        "eval", good.run_id, "v-good", [suite, dataset, done.environment["hash"]], [good.run_id])

    await sink_stored(sink, eval_runs=2, gate_decisions=2)
    await eventually(lambda: len(eval_cases(store, bad.run_id)) >= 20, [sink.progress("eval_cases")],
                     what="the blocked run's cases stored")
    runs = {r["run_id"]: r for r in eval_runs(store)}
    assert runs[good.run_id]["status"] == "completed" and runs[bad.run_id]["metrics"]["exact_match"] == 0.5
    cases = eval_cases(store, bad.run_id)
    assert len(cases) == 20 and sum(c["scores"]["exact_match"] for c in cases) == 10
    assert next(c for c in cases if c["case_id"] == "capital-fr")["output"] == "I am not sure"

    history = decisions(store)
    assert [(d["release"], d["decision"], d["action"], d["actor"]) for d in history] == [
        ("v-bad", "BLOCK", "decided", "gatekeeper"), ("v-good", "PASS", "decided", "gatekeeper")]
    assert history[0]["rules"][0]["rule"] == "accuracy" and history[0]["id"] == second.id
    assert latest_decision(store, "v-good")["eval_run"] == good.run_id
    assert latest_decision(store, "v-none") is None

    kv = await bus.kv(bus.subjects.kv_gates)
    entry = await kv.get(token("v-bad"))
    assert decided.decode(entry.value) == second


async def test_a_release_is_evaluated_as_it_ships_not_as_the_request_asks(
    bus: Bus, context: Any, run_services: Callable[..., Any], subscribe: Callable[[str], Any]
) -> None:
    # The release ships the weak model; an eval that asked for the strong one (here or at another URL) got a
    # PASS, and the router then served the weak model under it.
    suite, policy = await register_qa(bus)
    await register_model_release(bus, "v-weak", "bad")
    config = good_and_bad()
    gates = await subscribe(bus.subjects.gate_decided_all)
    async with SimServer(config) as sim, SimServer(config) as elsewhere:
        context.settings = context.settings.replace(stable_upstream=sim.url)  # the `default` endpoint
        await run_services("query", "evaluator", "gatekeeper")
        asked = [request(release="v-weak", suite=suite, endpoint=sim.url, model="good", policy=policy),
                 request(release="v-weak", suite=suite, endpoint=elsewhere.url, model="bad", policy=policy)]
        refused = []
        for req in asked:
            await bus.publish(bus.subjects.eval_requested, req)
            refused.append(await next_decision(gates))
        assert sim.requests == {} and elsewhere.requests == {}  # refused before any call
        shipped = request(release="v-weak", suite=suite, endpoint="", model="", policy=policy)
        await bus.publish(bus.subjects.eval_requested, shipped)
        judged = await next_decision(gates)
        assert sim.requests == {"bad": 20}
    assert [d.decision for d in refused] == ["BLOCK", "BLOCK"]
    assert "ships model 'bad' at endpoint 'default'" in refused[0].reason and "asks for model 'good'" in refused[0].reason
    assert f"asks for endpoint '{elsewhere.url}'" in refused[1].reason
    assert (judged.decision, judged.eval_run) == ("BLOCK", shipped.run_id)
    assert [(r.rule, r.observed) for r in judged.rules if r.verdict == "FAIL"] == [("accuracy", 0.5)]
    assert "model 'bad' is not in the shipped price book" in judged.reason  # priced as the model it ran


async def test_a_release_served_by_an_anthropic_endpoint_is_evaluated_through_the_routers_translation(
    bus: Bus, context: Any, run_services: Callable[..., Any], subscribe: Callable[[str], Any], tmp_path: Path
) -> None:
    # The router serves an `anthropic` endpoint by translating chat completions to Anthropic Messages; the
    # evaluator refused to call one ("speaks the anthropic API"), so such a release was always BLOCKed and could
    # reach clients only through the ungoverned passthrough.
    suite, policy = await register_qa(bus)
    await register_model_release(bus, "v-claude", "good", "claude", temperature=0)
    key = "sk-ant-" + uuid7()
    gates = await subscribe(bus.subjects.gate_decided_all)
    evals = await subscribe(bus.subjects.eval_completed)
    async with SimServer(SimConfig(models={"good": ModelSpec(answers=qa_answers())}, require_key=key)) as sim:
        (tmp_path / "endpoints.yaml").write_text(
            f"endpoints:\n  claude: {{url: '{sim.url}', provider: anthropic, credential: CLAUDE_KEY}}\n")
        (tmp_path / "secrets.yaml").write_text(f"CLAUDE_KEY: {key}\n")
        context.settings = context.settings.replace(endpoints_file=str(tmp_path / "endpoints.yaml"),
                                                    secrets_file=str(tmp_path / "secrets.yaml"))
        await run_services("query", "evaluator", "gatekeeper")
        req = request(release="v-claude", suite=suite, endpoint="", model="", policy=policy)
        await bus.publish(bus.subjects.eval_requested, req)
        decision = await next_decision(gates)
        done = Codec(EvalCompleted).decode((await evals.next_msg(timeout=5)).data)
        # Every call went out as the router sends it: Anthropic's version header and its key header.
        assert sim.requests == {"good": 20} and sim.unauthorized == 0
        assert all(h.get("anthropic-version") and h.get("x-api-key") == key for h in sim.headers)
    assert (done.status, done.n_errors, done.metrics["exact_match"]) == ("completed", 0, 1.0), done.error
    assert done.metrics["n"] == 20 and done.environment["endpoint"] == "claude"
    assert (decision.release, decision.decision, decision.eval_run) == ("v-claude", "PASS", req.run_id)


async def test_a_release_naming_a_price_group_is_evaluated_at_the_member_served_rolled_out_and_served_by_it(
    bus: Bus, context: Any, run_services: Callable[..., Any], subscribe: Callable[[str], Any],
    tmp_path: Path
) -> None:
    # Before (probe p31 F3): the evaluator's allow-list read only `endpoints:`, so `eval run` of a release whose
    # model config names a group failed ("endpoint 'grp' is not in the endpoint allow-list"), the gate BLOCKed it
    # and `rollout start` refused it: cost-aware routing served only the ungoverned passthrough.
    ensure_signer_trusted(context.settings)
    await register_qa(bus)
    keys = bootstrap(context.settings.home, tenant="acme", app="shop")
    evals = await subscribe(bus.subjects.eval_completed)
    served = await subscribe(bus.subjects.served("shop", "acme"))
    async with SimServer(good_and_bad()) as dear, SimServer(good_and_bad()) as cheap:
        # `dear` is listed first: only the prices make `cheap` the member that serves (and is evaluated).
        (tmp_path / "endpoints.yaml").write_text(
            f"endpoints:\n"
            f"  dear: {{url: '{dear.url}', price: {{input_per_mtok: 5, output_per_mtok: 15}}}}\n"
            f"  cheap: {{url: '{cheap.url}', price: {{input_per_mtok: 0.1, output_per_mtok: 0.4}}}}\n"
            "groups:\n  grp: {endpoints: [dear, cheap], choose: price}\n")
        context.settings = context.settings.replace(endpoints_file=str(tmp_path / "endpoints.yaml"),
                                                    deployment="chat", app="shop")
        router = (await run_services("sink", "query", "evaluator", "gatekeeper", "router"))["router"]
        await register_model_release(bus, "g1", "good", "grp", tenant="acme", temperature=0)

        result = await eval_run(context.settings, "g1")  # the CLI, evaluated as it ships
        assert result.exit_code == 0, result.output
        done = Codec(EvalCompleted).decode((await evals.next_msg(timeout=5)).data)
        assert (done.status, done.n_errors, done.metrics["exact_match"]) == ("completed", 0, 1.0), done.error
        # The run names what ships (the group, which the gate checks) and the member it asked.
        assert (done.environment["endpoint"], done.environment["endpoint_member"]) == ("grp", "cheap")
        assert (cheap.requests, dear.requests) == ({"good": 20}, {})
        d = await current_decision(bus, "g1")
        assert (d.decision, d.eval_run) == ("PASS", done.run_id), d.reason

        started = await _cli(router, "start", "chat", "--stable", "g1", "--json", key=keys.admin_key)
        assert started.exit_code == 0, started.output
        shown = json.loads(started.output)
        assert (shown["stable"]["release"], shown["stable"]["endpoint"], shown["phase"]) == ("g1", "grp", "promoted")
        async with openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=keys.app_key, max_retries=0,
                                      timeout=10) as client:
            answer = await client.chat.completions.create(
                model="good", messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert answer.choices[0].message.content
        assert (cheap.requests, dear.requests) == ({"good": 21}, {})
    [event] = await served_events(served, 1)
    assert (event.release, event.status, event.attributes["lockgate.endpoint"]) == ("g1", "ok", "cheap")


async def test_malformed_request_goes_to_dlq_and_a_failed_eval_is_blocked(
    bus: Bus, store: Store, run_services: Callable[..., Any], subscribe: Callable[[str], Any]
) -> None:
    _, policy = await register_qa(bus)
    dlq = await subscribe(bus.subjects.dlq_all)
    gates = await subscribe(bus.subjects.gate_decided_all)
    sink = (await run_services("sink", "query", "evaluator", "gatekeeper"))["sink"].handlers
    await bus.publish(bus.subjects.eval_requested, b'{"type":"lockgate.eval.requested","run_id":1}', msg_id="bad")
    missing = "sha256:" + "0" * 64
    req = request(release="v-missing", suite=missing, endpoint="http://127.0.0.1:9/v1", model="m", policy=policy)
    await bus.publish(bus.subjects.eval_requested, req)

    letter = Codec(DeadLetter).decode((await dlq.next_msg(timeout=15)).data)
    assert letter.origin == "evaluator" and "$.run_id" in letter.error
    decision = await next_decision(gates)
    assert decision.decision == "BLOCK" and decision.eval_run == req.run_id
    assert f"eval run {req.run_id} failed" in decision.reason and missing in decision.reason
    await sink_stored(sink, eval_runs=1)
    [run] = eval_runs(store, "v-missing")
    assert run["status"] == "failed" and "not in the object store" in run["error"]


async def test_bad_policy_blocks_naming_the_problem(
    bus: Bus, store: Store, run_services: Callable[..., Any], subscribe: Callable[[str], Any]
) -> None:
    suite, _ = await register_qa(bus)
    broken = await artifacts.register(bus, "policy", "broken", {"name": "broken", "rules": [
        {"name": "acc", "metric": "exact_match", "op": "=>", "threshold": 0.8}]})
    gates = await subscribe(bus.subjects.gate_decided_all)
    async with SimServer(SimConfig(models={"good": ModelSpec(answers=qa_answers())})) as sim:
        sink = (await run_services("sink", "query", "evaluator", "gatekeeper"))["sink"].handlers
        await bus.publish(bus.subjects.eval_requested,
                          request(release="v1", suite=suite, endpoint=sim.url, model="good", policy=broken.hash))
        decision = await next_decision(gates)
    await sink_stored(sink, gate_decisions=1)
    assert decision.decision == "BLOCK"
    assert f"policy {broken.hash} is unusable" in decision.reason and "at `$.rules[0].op`" in decision.reason
    assert latest_decision(store, "v1")["reason"] == decision.reason


@pytest.mark.parametrize(("margin", "why"), [("1.0e+999", "Number out of range"),
                                             ("Infinity", "JSON is malformed: invalid character (byte 194)")])
async def test_a_stored_policy_with_a_number_json_cannot_carry_blocks_naming_it_in_a_decision_everyone_reads(
    bus: Bus, store: Store, run_services: Callable[..., Any], subscribe: Callable[[str], Any], tmp_path: Path,
    margin: str, why: str,
) -> None:
    # Before (probe p68 F1): a policy file of another suffix is stored as its bytes, read with `json.loads` (inf), and its
    # slice rule's threshold, -inf, was written null: the gatekeeper signed and stored a BLOCK no reader could decode
    # (`Expected float, got null`), the sink dead-lettered its row, and every reader kept the PASS before it.
    suite, _ = await register_qa(bus)
    raw = tmp_path / "inf.pol"
    raw.write_text('{"name": "inf", "no_data": "pass", "rules": [{"name": "acc", "metric": "exact_match", "op": ">=", '
                   f'"threshold": 1.01}}, {{"name": "per-slice", "metric": "exact_match", "slices": '
                   f'{{"max_regression": {margin}}}}}]}}')
    policy = await artifacts.register_file(bus, "policy", raw)
    gates = await subscribe(bus.subjects.gate_decided_all)
    async with SimServer(SimConfig(models={"good": ModelSpec(answers=qa_answers())})) as sim:
        sink = (await run_services("sink", "query", "evaluator", "gatekeeper"))["sink"].handlers
        await bus.publish(bus.subjects.eval_requested,
                          request(release="v1", suite=suite, endpoint=sim.url, model="good", policy=policy.hash))
        decision = await next_decision(gates)
    assert decision.decision == "BLOCK"
    assert f"policy {policy.hash} is unusable" in decision.reason
    assert f"is unusable: not JSON or YAML ({why}" in decision.reason, decision.reason
    # What KV holds is that decision, and the sink stores its row (none dead-lettered).
    assert decided.decode((await (await bus.kv(bus.subjects.kv_gates)).get(token("v1"))).value) == decision
    await sink_stored(sink, gate_decisions=1)
    assert latest_decision(store, "v1")["reason"] == decision.reason


async def test_an_eval_longer_than_ack_wait_is_not_redelivered(
    bus: Bus, settings: Any, context: Any, run_services: Callable[..., Any], subscribe: Callable[[str], Any]
) -> None:
    # settings.ack_wait_s is 2 s; 10 sequential calls of 300 ms outlast it, so only the heartbeat saves the run.
    cases = [{"id": str(i), "input": f"q{i}", "expected": "ok"} for i in range(10)]
    suite = await artifacts.register(bus, "eval_suite", "slow", {
        "name": "slow", "prompt": {"template": "{input}"}, "dataset": cases, "scorers": ["exact_match"]})
    policy = await artifacts.register(bus, "policy", "p", {"name": "p", "rules": [
        {"metric": "exact_match", "op": ">=", "threshold": 1}]})
    gates = await subscribe(bus.subjects.gate_decided_all)
    assert settings.ack_wait_s < 10 * 0.3
    await register_model_release(bus, "v-slow", "slow")
    async with SimServer(SimConfig(models={"slow": ModelSpec(latency_ms=300)})) as sim:
        context.settings = context.settings.replace(stable_upstream=sim.url)  # where v-slow ships
        await run_services("query", "evaluator", "gatekeeper")
        req = request(release="v-slow", suite=suite.hash, endpoint=sim.url, model="slow", policy=policy.hash,
                      concurrency=1)
        await bus.publish(bus.subjects.eval_requested, req)
        decision = await next_decision(gates)
        assert sim.requests == {"slow": 10}
    assert decision.decision == "PASS"


async def test_a_run_id_binds_once_so_no_request_reuses_another_requests_stored_cases(
    bus: Bus, store: Store, context: Any, run_services: Callable[..., Any], subscribe: Callable[[str], Any]
) -> None:
    # A rerun (never gated) may call another model; its cases are stored under its run id. A gated request
    # reusing that run id then "resumed" from those cases, called nothing, and the weak release got a PASS for
    # the strong model's answers.
    suite, policy = await register_qa(bus)
    await register_model_release(bus, "v-weak", "bad")
    config = good_and_bad()
    gates = await subscribe(bus.subjects.gate_decided_all)
    reran = await subscribe(bus.subjects.eval_reran)
    dlq = await subscribe(bus.subjects.dlq_all)
    async with SimServer(config) as sim:
        context.settings = context.settings.replace(stable_upstream=sim.url)
        sink = (await run_services("sink", "query", "evaluator", "gatekeeper"))["sink"].handlers
        strong = request(release="v-weak", suite=suite, endpoint=sim.url, model="good", policy=policy,
                         rerun_of=uuid7())
        await bus.publish(bus.subjects.eval_requested, strong)
        await reran.next_msg(timeout=30)
        await eventually(lambda: len(eval_cases(store, strong.run_id)) >= 20, [sink.progress("eval_cases")],
                         what="the rerun's cases stored")
        reused = request(run_id=strong.run_id, release="v-weak", suite=suite, endpoint="", model="",
                         policy=policy)
        await bus.publish(bus.subjects.eval_requested, reused)
        letter = Codec(DeadLetter).decode((await dlq.next_msg(timeout=30)).data)
        fresh = request(release="v-weak", suite=suite, endpoint="", model="", policy=policy)
        await bus.publish(bus.subjects.eval_requested, fresh)
        decision = await next_decision(gates)
        assert sim.requests == {"good": 20, "bad": 20}
    assert letter.origin == "evaluator" and strong.run_id in letter.error and "already" in letter.error
    # The reused run decided nothing: the first decision is the fresh run's, of the model that ships.
    assert (decision.eval_run, decision.decision) == (fresh.run_id, "BLOCK")


# A release registered while its eval runs (q2 report, defect 1). The evaluator chooses what to call when a run
# starts: for a name bound to nothing, the model and endpoint the request names. It read the release's artifacts
# again when the run finished, so a release registered meanwhile, with a model the gate had blocked, got a PASS
# for the requested model's answers, and the router served it.


class HeldSim(SimServer):
    """The simulator holding every chat call until `go` is set; `called` is set at the first one (the run
    has chosen what to call)."""

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config)
        self.called = asyncio.Event()
        self.go = asyncio.Event()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.called.set()
        await self.go.wait()
        return await super()._chat(request)


@pytest.fixture
async def held(context: Any, run_services: Callable[..., Any]) -> AsyncIterator[dict[str, Any]]:
    """Evaluator, gatekeeper and router (deployment `chat`, stable `r1` passed) with a held simulator as the
    allow-list's `default` endpoint, where every test release ships; the gatekeeper's key trusted."""
    ensure_signer_trusted(context.settings)
    suite, policy = await register_qa(context.bus)
    async with HeldSim(good_and_bad()) as sim:
        context.settings = context.settings.replace(stable_upstream=sim.url, canary_upstream="http://127.0.0.1:9/v1",
                                                    deployment="chat")
        svcs = await run_services("sink", "query", "evaluator", "gatekeeper", "router")
        await register_model_release(context.bus, "r1", "good")
        await store_pass(context.bus, "r1", context.settings)
        yield {"sim": sim, "router": svcs["router"], "suite": suite, "policy": policy}


async def eval_run(settings: Settings, release: str, *args: str, env: dict[str, str] | None = None) -> Result:
    """`lockgate eval run` as an operator types it (with `env`), on the fixture suite and policy, waiting for the
    gate's decision."""
    argv = ["--nats", settings.nats_url, "--prefix", settings.prefix, "--home", settings.home, "eval", "run",
            str(FIXTURES / "suites" / "qa.yaml"), "--candidate", release,
            "--policy", str(FIXTURES / "policies" / "default.yaml"), "--timeout", "60", "--json", *args]
    return await asyncio.to_thread(CliRunner().invoke, cli, argv, env=env, catch_exceptions=False)  # its own loop


async def canary(router: Any, release: str) -> dict[str, Any]:
    """What the router does when asked to canary `release` beside r1 (it admits only a verified PASS)."""
    async with aiohttp.ClientSession(headers=admin_headers(router.ctx.settings.home)) as http:
        body = {"stable_release": "r1", "canary_release": release}
        async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=body) as resp:
            return await resp.json()


async def test_a_release_registered_while_its_eval_runs_gets_no_pass_and_no_traffic(
    bus: Bus, settings: Settings, context: Any, held: dict[str, Any], subscribe: Callable[[str], Any]
) -> None:
    sim = held["sim"]
    evals = await subscribe(bus.subjects.eval_completed)
    # Name v-late is bound to nothing: the run calls what the operator names, the good model at the simulator.
    running = asyncio.create_task(eval_run(settings, "v-late", "--endpoint", sim.url, "--model", "good"))
    await asyncio.wait_for(sim.called.wait(), 30)
    # While it runs, the operator registers v-late with the model the gate blocks (as `release create` does).
    late = await register_model_release(bus, "v-late", "bad")
    sim.go.set()
    result = await running
    assert result.exit_code == 5, result.output  # the gate did not pass
    assert sim.requests == {"good": 20}  # what was evaluated: the model the request named, never v-late's
    done = Codec(EvalCompleted).decode((await evals.next_msg(timeout=5)).data)
    assert done.binding is not None and not done.binding.registered and done.artifacts == {}

    d = await current_decision(bus, "v-late")
    assert (d.decision, d.id) == ("BLOCK", json.loads(result.output)["decision"]["id"])
    assert Keyring.from_settings(context.settings).verify(d) == d.key_id  # signed, and it is the gatekeeper's
    # Every rule of the policy passed (the good model answered): only what changed blocks, and says what.
    assert [r.rule for r in d.rules if r.verdict == "FAIL"] == ["release_registered", "release_model"]
    bound = binding_of(await artifacts.release_of(bus, "v-late"))
    assert d.reason.startswith(
        f"release 'v-late' was not registered when eval run {done.run_id} started and was registered during it "
        f"(bundle {bound.bundle}): the run called what its request named, not the release; run the eval again")
    assert (f"the eval called model 'good', the release ships 'bad'; endpoint '{sim.url}', the release ships "
            f"'default' ({late['model_config/v-late-config']})") in d.reason
    state = await canary(held["router"], "v-late")
    assert (state["phase"], state["weight"]) == ("aborted", 0.0)  # no PASS: the router serves none of it


async def test_a_release_registered_before_its_eval_and_unchanged_still_passes_and_is_admitted(
    bus: Bus, settings: Settings, held: dict[str, Any], subscribe: Callable[[str], Any]
) -> None:
    sim = held["sim"]
    sim.go.set()
    arts = await register_model_release(bus, "v-early", "good")
    evals = await subscribe(bus.subjects.eval_completed)
    result = await eval_run(settings, "v-early")  # evaluated as it ships
    assert result.exit_code == 0, result.output
    done = Codec(EvalCompleted).decode((await evals.next_msg(timeout=5)).data)
    # The result says what the run started on: the release as bound, which is what the decision names.
    assert done.binding == binding_of(await artifacts.release_of(bus, "v-early")) and done.artifacts == arts
    assert (done.environment["task"], done.environment["model"], done.environment["endpoint"]) == (
        "call", "good", "default")
    d = await current_decision(bus, "v-early")
    assert d.decision == "PASS" and [r.verdict for r in d.rules] == ["PASS", "PASS", "PASS"]
    assert {**arts, "eval_suite": held["suite"], "policy": held["policy"]} == d.artifacts
    state = await canary(held["router"], "v-early")
    assert (state["phase"], state["canary"]["release"], state["admitted"]) == ("progressing", "v-early", d.id)


async def test_eval_run_exits_4_on_a_gate_decision_its_trust_roots_refuse(
    bus: Bus, settings: Settings, held: dict[str, Any], tmp_path: Path
) -> None:
    # Before (r1 probe, finding 3): `eval run` printed the PASS and exited 0 on a decision signed by a key its trust
    # roots had revoked, which `gate verify` refused (exit 4) and the router would not admit; CI reads 0 as "the gate
    # passed". Here the CI job's trust file revokes the key the gatekeeper still signs with (its hosts did not get
    # the revocation yet).
    held["sim"].go.set()
    await register_model_release(bus, "v-ci", "good")
    kid = Signer.load_or_create(default_key_path(settings)).key_id  # the gatekeeper's key
    ci_trust = tmp_path / "ci-trust.json"
    shutil.copy(trust_file_path(settings), ci_trust)
    revoke_key(ci_trust, kid)
    result = await eval_run(settings, "v-ci", env={"LOCKGATE_TRUST_FILE": str(ci_trust)})
    assert result.exit_code == 4, result.output
    # No PASS shown: with --json stdout holds the error alone, as the exit-code table says
    assert json.loads(result.stdout) == {"error": result.stderr.strip().removeprefix("error: "), "exit_code": 4}
    assert len(result.stderr.splitlines()) == 1, result.output
    assert result.stderr.startswith("error: the gate decision of eval ") and " for v-ci is refused: signature " \
        "invalid: decision " in result.stderr and f"was signed by revoked key id {kid!r}" in result.stderr
    d = await current_decision(bus, "v-ci")
    assert d.decision == "PASS" and d.key_id == kid  # what it refused: the stack's PASS, as `gate verify` does
    verified = await asyncio.to_thread(CliRunner().invoke, cli, [
        "--nats", settings.nats_url, "--prefix", settings.prefix, "gate", "verify", "v-ci"],
        env={"LOCKGATE_TRUST_FILE": str(ci_trust)})
    assert verified.exit_code == 4 and f"revoked key id {kid!r}" in verified.stderr


async def test_eval_run_refuses_flags_other_than_the_release_ships_before_it_requests_anything(
    bus: Bus, settings: Settings, held: dict[str, Any], subscribe: Callable[[str], Any]
) -> None:
    # Before (q1 probe, finding 1): `eval run` of a serving release with the simulator's URL spelled another way, or
    # another model, was requested anyway; the evaluator failed the run ("the gate judges what ships") and the
    # gatekeeper signed a BLOCK of the release, which rolled it back: a typo in a flag moved production.
    sim = held["sim"]
    sim.go.set()
    kv = await bus.kv(bus.subjects.kv_gates)
    passed = await kv.get(token("r1"))  # r1's PASS: the release deployment `chat` serves
    config = (await artifacts.release_of(bus, "r1"))["artifacts"]["model_config/r1-config"]
    requested = await subscribe(bus.subjects.eval_requested)
    ships = f"release 'r1' ships model 'good' at endpoint 'default' ({config})"
    other_spelling = sim.url.replace("127.0.0.1", "localhost")
    # The CLI reads the allow-list as the stack does: `default` is the simulator.
    same_config = {"LOCKGATE_STABLE_UPSTREAM": sim.url}
    for args, why in (
            (("--endpoint", other_spelling), f"the eval asks for endpoint '{other_spelling}': the gate judges what "
                                             "ships; omit the endpoint or give 'default'"),
            (("--endpoint", "canary"), "the eval asks for endpoint 'canary': the gate judges what ships; omit the "
                                       "endpoint or give 'default'"),
            (("--endpoint", sim.url, "--model", "bad"), "the eval asks for model 'bad': the gate judges what ships; "
                                                        "omit the model or give 'good'")):
        refused = await eval_run(settings, "r1", *args, env=same_config)
        assert refused.exit_code == 2, refused.output
        assert refused.stderr == f"error: {ships}, but {why}\n", refused.stderr  # one line: given, shipped, to pass
    typo = await eval_run(settings, "r1", "--baseline", "r0", env=same_config)
    assert typo.exit_code == 2 and typo.stderr.startswith("error: baseline release 'r0' is not registered: "), \
        typo.output
    assert (await kv.get(token("r1"))).revision == passed.revision  # no decision written: r1 still passes
    assert sim.requests == {}

    # Flags that name what ships (the id, or its allow-listed URL, and its model) still run, and gate, as before.
    right = await eval_run(settings, "r1", "--endpoint", sim.url + "/", "--model", "good", env=same_config)
    assert right.exit_code == 0, right.output
    # The first request anything published was this one: the refused runs were never requested. The URL is
    # requested as the endpoint's id: the evaluator calls what ships, and has no URL to read otherwise.
    first = Codec(EvalRequested).decode((await requested.next_msg(timeout=5)).data)
    assert (first.run_id, first.endpoint, first.model) == (json.loads(right.stdout)["run_id"], "default", "good")
    assert sim.requests == {"good": 20}
    d = await current_decision(bus, "r1")
    assert (d.decision, d.eval_run) == ("PASS", first.run_id)
    # The README's URL from a CLI whose settings say the simulator is there, while this stack's is on another port:
    # before, the evaluator refused the URL and the gate BLOCKed r1; the run now evaluates what ships.
    readme = await eval_run(settings, "r1", "--endpoint", "http://127.0.0.1:9000/v1", "--model", "good")
    assert readme.exit_code == 0, readme.output
    second = Codec(EvalRequested).decode((await requested.next_msg(timeout=5)).data)
    assert (second.run_id, second.endpoint) == (json.loads(readme.stdout)["run_id"], "default")
    assert (await current_decision(bus, "r1")).decision == "PASS"


async def test_a_rule_name_a_policy_author_chose_is_shown_as_data(
    bus: Bus, settings: Settings, held: dict[str, Any], tmp_path: Path
) -> None:
    # Before (probe p13): a rule named `acc[/]` made `eval run` end in a rich MarkupError traceback (exit 1, not 5)
    # when it printed the BLOCK's reason, and every later `gate explain` of the release failed the same way.
    held["sim"].go.set()
    await register_model_release(bus, "v-markup", "bad")
    policy = tmp_path / "markup.yaml"
    policy.write_text("name: markup\nuse_interval: false\nrules:\n  - name: 'acc[/]'\n    metric: exact_match\n"
                      "    op: '>='\n    threshold: 0.8\n")
    argv = ["--nats", settings.nats_url, "--prefix", settings.prefix, "--home", settings.home, "eval", "run",
            str(FIXTURES / "suites" / "qa.yaml"), "--candidate", "v-markup", "--policy", str(policy), "--timeout",
            "60"]
    result = await asyncio.to_thread(CliRunner().invoke, cli, argv, catch_exceptions=False)
    assert result.exit_code == 5 and "acc[/]" in result.output, result.output
    explained = await asyncio.to_thread(CliRunner().invoke, cli, [
        "--nats", settings.nats_url, "--prefix", settings.prefix, "gate", "explain", "v-markup"])
    assert explained.exit_code == 0 and "acc[/]" in explained.output, explained.output
    # Its time says it is UTC, as every time lockgate shows (probe p27 F2: it had no zone).
    assert re.search(r"decision \S+ at \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", explained.output), explained.output
