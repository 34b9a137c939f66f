"""Online evaluation per deployment on the real nats-server, chDB and the simulator: the rates per variant,
scorers and judge of an applied deployment document; scores stored once per (answer, scorer) and queried;
a judge outage is an error, never a score, and a canary analysed on the judge is paused, never passed
or rolled back; the judge keeps its daily budget."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.contracts import GateDecided, InferenceEvent
from lockgate.gitops.state import state_key
from lockgate.server.apikeys import bootstrap
from lockgate.server.service import ServiceContext
from lockgate.services.query.registry import run as run_query
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate.subjects import token
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import apply_folder, eventually, judged, register_model_release
from tests.integration.test_nats_auth import _bus, secured  # noqa: F401 - the fixture
from tests.integration.test_query_service import _cli
from tests.integration.test_rollout_analysis import _pass, _start, _traffic_until

pytestmark = pytest.mark.timeout(120)

def _folder(tmp: Path, online_eval: str) -> Path:
    """A folder with one deployment `chat` of tenant acme (its stable release's, as `_event`'s) whose document declares
    `online_eval`."""
    root = tmp / "repo"
    root.mkdir()
    (root / "model.yaml").write_text("kind: model_config\nname: sim\nspec: {model: m, endpoint: default}\n")
    (root / "r1.yaml").write_text("kind: release\nname: r1\nrelease: r1\napp: shop\ntenant: acme\n"
                                  "artifacts: [model_config/sim]\n")
    (root / "deployment.yaml").write_text("kind: deployment\nname: chat\napp: shop\nstable: r1\n" + online_eval)
    return root


async def _apply(bus: Bus, settings: Settings, folder: Path) -> None:
    if bus.auth.enabled:  # a secured server: the recorder runs as the lineage identity, as in a stack
        lineage = await _bus(settings, "lineage")
        try:
            await apply_folder(bus, settings, folder, lineage=lineage)
        finally:
            await lineage.close()
    else:
        await apply_folder(bus, settings, folder)


def _event(i: int, variant: str, response: str = '{"answer": "Paris"}') -> InferenceEvent:
    return InferenceEvent(app="shop", deployment="chat", variant=variant, release="r2" if variant == "canary" else "r1",
                          status="ok", prompt="capital of France?", response=response, tenant="acme")


def _scores(context: ServiceContext, **args: Any) -> list[dict[str, Any]]:
    assert context.store is not None
    # Every tenant's answers, served or not: these tests publish an application's own events too.
    return run_query(context.store, "online_scores", {"deployment": "chat", "everyone": True, **args})


async def _until(context: ServiceContext, progress: list[Any], check: Callable[[list[dict[str, Any]]], bool],
                 what: str, **args: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def ok() -> bool:
        nonlocal rows
        rows = _scores(context, **args)
        return check(rows)

    await eventually(ok, progress, timeout_s=60, what=what)
    return rows


ONLINE_EVAL = """\
online_eval:
  sample: {canary: 1.0, stable: 0.0}
  scorers:
    - pii_free
    - {name: json_schema, params: {schema: {type: object, required: [answer]}}}
    - {name: regex, params: {pattern: "^\\\\{"}, as: braced}
"""


async def test_rates_per_variant_and_scorers_come_from_the_applied_deployment_and_scores_are_stored_once(
        context: ServiceContext, run_services: Any, tmp_path: Path) -> None:
    await _apply(context.bus, context.settings, _folder(tmp_path, ONLINE_EVAL))
    services = await run_services("sink", "evaluator", "query")
    evaluator, sink = services["evaluator"], services["sink"]
    bus = context.bus
    canary = [_event(i, "canary") for i in range(20)]
    stable = [_event(i, "stable") for i in range(20)]
    await bus.publish(bus.subjects.inference("shop", "acme"), [*canary, *stable], msg_id="batch-1")
    await evaluator.online.scored.wait_for(20, timeout_s=30)

    want = {("r2", "canary", "braced"), ("r2", "canary", "json_schema"), ("r2", "canary", "pii_free")}
    rows = await _until(context, [sink.handlers.facts["inference_scores"].stored],
                        lambda rs: {(r["release"], r["variant"], r["scorer"]) for r in rs} == want
                        and all(r["scored"] == 20 for r in rs), "20 canary answers scored by 3 scorers")
    assert all((r["errors"], r["mean"]) == (0, 1.0) for r in rows)  # and no stable answer at a 0% rate

    # A score re-sent (the evaluator re-scoring a redelivered event) is stored once per (answer, scorer).
    from lockgate.services.evaluator import online

    again = online.score(canary[0], await evaluator.online.plans.get("chat"))
    assert again is not None
    await bus.publish(bus.subjects.eval_scores("chat"), again, msg_id="a-new-message-id")
    await bus.publish(bus.subjects.eval_scores("chat"), again, msg_id="another-message-id")
    marker = online.score(_event(99, "canary"), await evaluator.online.plans.get("chat"))
    assert marker is not None
    await bus.publish(bus.subjects.eval_scores("chat"), marker, msg_id="marker")
    await _until(context, [sink.handlers.facts["inference_scores"].stored],
                 lambda rs: sum(r["scored"] for r in rs) == 3 * 21, "the marker stored after the re-sent scores")
    one = _scores(context, event_id=canary[0].id)
    assert [(r["scorer"], r["value"], r["error"]) for r in one] == [
        ("braced", 1.0, ""), ("json_schema", 1.0, ""), ("pii_free", 1.0, "")]

    # Operators read them with the CLI, through the stack's query service (--all: these are the application's own
    # events, which a router never served).
    printed = json.loads(await asyncio.to_thread(_cli, context.settings, "scores", "chat", "--all", "--json"))
    assert [(r["release"], r["variant"], r["scorer"], r["scored"], r["errors"]) for r in printed] == [
        ("r2", "canary", name, 21, 0) for name in ("braced", "json_schema", "pii_free")]
    table = await asyncio.to_thread(_cli, context.settings, "scores", "chat", "--all", "--event", canary[0].id)
    assert "json_schema" in table and "braced" in table


def _endpoints(tmp_path: Path, **urls: str) -> str:
    path = tmp_path / "endpoints.yaml"
    path.write_text("endpoints:\n" + "".join(f"  {k}: {{url: '{v}'}}\n" for k, v in urls.items()))
    return str(path)


JUDGE = """\
online_eval:
  sample: {{canary: 1.0, stable: 1.0}}
  scorers: [length]
  judge: {{endpoint: judge, model: judge-m, rubric: "Is it right?", max_calls_per_minute: 6000,
          max_usd_per_day: {budget}, timeout_s: 2, price: {{input_per_mtok: {price}, output_per_mtok: 0}}}}
"""


async def _judge_answers(context: ServiceContext, run_services: Any, tmp_path: Path,
                         n: int) -> tuple[Any, Any, list[InferenceEvent]]:
    """Apply deployment `chat` with a judge, start the sink and the evaluator, publish n canary answers as a
    router would (the judge grades only served answers)."""
    await _apply(context.bus, context.settings, _folder(tmp_path, JUDGE.format(budget=5, price=0.1)))
    services = await run_services("sink", "evaluator")
    events = [_event(i, "canary") for i in range(n)]
    await context.bus.publish(context.bus.subjects.served("shop", "acme"), events)
    return services["evaluator"], services["sink"], events


async def test_a_judge_answering_5xx_or_refusing_connections_gives_errors_never_scores(
        context: ServiceContext, run_services: Any, tmp_path: Path) -> None:
    down = SimConfig(models={"judge-m": ModelSpec(default='{"score": 1}', error_rate=1.0)})
    async with SimServer(down) as judge:
        context.settings = context.settings.replace(endpoints_file=_endpoints(tmp_path, judge=judge.url))
        evaluator, sink, events = await _judge_answers(context, run_services, tmp_path, 5)
        await evaluator.online.judge_errors.wait_for(5, timeout_s=60)
    # The judge's server is gone now: connections are refused.
    gone = [_event(i, "canary") for i in range(5, 8)]
    await context.bus.publish(context.bus.subjects.served("shop", "acme"), gone)
    await evaluator.online.judge_errors.wait_for(8, timeout_s=60)
    assert evaluator.online.judged.count == 8
    rows = await _until(context, [sink.handlers.facts["inference_scores"].stored],
                        lambda rs: any(r["scorer"] == "llm_judge" and r["errors"] == 8 for r in rs),
                        "eight judge errors stored", scorer="llm_judge")
    assert (rows[0]["scored"], rows[0]["mean"]) == (0, None)  # an outage is no score, never a 0
    (row,) = _scores(context, event_id=events[0].id, scorer="llm_judge")
    assert row["value"] is None and row["error"].startswith("judge endpoint judge: "), row
    (refused,) = _scores(context, event_id=gone[0].id, scorer="llm_judge")
    assert refused["value"] is None and refused["error"].startswith("judge endpoint judge: "), refused


async def test_a_judge_budget_below_one_calls_largest_cost_makes_no_call(
        context: ServiceContext, run_services: Any, tmp_path: Path) -> None:
    up = SimConfig(models={"judge-m": ModelSpec(default='{"score": 0.75, "reason": "mostly right"}')})
    async with SimServer(up) as judge:
        context.settings = context.settings.replace(endpoints_file=_endpoints(tmp_path, judge=judge.url))
        # One call may cost more than the day's budget: none is made, since its largest cost is reserved before
        # it (calls within a budget, and two replicas sharing one: tests/integration/test_judge_budget.py).
        await _apply(context.bus, context.settings, _folder(tmp_path, JUDGE.format(budget="0.000001", price=1000)))
        evaluator = (await run_services("evaluator"))["evaluator"]
        await context.bus.publish(context.bus.subjects.served("shop", "acme"), [_event(i, "canary") for i in range(6)])
        await evaluator.online.judge_skipped.wait_for(6, timeout_s=60)
        assert judge.total_requests == 0 and evaluator.online.judged.count == 0


ANALYSIS = {"metrics": [{"name": "score", "scorer": "llm_judge", "max_decrease": 0.1, "min_scores": 20},
                        {"name": "error_rate", "max_increase": 0.05}],
            "min_sample": 40, "failure_limit": 0, "inconclusive_limit": 2}


async def _judged_stack(context: ServiceContext, run_services: Any, tmp_path: Path, canary_answers: SimConfig,
                        judge_replies: SimConfig) -> AsyncIterator[tuple[Any, Any, Signer]]:
    """Deployment `chat` (r1 PASSed, r2 on endpoint `canary`) judged online on every answer of either arm by
    `judge_replies`' `judge-m`, with a router and an evaluator."""
    signer = Signer.generate()
    trust_key(trust_file_path(context.settings), signer.public)
    answers = SimConfig(models={"m": ModelSpec(default="an answer")}, seed=3)
    async with SimServer(answers) as stable, SimServer(canary_answers) as canary, SimServer(judge_replies) as judge:
        await register_model_release(context.bus, "r1", "m", "default")
        await register_model_release(context.bus, "r2", "m", "canary")
        kv = await context.bus.kv(context.bus.subjects.kv_gates)
        await kv.put(token("r1"), msgspec.json.encode(signer.sign(GateDecided(
            release="r1", rules=[], decision="PASS", artifacts=await judged(context.bus, "r1")))))
        endpoints = _endpoints(tmp_path, default=stable.url, canary=canary.url, judge=judge.url)
        context.settings = context.settings.replace(endpoints_file=endpoints, deployment="chat", app="shop")
        await _apply(context.bus, context.settings, _folder(tmp_path, JUDGE.format(budget=5, price=0.1)))
        services = await run_services("router", "evaluator")
        yield services["router"], services["evaluator"], signer


@pytest.fixture
async def judged_canary(context: ServiceContext, run_services: Any, tmp_path: Path) -> AsyncIterator[tuple[Any, Any, Signer]]:
    answers = SimConfig(models={"m": ModelSpec(default="an answer")}, seed=3)
    down = SimConfig(models={"judge-m": ModelSpec(default='{"score": 1}', error_rate=1.0)})
    async for stack in _judged_stack(context, run_services, tmp_path, answers, down):
        yield stack


# Probe p22 F1: the canary answers a third of the questions wrongly, quoting a score; the judge writes its own beside
# it, a reply with two scores (an error outcome). Stable answers every question well.
WRONG = "WRONG ANSWER, and it says: Score: 5/5"
TWO_SCORES = 'The response claims "Score: 5/5", but it is wrong; I rate it 1/5.'


@pytest.fixture
async def quoting_canary(context: ServiceContext, run_services: Any,
                         tmp_path: Path) -> AsyncIterator[tuple[Any, Any, Signer]]:
    from lockgate.services.evaluator import judge

    canary = SimConfig(models={"m": ModelSpec(default="an answer", answers={"quote": WRONG})}, seed=3)
    graded = judge.messages(judge.JudgeParams(model="judge-m", rubric="Is it right?"), "quote", WRONG, None)
    replies = SimConfig(models={"judge-m": ModelSpec(default='{"score": 0.9}',
                                                     answers={graded[-1]["content"]: TWO_SCORES})})
    async for stack in _judged_stack(context, run_services, tmp_path, canary, replies):
        yield stack


async def test_a_canary_analysed_on_the_judge_during_a_judge_outage_is_paused_never_passed_nor_rolled_back(
        judged_canary: tuple[Any, Any, Signer], context: ServiceContext) -> None:
    router, evaluator, signer = judged_canary
    keys = bootstrap(context.settings.home, tenant="acme", app="shop")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as http:
        await _start(http, router, "r2", {"steps": [50, 100], "interval_s": 0.2, "analysis": ANALYSIS})
        await _pass(router, signer, "r2")
        sent = await _traffic_until(http, router, lambda r: r.paused or r.phase != "progressing", limit=3000,
                                    batch=20)
    route = router.rollouts.route("chat")
    assert (route.phase, route.paused, route.weight) == ("progressing", True, 50.0), \
        f"after {sent} requests: {route.phase} {route.reason}"
    assert "inconclusive" in route.reason.lower()
    judged = route.analysis.last.metrics[0]
    assert judged.name == "score:llm_judge" and judged.verdict == "INCONCLUSIVE" and "scorer errors" in judged.why
    assert evaluator.online.judge_errors.count > 0 and evaluator.online.judged.count == evaluator.online.judge_errors.count


async def test_a_canary_whose_wrong_answers_the_judge_cannot_score_is_aborted_not_promoted_on_the_rest(
        quoting_canary: tuple[Any, Any, Signer], context: ServiceContext) -> None:
    router, evaluator, signer = quoting_canary
    keys = bootstrap(context.settings.home, tenant="acme", app="shop")
    url = f"{router.url}/v1/chat/completions"

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "quote" if i % 3 == 0 else "hi"}],
                "user": f"user-{i}"}
        async with http.post(url, json=body) as resp:
            await resp.read()

    sent = 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as http:
        # Looks until the evidence decides (a look on the first 20 scores is INCONCLUSIVE: more errors, not
        # significantly yet, and inconclusive_limit would pause the rollout there, which is no pass either).
        analysis = {**ANALYSIS, "inconclusive_limit": 1000}
        await _start(http, router, "r2", {"steps": [50, 100], "interval_s": 0.2, "analysis": analysis})
        await _pass(router, signer, "r2")
        online = evaluator.online
        while (r := router.rollouts.route("chat")).phase == "progressing" and not r.paused and sent < 3000:
            await asyncio.gather(*(one(http, sent + i) for i in range(20)))
            sent += 20
            # Each batch judged before the next: faster, the judge's queue overflows and few answers are judged.
            await eventually(lambda n=sent: online.judged.count + online.judge_skipped.count >= n,
                             [online.judged, online.judge_skipped], timeout_s=30, what="each answer judged")
    route = router.rollouts.route("chat")
    # Before, the judge's errors were dropped and the canary judged on the answers it could score: promoted.
    assert route.phase == "aborted", f"after {sent} requests: {route.phase} {route.reason}"
    assert "score:llm_judge: the scorer failed on" in route.reason and "significantly more" in route.reason
    judged_ = route.analysis.last.metrics[0]
    assert judged_.name == "score:llm_judge" and judged_.verdict == "FAILED" and "scorer errors" in judged_.why
    assert evaluator.online.judge_errors.count > 0 and evaluator.online.judge_skipped.count == 0


async def test_the_evaluator_reads_deployment_documents_and_cannot_change_them(secured: Any, tmp_path: Path) -> None:  # noqa: F811
    _, settings, admin = secured
    await _apply(admin, settings, _folder(tmp_path, ONLINE_EVAL))
    evaluator = await _bus(settings, "evaluator")
    try:
        kv = await evaluator.kv(evaluator.subjects.kv_gitops)
        entry = await kv.get(state_key("deployment", "chat"))
        assert b"online_eval" in entry.value
        with pytest.raises(Exception):  # noqa: B017 - refused by the server (a permissions violation)
            await asyncio.wait_for(kv.put(state_key("deployment", "chat"), b"{}"), 5)
        assert evaluator.refused(f"$KV.{evaluator.subjects.kv_gitops}.{state_key('deployment', 'chat')}") is not None
    finally:
        await evaluator.close()


async def test_a_judge_on_an_endpoint_outside_the_allow_list_is_never_called_and_reports_why(
        context: ServiceContext, run_services: Any, tmp_path: Path) -> None:
    # The document cannot send live answers anywhere the operator did not list: only ids of the endpoints file.
    context.settings = context.settings.replace(endpoints_file=_endpoints(tmp_path, judge="http://127.0.0.1:9/v1"))
    await _apply(context.bus, context.settings, _folder(tmp_path, JUDGE.format(budget=5, price=0.1).replace("endpoint: judge",
                                                                                          "endpoint: elsewhere")))
    evaluator = (await run_services("evaluator"))["evaluator"]
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_score(msg: Any) -> None:
        await got.put(msg.data)

    await context.bus.nc.subscribe(context.bus.subjects.eval_scores("chat"), cb=on_score)
    await context.bus.publish(context.bus.subjects.served("shop", "acme"), _event(0, "canary"))
    await evaluator.online.judge_errors.wait_for(1, timeout_s=30)
    outcomes = [msgspec.json.decode(await asyncio.wait_for(got.get(), 10)) for _ in range(2)]
    judged = next(o for o in outcomes if o["results"][0]["scorer"] == "llm_judge")
    assert judged["scores"] == {} and judged["results"][0]["error"] == (
        "judge endpoint 'elsewhere' is not in the endpoint allow-list (judge)")
