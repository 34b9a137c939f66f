"""One chat call an application makes through lockgate's router with the official `openai` client, and the GenAI
client span its OpenTelemetry instrumentation exports for it to lockgate's OTLP receiver (the standard HTTP
exporter), on the embedded runtime as `lockgate up` runs it (the router on a port it picks). The span names the
router's address (`server.address`, `server.port`), as the OpenTelemetry OpenAI instrumentation sets them from the
client's base URL: the call is one ledger row, the router's, and `lockgate cost` counts it once; the span's event is
kept (drift, traces) and says the router bills it. A span of a call to another endpoint is billed as before.
Before (probe p61 F3), the span's event was booked too, and `lockgate cost` counted the call twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lockgate.config import Settings
from lockgate.server.apikeys import bootstrap
from lockgate.server.runtime import Runtime
from lockgate.server.service import ServiceContext
from lockgate.services.otlp.genai import event_id
from lockgate.store import Store
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import eventually, run_cli_json

pytestmark = pytest.mark.timeout(120)

MODEL = "gpt-4o-mini"  # priced in the shipped price book, so each booked call costs something
ELSEWHERE = (12, 34)  # the tokens of the call the app made to another endpoint


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(SimConfig(models={MODEL: ModelSpec(default="we ship item 3 tomorrow")})) as s:
        yield s


@pytest.fixture
async def stack(settings: Settings, sim: SimServer) -> AsyncIterator[Runtime]:
    """The embedded runtime (its own nats-server, a user per service), its router passing ungoverned requests
    through to the simulator: this test is about billing, not rollouts."""
    s = settings.replace(nats_url="nats://127.0.0.1:0", stable_upstream=sim.url, passthrough=True, deployment="chat")
    runtime = Runtime(s, services=["sink", "query", "cost", "router", "otlp"])
    await runtime.start()
    yield runtime
    await runtime.stop()


def _spans(router: tuple[str, int], usage: Any) -> list[ReadableSpan]:
    """The app's two GenAI client spans, as the OpenTelemetry OpenAI instrumentation records them: the call made
    through the router (its address and port, the usage the router answered) and one made to OpenAI (port 443,
    which the instrumentation leaves out)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "shop-app"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("opentelemetry.instrumentation.openai_v2")
    calls = [({"server.address": router[0], "server.port": router[1]}, (usage.prompt_tokens, usage.completion_tokens)),
             ({"server.address": "api.openai.com"}, ELSEWHERE)]
    for endpoint, (tokens_in, tokens_out) in calls:
        with tracer.start_as_current_span(f"chat {MODEL}") as span:
            span.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.system": "openai",
                                 "gen_ai.request.model": MODEL, "gen_ai.usage.input_tokens": tokens_in,
                                 "gen_ai.usage.output_tokens": tokens_out, **endpoint})
    provider.shutdown()
    return list(memory.get_finished_spans())


def _ids(span: ReadableSpan) -> tuple[str, str]:
    context = span.get_span_context()
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


async def test_a_call_through_the_router_whose_client_span_is_exported_too_is_billed_once(
        stack: Runtime, sim: SimServer) -> None:
    s = stack.settings
    keys = bootstrap(s.home, tenant="acme", app="shop")
    router_url = stack.services["router"].url
    host, port = router_url.removeprefix("http://").rsplit(":", 1)
    async with openai.AsyncOpenAI(base_url=f"{router_url}/v1", api_key=keys.app_key, max_retries=0,
                                  timeout=60) as client:
        answer = await client.chat.completions.create(model=MODEL,
                                                      messages=[{"role": "user", "content": "Do you ship item 3?"}])
    usage = answer.usage
    through_router, elsewhere = _spans((host, int(port)), usage)
    # Both spans in one export, as a batch processor sends them: one inference message, one ledger fact.
    exporter = OTLPSpanExporter(endpoint=stack.services["otlp"].endpoints["otlp-http"] + "/v1/traces",
                                headers={"x-api-key": keys.app_key})
    assert await asyncio.to_thread(exporter.export, [through_router, elsewhere]) == SpanExportResult.SUCCESS
    exporter.shutdown()

    store, sink = stack.ctx.store, stack.services["sink"].handlers
    spans_event, elsewhere_event = (event_id("acme", *_ids(span)) for span in (through_router, elsewhere))

    def booked() -> bool:
        # the router's row and the other endpoint's; a row of the span through the router would be in the same
        # ledger fact as the latter's
        return store.scalar("SELECT count() FROM cost_ledger WHERE event_id IN ({e:String}) OR event_id IN "
                            "(SELECT id FROM inference_events WHERE served)", {"e": elsewhere_event}) == 2

    await eventually(booked, [sink.progress("cost_ledger"), sink.events], what="the router's and the span's cost")
    await eventually(lambda: store.scalar("SELECT count() FROM inference_events") == 3, [sink.events],
                     what="the three events stored")
    assert store.scalar("SELECT count() FROM cost_ledger") == 2
    assert store.scalar("SELECT count() FROM cost_ledger WHERE event_id = {e:String}", {"e": spans_event}) == 0
    # The span's event is kept, for drift and traces, and says who bills it; the other one says nothing.
    kept = {r["id"]: r for r in store.rows("SELECT id, source, served, input_tokens, output_tokens, attributes "
                                           "FROM inference_events WHERE source = 'otlp'")}
    assert kept[spans_event]["attributes"].get("lockgate.billed_by") == "router"
    assert (kept[spans_event]["input_tokens"], kept[spans_event]["output_tokens"]) == (
        usage.prompt_tokens, usage.completion_tokens)
    assert "lockgate.billed_by" not in kept[elsewhere_event]["attributes"]

    # `lockgate cost` counts the call through the router once (the router's, its deployment), and the other call.
    rows = await run_cli_json(stack, "cost", "--by", "deployment")
    by_deployment = {r["deployment"]: (r["calls"], r["input_tokens"], r["output_tokens"]) for r in rows}
    assert by_deployment == {"chat": (1, usage.prompt_tokens, usage.completion_tokens), "": (1, *ELSEWHERE)}


async def test_a_receiver_apart_from_the_routers_knows_them_by_router_addresses(
        context: ServiceContext, run_services: Callable[..., Any], store: Store) -> None:
    # Distributed: the OTLP receiver runs without a router in its process, and is told the names clients reach the
    # routers by. A span naming one of them is the router's call; the same host at another port is not.
    context.settings = context.settings.replace(router_addresses="lockgate-router:8080, https://llm.example.com/v1")
    keys = bootstrap(context.settings.home, tenant="acme", app="shop")
    stack = await run_services("sink", "cost", "otlp")
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "shop-app"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("opentelemetry.instrumentation.openai")
    endpoints = [{"gen_ai.openai.api_base": "http://lockgate-router:8080/v1/"},  # OpenLLMetry's base URL
                 {"server.address": "llm.example.com"},  # 443, left out
                 {"server.address": "lockgate-router", "server.port": 9999}]
    for endpoint in endpoints:
        with tracer.start_as_current_span(f"chat {MODEL}") as span:
            span.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.system": "openai",
                                 "gen_ai.request.model": MODEL, "gen_ai.usage.input_tokens": 10,
                                 "gen_ai.usage.output_tokens": 5, **endpoint})
    provider.shutdown()
    exporter = OTLPSpanExporter(endpoint=stack.endpoints["otlp-http"] + "/v1/traces",
                                headers={"x-api-key": keys.app_key})
    spans = list(memory.get_finished_spans())
    assert await asyncio.to_thread(exporter.export, spans) == SpanExportResult.SUCCESS
    exporter.shutdown()
    ids = [event_id("acme", *_ids(span)) for span in spans]
    sink = stack["sink"].handlers
    await eventually(lambda: store.scalar("SELECT count() FROM cost_ledger") >= 1
                     and store.scalar("SELECT count() FROM inference_events") == 3,
                     [sink.progress("cost_ledger"), sink.events], what="the events and the ledger stored")
    assert [r["event_id"] for r in store.rows("SELECT event_id FROM cost_ledger")] == [ids[2]]
    marked = {r["id"]: r["b"] for r in store.rows("SELECT id, attributes['lockgate.billed_by'] AS b "
                                                  "FROM inference_events")}
    assert marked == {ids[0]: "router", ids[1]: "router", ids[2]: ""}
