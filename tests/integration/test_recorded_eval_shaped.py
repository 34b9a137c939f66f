"""A `recorded` eval scores what the release answers to its own prompt, whatever the application asked besides
(probe p12 F5), on the real nats-server, chDB, router, sink, query service and evaluator.

Before, a recorded case took the most recent served event whose last user message was the case's question, whatever
else the request held. An application key chose the evidence: it asked again until the answer was right (the last
ask won), dictated the answer in a system message of its own, or forced a tool call (an empty answer) to fail a good
release; a call that failed was left out, so asking again hid it. Now a case counts only served chat requests that
are exactly what the release's prompt renders for it (the router's request digest), the earliest first, failures
included.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lockgate import artifacts
from lockgate.codec import Codec
from lockgate.contracts import EvalCompleted, EvalRequested, GateDecided
from lockgate.ids import uuid7
from lockgate.server.apikeys import Bootstrap, bootstrap
from lockgate.server.service import ServiceContext
from lockgate.services.query.evals import eval_cases
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import eventually, judged, register_model_release, store_decision

pytestmark = pytest.mark.timeout(120)
completed: Codec[EvalCompleted] = Codec(EvalCompleted)

SYSTEM = "Answer with one word."
QA = [("What is 2+2?", "4"), ("Capital of France?", "Paris"), ("Colour of a clear sky?", "blue"),
      ("Opposite of hot?", "cold"), ("Largest planet?", "Jupiter")]
CASES = [{"id": f"c{i}", "input": q, "expected": a} for i, (q, a) in enumerate(QA)]
DICTATE = "Answer: "


class Steerable(SimServer):
    """The simulator as a model an application could steer: it says what a system message `Answer: X` tells it,
    answers a question as `say` last set it (a model that is right only sometimes), and fails (HTTP 500) the
    questions in `failing`; tools make it call one (no text), as the simulator does."""

    def __init__(self, answers: dict[str, str]) -> None:
        super().__init__(SimConfig(models={"m": ModelSpec(answers=answers)}))
        self.failing: set[str] = set()
        self.unanswered: set[str] = set()  # questions it keeps its client waiting on, until the client hangs up

    def say(self, question: str, answer: str) -> None:
        self._models["m"].answers[question] = answer

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()  # aiohttp keeps the body: the simulator reads it again
        question = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        if question in self.unanswered:
            await asyncio.Event().wait()  # cancelled when the router drops the call: its client hung up
        if question in self.failing:
            return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=500)
        told = [m["content"][len(DICTATE):] for m in body["messages"]
                if m["role"] == "system" and m["content"].startswith(DICTATE)]
        if told and not body.get("tools"):
            return web.json_response({
                "id": "chatcmpl-told", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": told[-1]},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}})
        return await super()._chat(request)


@pytest.fixture
async def model() -> AsyncIterator[Steerable]:
    # The release answers c0 and c1 wrong when first asked, c2 and c3 right; c4 right, once it stops failing.
    async with Steerable({QA[0][0]: "5", QA[1][0]: "Lyon", QA[2][0]: "blue", QA[3][0]: "cold",
                          QA[4][0]: "Jupiter"}) as sim:
        yield sim


@pytest.fixture
def keys(context: ServiceContext) -> Bootstrap:
    """An admin key and an app key of tenant acme, app shop."""
    return bootstrap(context.settings.home, tenant="acme", app="shop")


async def _serve_r1(context: ServiceContext, run_services: Callable[..., Any], model: Steerable,
                    keys: Bootstrap) -> tuple[Any, Any]:
    """Release r1 (model m on the simulator, temperature fixed at 0, its own prompt) PASSed and serving deployment
    `chat`; returns (router, sink handlers)."""
    bus = context.bus
    prompt = await artifacts.register(bus, "prompt", "shop-answer", {"system": SYSTEM, "template": "{input}"})
    await register_model_release(bus, "r1", "m", "default", tenant="acme",
                                 extra_artifacts={"prompt/shop-answer": prompt.hash}, temperature=0)
    signer = Signer.generate()
    trust_key(trust_file_path(context.settings), signer.public)
    await store_decision(bus, signer.sign(GateDecided(release="r1", rules=[], decision="PASS",
                                                      artifacts=await judged(bus, "r1"))))
    context.settings = context.settings.replace(stable_upstream=model.url, deployment="chat", app="shop")
    svcs = await run_services("sink", "query", "evaluator", "router")
    router = svcs["router"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as http, \
            http.put(f"{router.url}/lockgate/v1/deployments/chat", json={"stable_release": "r1"}) as resp:
        assert resp.status == 200, await resp.text()
    return router, svcs["sink"].handlers


async def test_what_an_app_key_asks_besides_the_releases_prompt_does_not_change_a_recorded_eval(
    context: ServiceContext, run_services: Callable[..., Any], model: Steerable, keys: Bootstrap
) -> None:
    bus = context.bus
    router, sink = await _serve_r1(context, run_services, model, keys)
    sent = 0

    async def ask(question: str, system: list[str] | None = None, **extra: Any) -> tuple[int, str | None]:
        nonlocal sent
        messages = [{"role": "system", "content": s} for s in (system if system is not None else [SYSTEM])]
        body = {"model": "m", "messages": [*messages, {"role": "user", "content": question}], **extra}
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as http, \
                http.post(f"{router.url}/v1/chat/completions", json=body) as resp:
            sent += 1
            if body.get("stream"):
                lines = [ln async for ln in resp.content]
                return resp.status, b"".join(lines).decode()
            data = await resp.json()
            return resp.status, data["choices"][0]["message"]["content"] if resp.status == 200 else None

    # A client that hangs up on c3 before its answer, first of all (probe p18 F1): its own doing (`client_disconnected`,
    # well under `router_unanswered_s`), no answer of the release. Before, as the earliest event of c3's request it
    # was c3's result, an error of the release, ahead of the right answer every later ask got.
    model.unanswered.add(QA[3][0])
    body = {"model": "m", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QA[3][0]}]}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as http:
        with pytest.raises(TimeoutError):
            async with http.post(f"{router.url}/v1/chat/completions", json=body,
                                 timeout=aiohttp.ClientTimeout(total=0.5)) as resp:
                await resp.read()
    sent += 1
    model.unanswered.clear()
    hung_up = "SELECT count() FROM inference_events WHERE error_type = 'client_disconnected'"
    await eventually(lambda: context.store.scalar(hung_up) == 1, [sink.events], what="the hang-up stored")

    # What the application asks as the release's prompt renders it: the fields that do not change the answer (a
    # stream, a user id) and a temperature the release fixes itself (the router sends the release's) change nothing.
    model.failing.add(QA[4][0])
    assert await ask(QA[0][0]) == (200, "5")
    assert await ask(QA[1][0]) == (200, "Lyon")
    status, streamed = await ask(QA[2][0], stream=True, user="alice")
    assert status == 200 and "blue" in (streamed or "")
    assert await ask(QA[3][0], temperature=0.9) == (200, "cold")
    assert (await ask(QA[4][0]))[0] == 502  # the release's endpoint failed it (after its retries)
    model.failing.clear()

    # Then it steers: asks c0 again until the answer is right, dictates c1's answer in a system message of its own,
    # forces a tool call (no text) on c2, which was answered right, and asks c4 again once it answers.
    model.say(QA[0][0], "4")
    assert await ask(QA[0][0]) == (200, "4")
    assert await ask(QA[1][0], system=[SYSTEM, DICTATE + "Paris"]) == (200, "Paris")
    tool = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    assert await ask(QA[2][0], tools=tool, tool_choice="required") == (200, None)
    assert await ask(QA[4][0]) == (200, "Jupiter")

    # One event per request, besides those of the calls it went past (c4's first, retried).
    stored = "SELECT count() FROM inference_events WHERE NOT mapContains(attributes, 'lockgate.attempt')"
    await eventually(lambda: context.store.scalar(stored) >= sent, [sink.events], what=f"{sent} requests stored")

    suite = await artifacts.register(bus, "eval_suite", "shop-recorded", {
        "name": "shop-recorded", "prompt": {"template": "{input}"}, "dataset": CASES, "scorers": ["exact_match"],
        "task": {"type": "recorded", "app": "shop", "release": "r1"}})
    req = EvalRequested(run_id=uuid7(), release="r1", suite=suite.hash, endpoint="", model="", concurrency=2,
                        timeout_s=5.0)
    got: asyncio.Queue[EvalCompleted] = asyncio.Queue()

    async def on(msg: Any) -> None:
        await got.put(completed.decode(msg.data))

    await bus.nc.subscribe(bus.subjects.eval_completed, cb=on)
    await bus.publish(bus.subjects.eval_requested, req)
    async with asyncio.timeout(60):
        done = await got.get()
    assert done.run_id == req.run_id
    await eventually(lambda: len(eval_cases(context.store, req.run_id)) >= len(CASES),
                     [sink.progress("eval_cases")], what="the run's cases stored")
    cases = {c["case_id"]: c for c in eval_cases(context.store, req.run_id)}

    # Each case is scored by the first request the release's own prompt made of it: what the release answered.
    # Before: c0 "4" and c1 "Paris" (right), c2 "" (the tool call), c4 "Jupiter" (the failure left out).
    assert {c: row["output"] for c, row in cases.items()} == {"c0": "5", "c1": "Lyon", "c2": "blue", "c3": "cold",
                                                              "c4": ""}
    assert [c for c, row in cases.items() if row["error"]] == ["c4"]
    assert cases["c4"]["error"].startswith("the served call failed: ")
    assert done.metrics["exact_match"] == pytest.approx(2 / 5) and done.n_errors == 1
