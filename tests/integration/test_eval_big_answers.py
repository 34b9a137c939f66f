"""Evals of large answers (probe p52): cases finishing together complete, stored cut (F1); an answer over the evaluator's
bound is read no further and fails its case alone, the judge's too (F2).

Before, the case writer published each batch of finished cases (up to 256, every 0.25 s) as one message, with every
case's input, expected and output whole: cases that finished close together (a re-run answered from the cache, or
answers of 12 KB) made one message over NATS' max_payload, refused at every retry, and the eval request was
dead-lettered ("256 case results were not published"): no EvalCompleted, no decision.

Here 20 cases answered at once with 100 KB each (2 MB together, 1.3 MB even cut) and one case whose texts JSON
escapes six-fold (its result over a message's share even cut) run on a real nats-server and chDB, sink included.

Before F2, the evaluator read an endpoint's answer whole, however long: one answer of 300 MB took the embedded stack
from 561 MB to 7 GB and held every tenant's router 15-60 s. Here an endpoint streams 64 MB to the evaluated call and
to the judge's.

Before probe p58 F2, a dataset row's id was any length and kept whole in its case's result: an id of 1.1 MB made the
case 2 MB even as an unpublishable error, and the run was dead-lettered. Here the run fails at once, naming the row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.contracts import EvalCompleted
from lockgate.services.evaluator.domain import CASE_ID_MAX, FACT_BYTES, FACT_TEXT_BYTES
from lockgate.services.evaluator.runner import MAX_ANSWER_BYTES
from lockgate.services.query.evals import eval_case_results
from lockgate.store import Store
from lockgate.textbound import TRUNCATED
from tests.helpers import ChatUpstream, eventually
from tests.integration.test_eval_gate import request

pytestmark = pytest.mark.timeout(120)
completed: Codec[EvalCompleted] = Codec(EvalCompleted)
LONG = "word " * 20_000  # 100,000 bytes
ESCAPED = "\x01" * 100_000  # 6 bytes a character in JSON: cut to 64 KiB, still 393 KB a text


class LongAnswers(ChatUpstream):
    """Answers at once: each question with LONG, the escaped one with ESCAPED."""

    client_max_size = 4 * 1024 * 1024

    async def chat(self, request: web.Request) -> web.Response:
        question = (await request.json())["messages"][-1]["content"]
        return web.json_response({"choices": [{"message": {"role": "assistant",
                                                           "content": ESCAPED if question == ESCAPED else LONG}}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1}})


async def _run(bus: Bus, req: Any) -> Any:
    """Publish an eval request and wait for its EvalCompleted."""
    evals = await bus.nc.subscribe(bus.subjects.eval_completed)
    try:
        await bus.publish(bus.subjects.eval_requested, req)
        return completed.decode((await evals.next_msg(timeout=60)).data)
    finally:
        await evals.unsubscribe()


@pytest.fixture
async def upstream() -> AsyncIterator[LongAnswers]:
    async with LongAnswers() as server:
        yield server


async def test_an_eval_of_large_answers_finishing_together_completes_with_its_cases_stored_cut(
    bus: Bus, store: Store, context: Any, run_services: Callable[..., Any], upstream: LongAnswers
) -> None:
    cases = [{"id": f"c{i:02}", "input": f"question {i}", "expected": "word"} for i in range(20)]
    cases.append({"id": "escaped", "input": ESCAPED, "expected": "x"})
    suite = await artifacts.register(bus, "eval_suite", "big-answers", {
        "name": "big-answers", "prompt": {"template": "{input}"}, "dataset": cases, "scorers": ["contains"]})
    sink = (await run_services("sink", "query", "evaluator"))["sink"].handlers
    req = request(release="big-answers", suite=suite.hash, endpoint=upstream.url, model="m", concurrency=21,
                  timeout_s=30.0)
    done = await _run(bus, req)

    # The run completed; the case too large to store even cut is its one error, the others scored on whole answers.
    assert (done.run_id, done.status, done.n_cases, done.n_errors) == (req.run_id, "completed", 21, 1)
    assert done.metrics["contains"] == pytest.approx(20 / 21)
    await eventually(lambda: len(eval_case_results(store, req.run_id)) == 21, [sink.progress("eval_cases")],
                     what="the run's 21 cases stored")
    rows = {r["case_id"]: r for r in eval_case_results(store, req.run_id)}
    long = rows["c00"]
    details = json.loads(long["details"])
    # Each long answer is stored cut to 64 KiB, saying its size before the cut, with its score taken on it whole.
    assert (long["error"], long["output"], details[TRUNCATED]) == ("", LONG[:FACT_TEXT_BYTES], "output:100000")
    assert long["scores"]["contains"] == 1.0 and details["binding"]
    escaped = rows["escaped"]
    assert escaped["output"] == "" and escaped["scores"] == {}
    assert escaped["error"].startswith("its result is ") and f"more than the {FACT_BYTES:,} one case" in escaped["error"]
    assert json.loads(escaped["details"])[TRUNCATED] == "input:100000,output:100000"


HUGE_MB = 64
PIECE = b"Answer: ok " * 95_325  # ~1 MB of a JSON string's characters


class HugeAnswers(ChatUpstream):
    """Answers "ok", but streams HUGE_MB MB of answer to the question "huge" and to every judge request; `streams`
    gets the bytes each such answer wrote and whether it wrote them all."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: asyncio.Queue[tuple[int, bool]] = asyncio.Queue()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["model"] != "judge" and body["messages"][-1]["content"] != "huge":
            return web.json_response({"choices": [{"message": {"role": "assistant", "content": "ok"}}]})
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        written, whole = 0, False
        with contextlib.suppress(ConnectionError):  # the evaluator closed the connection: it reads no more
            await resp.write(b'{"choices":[{"message":{"role":"assistant","content":"')
            for _ in range(HUGE_MB):
                await resp.write(PIECE)
                written += len(PIECE)
            await resp.write(b'"}}]}')
            whole = True
        self.streams.put_nowait((written, whole))
        return resp


async def test_an_answer_over_the_bound_is_read_no_further_and_fails_its_case_the_judges_too(
    bus: Bus, store: Store, run_services: Callable[..., Any]
) -> None:
    async with HugeAnswers() as upstream:
        judge = {"name": "llm_judge", "params": {"model": "judge", "rubric": "Is it ok?", "n": 1,
                                                 "endpoint": upstream.url}}
        suite = await artifacts.register(bus, "eval_suite", "huge-answers", {
            "name": "huge-answers", "prompt": {"template": "{input}"}, "scorers": ["contains", judge],
            "dataset": [{"id": "huge", "input": "huge", "expected": "ok"},
                        {"id": "small", "input": "small", "expected": "ok"}]})
        sink = (await run_services("sink", "query", "evaluator"))["sink"].handlers
        evals = await bus.nc.subscribe(bus.subjects.eval_completed)
        try:
            req = request(release="huge-answers", suite=suite.hash, endpoint=upstream.url, model="m", concurrency=2,
                          timeout_s=30.0, cache=False)
            await bus.publish(bus.subjects.eval_requested, req)
            done = completed.decode((await evals.next_msg(timeout=60)).data)
        finally:
            await evals.unsubscribe()
        # Two huge answers were asked (the case's and the judge's of the other case, each once: not retried), and
        # each stopped being read past the bound: neither was written whole.
        streams = [await asyncio.wait_for(upstream.streams.get(), 10) for _ in range(2)]
    assert upstream.streams.empty() and [whole for _, whole in streams] == [False, False], streams
    assert all(written < HUGE_MB * len(PIECE) for written, _ in streams)

    assert (done.run_id, done.status, done.n_cases, done.n_errors) == (req.run_id, "completed", 2, 1)
    await eventually(lambda: len(eval_case_results(store, req.run_id)) == 2, [sink.progress("eval_cases")],
                     what="the run's cases stored")
    rows = {r["case_id"]: r for r in eval_case_results(store, req.run_id)}
    too_large = f"answered more than {MAX_ANSWER_BYTES:,} bytes, more than the evaluator reads of one answer: not read"
    assert rows["huge"]["output"] == "" and too_large in rows["huge"]["error"], rows["huge"]["error"]
    small = rows["small"]
    assert small["error"] == "" and small["scores"]["contains"] == 1.0 and "llm_judge" not in small["scores"]
    [reply] = json.loads(small["details"])["llm_judge"]["replies"]
    assert reply.startswith("<judge call failed: ") and too_large in reply, reply


async def test_a_dataset_row_with_an_id_over_the_bound_fails_the_run_naming_the_row_and_the_bound(
    bus: Bus, store: Store, context: Any, run_services: Callable[..., Any], upstream: LongAnswers
) -> None:
    # Probe p58 F2: a row's id of 1.1 MB was kept whole in its case's result, 2 MB even as an unpublishable error, and
    # the eval request was dead-lettered "retries exhausted": no EvalCompleted, no decision.
    cases = [{"id": f"c{i}", "input": f"question {i}", "expected": "word"} for i in range(3)]
    cases.append({"id": "x" * 1_100_000, "input": "question big", "expected": "word"})
    dataset = await artifacts.register(bus, "dataset", "big-id", cases)
    suite = await artifacts.register(bus, "eval_suite", "big-id", {
        "name": "big-id", "prompt": {"template": "{input}"}, "dataset": dataset.hash, "scorers": ["contains"]})
    await run_services("sink", "query", "evaluator")
    req = request(release="big-id", suite=suite.hash, endpoint=upstream.url, model="m", concurrency=4,
                  timeout_s=30.0)
    done = await _run(bus, req)
    assert (done.run_id, done.status, done.n_cases) == (req.run_id, "failed", 0)
    assert done.error == (f"dataset {dataset.hash}: Expected `str` of length <= {CASE_ID_MAX} - at `$[3].id`")
