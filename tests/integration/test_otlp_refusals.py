"""Spans the OTLP receiver refuses in part are recorded on the server too. The answer's partial_success is all the
sender gets, and the OpenTelemetry Python exporters ignore it: before, a span dated outside the window, or a model
call whose inference event was refused (not priced, not watched by drift), was recorded nowhere a lockgate operator
looks. Now each is counted (`lockgate.events.dropped`) and logged at WARNING, at most once a minute per key."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lockgate.server.apikeys import Bootstrap
from lockgate.server.service import ServiceContext
from tests.helpers import metric_points
from tests.integration import test_otlp

pytestmark = pytest.mark.timeout(90)

keys, stack = test_otlp.keys, test_otlp.stack

_DAY_NS = 86_400 * 10**9


def _refused_in_part() -> Any:
    """One span 40 days old, and one model call with a negative token count, as the standard SDK ends them."""
    spans = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "refused-in-part"}))
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("test-app")
    tracer.start_span("old step", start_time=time.time_ns() - 40 * _DAY_NS).end()
    with tracer.start_as_current_span("chat gpt-4o-mini") as call:
        call.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini",
                             "gen_ai.usage.input_tokens": -5})
    provider.shutdown()
    return spans.get_finished_spans()


async def test_a_partial_success_is_counted_and_logged_once_a_minute_per_key(
        stack: Any, keys: Bootstrap, metric_reader: InMemoryMetricReader, caplog: pytest.LogCaptureFixture) -> None:
    receiver = stack["otlp"].receiver
    exporter = HttpExporter(endpoint=stack.endpoints["otlp-http"] + "/v1/traces",
                            headers={"x-api-key": keys.app_key})
    spans = _refused_in_part()
    with caplog.at_level(logging.WARNING):
        # Sent twice (the exporter blocks: off the event loop the receiver runs on).
        results = [await asyncio.to_thread(exporter.export, spans) for _ in range(2)]
    exporter.shutdown()
    # The exporter calls each export a success, and says nothing of what was refused.
    assert results == [SpanExportResult.SUCCESS] * 2
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]
    assert metric_points(metric_reader, "lockgate.events.dropped") == {
        (("reason", "refused"), ("service", "otlp")): 2, (("reason", "no_event"), ("service", "otlp")): 2}
    # One line for the key, not one per export: the second minute's line carries the count since.
    lines = [r.getMessage() for r in caplog.records if r.name == "lockgate.otlp"]
    assert len(lines) == 1, lines
    assert "apikey:" in lines[0] and "acme/shop" in lines[0] and keys.app_key not in lines[0]
    assert "partial_success" in lines[0] and "once every 60 s per key" in lines[0]
    assert "1 span(s) refused and 1 model call(s) stored with no inference event, in 1 export(s)" in lines[0]
    assert "outside the accepted window" in lines[0]
    assert receiver.refused.count == 2  # exports answered with a partial success


async def test_a_refused_spans_name_is_logged_scrubbed_and_cut(
        stack: Any, keys: Bootstrap, caplog: pytest.LogCaptureFixture) -> None:
    # Found by a probe (p10): the log line quoted a refused span's name as sent, a secret in it and at any length
    # (one 2 MB name was one 2 MB line, a key's each minute). The stored span's name is scrubbed; the line is too.
    secret = "sk-proj-Zx9SECRETSECRETSECRET1234567890"
    name = f"POST /v1/chat Authorization: Bearer {secret} " + "x" * 200_000
    request = test_otlp._json_request("abcdef", name)  # a 3-byte trace id: the span is refused, by its name
    async with aiohttp.ClientSession() as http, http.post(
            stack.endpoints["otlp-http"] + "/v1/traces", json=request,
            headers={"x-api-key": keys.app_key}) as resp:
        assert resp.status == 200 and (await resp.json())["partialSuccess"]["rejectedSpans"] == "1"
    (line,) = [r.getMessage() for r in caplog.records if r.name == "lockgate.otlp"]
    assert secret not in line and "POST /v1/chat Authorization: Bearer [REDACTED]" in line and len(line) < 2_000


async def test_a_model_call_inside_the_stacks_wider_window_is_stored_with_its_inference_event(
        context: ServiceContext, run_services: Any, keys: Bootstrap) -> None:
    # Found by a probe (p56 F2): with a window of 60 days, a model call 40 days old was stored as a span but its
    # inference event was refused (checked against the default 30 days, not the stack's): the call never priced.
    # Now the event is checked against the window its span was.
    context.settings = context.settings.replace(event_time_past_s=60 * 86_400.0)
    svcs = await run_services("sink", "cost", "otlp")
    spans = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "backfill"}))
    provider.add_span_processor(SimpleSpanProcessor(spans))
    call = provider.get_tracer("test-app").start_span("chat gpt-4o-mini", start_time=time.time_ns() - 40 * _DAY_NS,
                                                      attributes={"gen_ai.operation.name": "chat",
                                                                  "gen_ai.request.model": "gpt-4o-mini",
                                                                  "gen_ai.usage.input_tokens": 5})
    call.end(end_time=time.time_ns() - 40 * _DAY_NS + 10**9)
    provider.shutdown()
    exporter = HttpExporter(endpoint=svcs.endpoints["otlp-http"] + "/v1/traces", headers={"x-api-key": keys.app_key})
    assert await asyncio.to_thread(exporter.export, spans.get_finished_spans()) == SpanExportResult.SUCCESS
    exporter.shutdown()
    await svcs["sink"].handlers.rows.wait_for(1, 30)  # before: never (the event refused, the span stored)
    trace = f"{call.get_span_context().trace_id:032x}"
    assert context.store.rows("SELECT model, input_tokens FROM inference_events WHERE trace_id = {t:String}",
                              {"t": trace}) == [{"model": "gpt-4o-mini", "input_tokens": 5}]
    assert svcs["otlp"].receiver.refused.count == 0
