"""A served request whose prompt, answer or tool calls are larger than one bus message (NATS' 1 MB max_payload)
through the official `openai` client, the router, a real nats-server, the sink and the cost service on chDB.

Before, its event was over the limit, failed its one publish and was dropped (a WARNING line): no
`inference_events` row, no cost ledger row, no canary evidence, although the client was answered and the
budgets were charged. Now its text is cut to fit and the event says so (`lockgate.truncated`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from lockgate.server.apikeys import Bootstrap, bootstrap
from lockgate.server.service import ServiceContext
from lockgate.services.router.fit import EVENT_BYTES
from lockgate.textbound import TEXT_BYTES, TRUNCATED
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import sink_stored

pytestmark = pytest.mark.timeout(60)

MODEL = "sim-good"  # priced in the shipped price book: a ledger row with a cost
LONG = "lorem " * 50_000  # 300 kB: four choices of it, or four tool calls echoing it, are 1.2 MB


@pytest.fixture
async def stack(context: ServiceContext, run_services: Any) -> AsyncIterator[Any]:
    async with SimServer(SimConfig(models={MODEL: ModelSpec(default=LONG)})) as sim:
        context.settings = context.settings.replace(stable_upstream=sim.url, deployment="chat", app="shop",
                                                    passthrough=True)
        yield await run_services("sink", "cost", "router")


@pytest.fixture
def keys(context: ServiceContext) -> Bootstrap:
    return bootstrap(context.settings.home, tenant="acme", app="shop")


@pytest.mark.parametrize("tools", [False, True], ids=["n4-long-answers", "n4-long-tool-calls"])
async def test_a_served_answer_over_one_bus_message_is_stored_cut_and_in_the_ledger(
        stack: Any, keys: Bootstrap, context: ServiceContext, tools: bool) -> None:
    router, sink = stack["router"], stack["sink"].handlers
    extra: dict[str, Any] = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object"}}}]} if tools else {}
    async with openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=keys.app_key, max_retries=0,
                                  timeout=20) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, n=4, messages=[{"role": "user", "content": LONG if tools else "hi"}], **extra)
    answer = raw.parse()
    assert len(raw.http_response.content) > 1_100_000  # more than one bus message carries
    trace = raw.headers["x-lockgate-trace-id"]

    await sink.rows.wait_for(1, 30)
    await sink_stored(sink, cost_ledger=1)
    store = context.store
    (row,) = store.rows("SELECT id, input_tokens, output_tokens, status, prompt, response, attributes "
                        "FROM inference_events WHERE trace_id = {t:String}", {"t": trace})
    assert (row["input_tokens"], row["output_tokens"], row["status"]) == (
        answer.usage.prompt_tokens, answer.usage.completion_tokens, "ok")
    marked = dict(part.split(":") for part in row["attributes"][TRUNCATED].split(","))
    assert "gen_ai.output.messages" in marked and int(marked["gen_ai.output.messages"]) > 1_000_000
    long = "prompt" if tools else "response"  # the other is short ("hi"), or empty (tool calls only)
    assert int(marked[long]) == len(LONG) and len(row[long]) == TEXT_BYTES and LONG.startswith(row[long])
    assert sum(len(v) for v in row["attributes"].values()) < EVENT_BYTES
    # The output messages stay JSON, every choice (and tool call) in them: drift reads the tool calls.
    messages = json.loads(row["attributes"]["gen_ai.output.messages"])
    assert len(messages) == 4
    assert all(m["parts"][0]["type"] == ("tool_call" if tools else "text") for m in messages)

    # The ledger has the call, at the event's usage: the ledger and the events agree.
    (ledger,) = store.rows("SELECT input_tokens, output_tokens, cost_usd, priced FROM cost_ledger "
                           "WHERE event_id = {i:String}", {"i": row["id"]})
    assert (ledger["input_tokens"], ledger["output_tokens"]) == (row["input_tokens"], row["output_tokens"])
    assert ledger["priced"] and ledger["cost_usd"] > 0


async def test_served_events_go_out_in_messages_the_stacks_consumers_take(
        context: ServiceContext, run_services: Any, keys: Bootstrap) -> None:
    # Found by a probe (p56 F2): the router's outbox put up to 500 events in a message whatever the stack's
    # `max_events_per_message`; under load a message over it was acknowledged, then dead-lettered whole by every
    # consumer: served events lost. Now the outbox cuts its messages at the stack's limit.
    async with SimServer(SimConfig(models={MODEL: ModelSpec(default="short")})) as sim:
        context.settings = context.settings.replace(stable_upstream=sim.url, deployment="chat", app="shop",
                                                    passthrough=True, max_events_per_message=2)
        svcs = await run_services("sink", "cost", "router")
        sink = svcs["sink"].handlers
        async with openai.AsyncOpenAI(base_url=f"{svcs['router'].url}/v1", api_key=keys.app_key, max_retries=0,
                                      timeout=20) as client:
            answers = await asyncio.gather(*(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}]) for i in range(20)))
        assert len(answers) == 20
        await sink.rows.wait_for(20, 30)  # before: the batches of more than 2 were dead-lettered, never stored
        await sink_stored(sink, cost_ledger=10)
    assert context.store.scalar("SELECT count() FROM inference_events") == 20
    assert sink.dead_letters.count == 0
