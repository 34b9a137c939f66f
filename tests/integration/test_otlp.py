"""The OTLP receiver as OpenTelemetry users send to it: the standard Python exporters (gRPC and HTTP)
with an API key, against a real nats-server, the sink and the cost service on chDB."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import msgspec
import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import SpanBatch
from lockgate.server.apikeys import Bootstrap, KeyStore, bootstrap
from lockgate.server.offloop import OffLoop
from lockgate.services.otlp.bodies import BodySlots
from lockgate.services.query.traces import trace
from lockgate.store import Store
from tests.helpers import eventually, rss_growth_mib

pytestmark = pytest.mark.timeout(90)

SPANS = 40  # per export test: one of them a model call
_spans: Codec[SpanBatch] = Codec(SpanBatch)


@pytest.fixture
def keys(settings: Settings) -> Bootstrap:
    """An app key of tenant acme (app shop) in the receiver's home."""
    return bootstrap(settings.home, tenant="acme", app="shop")


@pytest.fixture
async def stack(run_services: Callable[..., Any]) -> Any:
    """Sink, cost and the OTLP receiver, on ports they pick."""
    return await run_services("sink", "cost", "otlp")


def _emit(exporter: SpanExporter, service: str, n: int = SPANS, *, tenant: str | None = None) -> None:
    """n spans through a TracerProvider + BatchSpanProcessor, the last a GenAI chat call; blocks."""
    attrs = {"service.name": service} | ({"lockgate.tenant": tenant} if tenant else {})
    provider = TracerProvider(resource=Resource.create(attrs))
    provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=16))
    tracer = provider.get_tracer("test-app")
    with tracer.start_as_current_span("handle request") as root:
        root.set_attribute("http.route", "/ask")
        for i in range(n - 2):
            tracer.start_span(f"step {i}").end()
        with tracer.start_as_current_span("chat gpt-4o-mini") as call:
            call.set_attributes({
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
                "gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 300,
                "gen_ai.response.finish_reasons": ("stop",),
            })
            call.set_status(Status(StatusCode.OK))
    provider.force_flush()
    provider.shutdown()


def _count(store: Store, table: str, where: str = "1") -> int:
    return int(store.scalar(f"SELECT count() FROM {table} WHERE {where}"))


async def _stored_with_its_event(stack: Any, store: Store, bus: Bus, service: str) -> str:
    """Once `service`'s one span and its inference event are stored: what the telemetry stream holds (its messages'
    bytes, as text), where a secret must not be either."""
    sink = stack["sink"].handlers
    await eventually(lambda: _count(store, "otel_traces", f"ServiceName = '{service}'") == 1, [sink.spans],
                     what="the span stored")
    await eventually(lambda: _count(store, "inference_events") == 1, [sink.events], what="its event stored")
    stream = bus.subjects.streams["telemetry"].name
    info = await bus.js.stream_info(stream)
    return repr([(await bus.js.get_msg(stream, seq)).data for seq in range(1, info.state.last_seq + 1)])


async def _check_stored(stack: Any, store: Store, service: str) -> None:
    sink = stack["sink"].handlers
    where = f"ServiceName = '{service}'"
    await eventually(lambda: _count(store, "otel_traces", where) >= SPANS, [sink.spans], what="spans stored")
    await eventually(lambda: _count(store, "cost_ledger") >= 1, [sink.progress("cost_ledger")], what="cost")
    # the cost is the cost service's row; the event is the sink's own insert, sized across fetches
    await eventually(lambda: _count(store, "inference_events") >= 1, [sink.events], what="the inference event")
    assert _count(store, "otel_traces", where) == SPANS
    assert _count(store, "otel_traces", f"{where} AND ResourceAttributes['lockgate.tenant'] = 'acme'") == SPANS
    call = store.rows(f"SELECT TraceId, SpanId, SpanAttributes FROM otel_traces WHERE {where} "
                      "AND SpanName = 'chat gpt-4o-mini'")[0]
    assert call["SpanAttributes"]["gen_ai.usage.input_tokens"] == "1200"
    assert call["SpanAttributes"]["gen_ai.response.finish_reasons"] == '["stop"]'
    event = store.rows("SELECT * FROM inference_events")[0]
    # the key's app (acme/shop), whatever the service's name
    assert (event["tenant"], event["app"], event["model"], event["provider"]) == ("acme", "shop", "gpt-4o-mini",
                                                                                  "openai")
    assert (event["input_tokens"], event["output_tokens"], event["finish_reason"]) == (1200, 300, "stop")
    assert (event["trace_id"], event["span_id"]) == (call["TraceId"], call["SpanId"])
    assert event["latency_ms"] > 0
    # the shipped price book: gpt-4o-mini at $0.15 in and $0.60 out per million tokens
    cost = store.scalar("SELECT cost_usd FROM cost_ledger")
    assert cost == pytest.approx((1200 * 0.15 + 300 * 0.60) / 1e6)


async def test_the_grpc_exporter_stores_every_span_and_a_genai_span_becomes_a_priced_event(
        stack: Any, store: Store, keys: Bootstrap) -> None:
    exporter = GrpcExporter(endpoint=stack.endpoints["otlp-grpc"], insecure=True,
                            headers={"authorization": f"Bearer {keys.app_key}"})
    await asyncio.to_thread(_emit, exporter, "shop-grpc")
    await _check_stored(stack, store, "shop-grpc")


async def test_the_http_exporter_stores_every_span_and_a_genai_span_becomes_a_priced_event(
        stack: Any, store: Store, keys: Bootstrap) -> None:
    exporter = HttpExporter(endpoint=stack.endpoints["otlp-http"] + "/v1/traces", headers={"x-api-key": keys.app_key},
                            compression=Compression.Gzip)
    await asyncio.to_thread(_emit, exporter, "shop-http")
    await _check_stored(stack, store, "shop-http")


async def test_a_span_reporting_prompt_cache_writes_is_priced_at_the_write_rate(
        stack: Any, store: Store, keys: Bootstrap) -> None:
    # Left by the p38 F3 fix: the receiver mapped the cache reads a span reports, not its writes
    # (`gen_ai.usage.cache_creation.input_tokens`), so an Anthropic call writing a 100,000-token prefix was booked
    # as plain input: 0.303150 USD where Anthropic bills 0.378150 (the writes at 1.25x).
    exporter = HttpExporter(endpoint=stack.endpoints["otlp-http"] + "/v1/traces", headers={"x-api-key": keys.app_key})
    provider = TracerProvider(resource=Resource.create({"service.name": "shop-claude"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test-app").start_as_current_span("chat claude-sonnet-4") as call:
        call.set_attributes({
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
            "gen_ai.request.model": "claude-sonnet-4", "gen_ai.usage.input_tokens": 100_050,
            "gen_ai.usage.cache_creation.input_tokens": 100_000, "gen_ai.usage.output_tokens": 200})
    await asyncio.to_thread(provider.shutdown)
    sink = stack["sink"].handlers
    await eventually(lambda: _count(store, "cost_ledger") >= 1, [sink.progress("cost_ledger")], what="cost")
    await eventually(lambda: _count(store, "inference_events") >= 1, [sink.events], what="the inference event")
    event = store.rows("SELECT input_tokens, cache_write_tokens, output_tokens FROM inference_events")[0]
    assert event == {"input_tokens": 100_050, "cache_write_tokens": 100_000, "output_tokens": 200}
    # the shipped price book: claude-sonnet-4 at $3.00 in, $3.75 per 5-minute cache write, $15.00 out per million
    assert store.scalar("SELECT cost_usd FROM cost_ledger") == pytest.approx(
        (50 * 3.00 + 100_000 * 3.75 + 200 * 15.00) / 1e6)


def _json_request(trace_id: str, name: str, **resource: str) -> dict[str, Any]:
    attrs = [{"key": k, "value": {"stringValue": v}} for k, v in resource.items()]
    start = time.time_ns() - 60_000_000_000  # recent: an inference event's time must be near now
    span = {"traceId": trace_id, "spanId": "00f067aa0ba902b7", "name": name, "kind": 3,
            "startTimeUnixNano": str(start), "endTimeUnixNano": str(start + 250_000_000),
            "attributes": [{"key": "llm.model_name", "value": {"stringValue": "gpt-4o"}},
                           {"key": "openinference.span.kind", "value": {"stringValue": "LLM"}},
                           {"key": "llm.token_count.prompt", "value": {"intValue": "10"}}]}
    return {"resourceSpans": [{"resource": {"attributes": attrs}, "scopeSpans": [{"spans": [span]}]}]}


async def test_otlp_json_is_stored_with_hex_ids_and_refusals_store_nothing(
        stack: Any, store: Store, keys: Bootstrap, settings: Settings) -> None:
    url = stack.endpoints["otlp-http"] + "/v1/traces"
    good = "5b8efff798038103d269b633813fc60c"
    other_key, _ = KeyStore(settings.home).create("globex", "shop")
    async with aiohttp.ClientSession() as http:
        async def post(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any, Any]:
            async with http.post(url, json=body, headers=headers) as r:
                return r.status, await r.json(), r.headers

        request = _json_request("0af7651916cd43dd8448eb211c80319c", "refused")
        assert (await post(request, {}))[0] == 401
        status, body, _ = await post(request, {"Authorization": "Bearer lg-not-a-key"})
        assert status == 401 and "invalid API key" in body["message"]
        # a key of tenant globex naming tenant acme, and the acme key naming globex: both refused whole
        status, body, _ = await post(_json_request(good, "refused", **{"lockgate.tenant": "acme"}),
                                     {"x-api-key": other_key})
        assert status == 403 and "tenant 'acme'" in body["message"]
        assert (await post(_json_request(good, "refused", **{"lockgate.tenant": "globex"}),
                           {"x-api-key": keys.app_key}))[0] == 403
        # a span naming another app than the key's is refused too (its model calls would be that app's spend)
        status, body, _ = await post(_json_request(good, "refused", **{"lockgate.app": "billing"}),
                                     {"x-api-key": keys.app_key})
        assert status == 403 and "is for app 'billing'" in body["message"]
        status, body, _ = await post(_json_request(good, "accepted", **{"service.name": "bot"}),
                                     {"x-api-key": keys.app_key})
        assert status == 200 and body == {}
    sink = stack["sink"].handlers
    await eventually(lambda: _count(store, "inference_events") == 1, [sink.events], what="event stored")
    await sink.spans.wait_for(1)
    row = store.rows("SELECT TraceId, SpanId, SpanName, SpanKind, Duration FROM otel_traces")
    assert row == [{"TraceId": good, "SpanId": "00f067aa0ba902b7", "SpanName": "accepted", "SpanKind": "Client",
                    "Duration": 250_000_000}]
    event = store.rows("SELECT app, model, input_tokens, operation FROM inference_events")[0]
    assert event == {"app": "shop", "model": "gpt-4o", "input_tokens": 10, "operation": "chat"}  # the key's app


async def test_a_body_that_is_not_the_gzip_it_claims_is_a_400_saying_so(stack: Any, keys: Bootstrap) -> None:
    url = stack.endpoints["otlp-http"] + "/v1/traces"
    async with aiohttp.ClientSession() as http:
        for ctype in ("application/json", "application/x-protobuf"):
            headers = {"x-api-key": keys.app_key, "Content-Type": ctype, "Content-Encoding": "gzip"}
            async with http.post(url, data=b"not gzip at all", headers=headers) as r:
                assert (r.status, r.headers.get("Connection")) == (400, "close"), ctype
                body = await r.read()
            assert b"the request body is not valid gzip data (Content-Encoding: gzip)" in body, body
            async with http.post(url, data=gzip.compress(b"{}"), headers=headers | {"Content-Type": "application/json"}) as r:
                assert r.status == 200  # the same server still answers a good one


async def test_a_body_over_the_size_limit_is_a_413_with_an_otlp_status(stack: Any, keys: Bootstrap) -> None:
    url = stack.endpoints["otlp-http"] + "/v1/traces"
    headers = {"x-api-key": keys.app_key, "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http, http.post(url, data=b" " * (17 * 2**20), headers=headers) as r:
        assert r.status == 413
        body = await r.json()
    assert body["code"] == 3 and body["message"].startswith("the request body is too large: Maximum")


async def test_grpc_refuses_a_missing_or_wrong_key_and_another_tenants_span(stack: Any, keys: Bootstrap) -> None:
    request = trace_service_pb2.ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.add(key="lockgate.tenant").value.string_value = "globex"
    rs.scope_spans.add().spans.add(name="x", trace_id=b"\x01" * 16, span_id=b"\x02" * 8,
                                   start_time_unix_nano=time.time_ns())
    async with grpc.aio.insecure_channel(stack.endpoints["otlp-grpc"]) as channel:
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer lg-wrong"),)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Export(request, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Export(request, metadata=(("authorization", f"Bearer {keys.app_key}"),))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # a span with an invalid id is refused alone, as OTLP's partial success
        rs.resource.attributes[0].value.string_value = "acme"
        rs.scope_spans[0].spans.add(name="bad", trace_id=b"\x00" * 16, span_id=b"\x03" * 8,
                                    start_time_unix_nano=time.time_ns())
        reply = await stub.Export(request, metadata=(("x-api-key", keys.app_key),))
        assert reply.partial_success.rejected_spans == 1
        assert "trace_id" in reply.partial_success.error_message


async def test_a_bus_that_does_not_acknowledge_gets_otlps_retryable_answers(
        run_services: Callable[..., Any], bus: Bus, keys: Bootstrap) -> None:
    otlp = (await run_services("otlp"))["otlp"]
    await bus.js.delete_stream(bus.subjects.streams["telemetry"].name)  # nothing acknowledges spans now
    request = _json_request("0af7651916cd43dd8448eb211c80319c", "unacknowledged")
    async with aiohttp.ClientSession() as http:
        async with http.post(otlp.endpoints["otlp-http"] + "/v1/traces", json=request,
                             headers={"x-api-key": keys.app_key}) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "1"
            assert "retry" in (await r.json())["message"]
    binary = trace_service_pb2.ExportTraceServiceRequest()
    binary.resource_spans.add().scope_spans.add().spans.add(name="x", trace_id=b"\x01" * 16, span_id=b"\x02" * 8,
                                                            start_time_unix_nano=time.time_ns())
    async with grpc.aio.insecure_channel(otlp.endpoints["otlp-grpc"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await trace_service_pb2_grpc.TraceServiceStub(channel).Export(
                binary, metadata=(("x-api-key", keys.app_key),))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    trailers = dict(err.value.trailing_metadata())
    info = error_details_pb2.RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
    assert info.retry_delay.seconds == 1
    details = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert details.details[0].Is(error_details_pb2.RetryInfo.DESCRIPTOR)
    # the bus is back: the same request is accepted
    await bus.ensure_topology()
    async with aiohttp.ClientSession() as http:
        async with http.post(otlp.endpoints["otlp-http"] + "/v1/traces", json=request,
                             headers={"x-api-key": keys.app_key}) as r:
            assert r.status == 200


async def test_tls_when_configured(context: Any, run_services: Callable[..., Any], keys: Bootstrap,
                                   tmp_path: Any) -> None:
    import ssl

    from tests.integration.test_grpc import _self_signed

    cert, key = _self_signed(tmp_path)
    context.settings = context.settings.replace(grpc_tls_cert=str(cert), grpc_tls_key=str(key))
    otlp = (await run_services("otlp"))["otlp"]
    assert otlp.endpoints["otlp-http"].startswith("https://")
    request = trace_service_pb2.ExportTraceServiceRequest()
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    async with grpc.aio.secure_channel(otlp.endpoints["otlp-grpc"], creds) as channel:
        reply = await trace_service_pb2_grpc.TraceServiceStub(channel).Export(
            request, metadata=(("x-api-key", keys.app_key),), timeout=10)
    assert not reply.HasField("partial_success")
    trusted = ssl.create_default_context(cafile=str(cert))
    async with aiohttp.ClientSession() as http:
        async with http.post(otlp.endpoints["otlp-http"] + "/v1/traces", data=request.SerializeToString(),
                             headers={"x-api-key": keys.app_key, "Content-Type": "application/x-protobuf"},
                             ssl=trusted) as r:
            assert r.status == 200
        with pytest.raises(aiohttp.ClientError):  # a plaintext client gets no answer
            await http.post(otlp.endpoints["otlp-http"].replace("https:", "http:") + "/v1/traces", data=b"")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_the_standard_exporter_retries_until_the_bus_is_back_and_nothing_is_lost(
        run_services: Callable[..., Any], bus: Bus, keys: Bootstrap, protocol: str) -> None:
    otlp = (await run_services("otlp"))["otlp"]
    stream = bus.subjects.streams["telemetry"].name
    await bus.js.delete_stream(stream)  # JetStream acknowledges no span until the stream is back
    if protocol == "grpc":
        exporter: SpanExporter = GrpcExporter(endpoint=otlp.endpoints["otlp-grpc"], insecure=True,
                                              headers={"x-api-key": keys.app_key}, timeout=60)
    else:
        exporter = HttpExporter(endpoint=otlp.endpoints["otlp-http"] + "/v1/traces",
                                headers={"x-api-key": keys.app_key}, timeout=60)
    sending = asyncio.create_task(asyncio.to_thread(_emit, exporter, f"retry-{protocol}", 10))
    await otlp.receiver.retry_asked.wait_for(1)  # answered "unavailable, retry in 1 s"
    await bus.ensure_topology()
    await sending  # the exporter waited as told and sent the same spans again
    info = await bus.js.stream_info(stream)
    sub = await bus.js.pull_subscribe(bus.subjects.spans, stream=stream)
    batches = [_spans.decode(m.data) for m in await sub.fetch(info.state.messages, timeout=5)]
    await sub.unsubscribe()
    assert sorted(s.name for b in batches for s in b.spans) == sorted(
        ["handle request", "chat gpt-4o-mini", *(f"step {i}" for i in range(8))])


async def test_a_span_too_large_for_the_bus_is_refused_alone_not_retried_for_ever(
        stack: Any, store: Store, keys: Bootstrap) -> None:
    request = trace_service_pb2.ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    for i, prompt in enumerate(("x" * 950_000, "short")):
        span = spans.add(name=f"chat {i}", trace_id=b"\x01" * 16, span_id=bytes([0] * 7 + [i + 1]),
                         start_time_unix_nano=time.time_ns())
        span.attributes.add(key="gen_ai.operation.name").value.string_value = "chat"
        span.attributes.add(key="gen_ai.input.messages").value.string_value = prompt
    async with grpc.aio.insecure_channel(stack.endpoints["otlp-grpc"]) as channel:
        reply = await trace_service_pb2_grpc.TraceServiceStub(channel).Export(
            request, metadata=(("x-api-key", keys.app_key),))
    assert reply.partial_success.rejected_spans == 1
    assert "larger than 900000 bytes" in reply.partial_success.error_message
    sink = stack["sink"].handlers
    await eventually(lambda: _count(store, "inference_events") == 1, [sink.events], what="the small call stored")
    await sink.spans.wait_for(1)
    assert store.rows("SELECT SpanName FROM otel_traces") == [{"SpanName": "chat 1"}]


async def test_a_port_in_use_is_a_clear_error(context: Any) -> None:
    import socket

    from lockgate.errors import ConfigError
    from lockgate.services.otlp.app import OtlpService

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        context.settings = context.settings.replace(otlp_http_port=taken.getsockname()[1])
        otlp = OtlpService(context)
        try:
            with pytest.raises(ConfigError, match="--otlp-http-port"):
                await otlp.start()
        finally:
            await otlp.stop()


async def test_secrets_in_exported_spans_never_reach_the_bus_or_otel_traces(
        stack: Any, store: Store, keys: Bootstrap, bus: Bus) -> None:
    # What instrumentations record as it was: request headers, connection strings, exception texts,
    # prompts. Every place a span carries text: its name, status, attributes, resource, events, links.
    bearer, api_key, password = "Zm9vYmFyYmF6cXV4cXV1eDEyMzQ1", "sk-proj-" + "A1b2C3d4" * 4, "hunter2hunter2"
    secrets = (bearer, api_key, password)
    exporter = GrpcExporter(endpoint=stack.endpoints["otlp-grpc"], insecure=True,
                            headers={"authorization": f"Bearer {keys.app_key}"})

    def emit() -> None:
        provider = TracerProvider(resource=Resource.create({"service.name": "leaky", "api_key": api_key}))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        tracer = provider.get_tracer("test-app")
        with tracer.start_as_current_span("GET /v1?key=" + api_key) as span:
            span.set_attributes({"http.request.header.authorization": f"Bearer {bearer}",
                                 "db.connection_string": f"postgres://app:{password}@db/x",
                                 "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini",
                                 "gen_ai.prompt": f"my key is {api_key}"})
            span.add_event("exception", {"exception.message": f"401 for token {bearer}"})
            span.add_link(span.get_span_context(), {"x-api-key": api_key})
            span.set_status(Status(StatusCode.ERROR, f"upstream said: password={password}"))
        provider.force_flush()
        provider.shutdown()

    await asyncio.to_thread(emit)
    on_the_bus = await _stored_with_its_event(stack, store, bus, "leaky")
    stored = repr(store.rows("SELECT * FROM otel_traces WHERE ServiceName = 'leaky'"))
    for where, blob in (("otel_traces", stored), ("the telemetry stream", on_the_bus)):
        assert not [s for s in secrets if s in blob], f"a secret reached {where}: {blob[:2000]}"
    row = store.rows("SELECT SpanName, SpanAttributes, ResourceAttributes, StatusMessage FROM otel_traces "
                     "WHERE ServiceName = 'leaky'")[0]
    assert row["SpanAttributes"]["http.request.header.authorization"] == "[REDACTED]"
    assert row["SpanAttributes"]["db.connection_string"] == "postgres://app:[REDACTED]@db/x"
    assert row["ResourceAttributes"]["api_key"] == "[REDACTED]"
    assert row["StatusMessage"] == "upstream said: password=[REDACTED]"
    assert row["SpanName"] == "GET /v1?key=[REDACTED]"


async def test_secrets_in_structured_span_values_and_common_span_text_never_reach_the_store(
        stack: Any, store: Store, keys: Bootstrap, bus: Bus) -> None:
    # Before: gen_ai.input.messages sent as the GenAI conventions shape it (an array of maps) was encoded to JSON and
    # then scrubbed as JSON text, where a newline before a key is `\n`: otel_traces and inference_events.prompt kept
    # it, an array attribute alike, and a credential-named key inside a map was not masked. A SQL `PASSWORD '...'`, a
    # Redis URL's password (empty user) and `Authorization: <token>` in a status message were kept too.
    canaries = ("OTLPNLMSGCANARY", "OTLPNLARRCANARY", "OTLPPROMPTTOKENCANARY", "OTLPKVTOKENCANARY",
                "OTLPKVCOOKIECANARY", "OTLPSQLPWCANARY", "OTLPREDISPWCANARY", "OTLPSTATUSRAWCANARY")
    messages = [{"role": "user", "parts": [{"type": "text", "content": "my key:\nsk-proj-OTLPNLMSGCANARY000000000"}]},
                {"role": "assistant", "parts": [{"type": "tool_call", "name": "login",
                                                 "arguments": {"user": "bob", "token": "OTLPPROMPTTOKENCANARY"}}]}]
    exporter = HttpExporter(endpoint=stack.endpoints["otlp-http"] + "/v1/traces", headers={"x-api-key": keys.app_key})

    def emit() -> None:
        provider = TracerProvider(resource=Resource.create({"service.name": "structured"}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with provider.get_tracer("test-app").start_as_current_span("chat gpt-4o-mini") as span:
            span.set_attributes({
                "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini", "gen_ai.provider.name": "openai",
                "gen_ai.input.messages": messages,  # type: ignore[dict-item]  # the SDK and exporter take maps
                "tags": ["a\nghp_OTLPNLARRCANARY00000000000000000000"],
                "kv": {"token": "OTLPKVTOKENCANARY", "cookie": "sid=OTLPKVCOOKIECANARY", "n": 1},  # type: ignore[dict-item]
                "db.statement": "ALTER USER bob WITH PASSWORD 'OTLPSQLPWCANARY1'",
                "conn": "redis://:OTLPREDISPWCANARY@cache:6379",
            })
            span.set_status(Status(StatusCode.ERROR, "failed: Authorization: OTLPSTATUSRAWCANARY12345"))
        provider.shutdown()

    await asyncio.to_thread(emit)
    stored = await _stored_with_its_event(stack, store, bus, "structured")
    stored += repr(store.rows("SELECT * FROM otel_traces")) + repr(store.rows("SELECT * FROM inference_events"))
    assert not [c for c in canaries if c in stored], stored
    row = store.rows("SELECT SpanAttributes, StatusMessage FROM otel_traces WHERE ServiceName = 'structured'")[0]
    attrs = row["SpanAttributes"]
    assert json.loads(attrs["gen_ai.input.messages"])[0]["parts"][0]["content"] == "my key:\n[REDACTED]"
    assert json.loads(attrs["tags"]) == ["a\n[REDACTED]"]
    assert json.loads(attrs["kv"]) == {"token": "[REDACTED]", "cookie": "[REDACTED]", "n": 1}
    assert attrs["db.statement"] == "ALTER USER bob WITH PASSWORD '[REDACTED]'"
    assert attrs["conn"] == "redis://:[REDACTED]@cache:6379"
    assert row["StatusMessage"] == "failed: Authorization: [REDACTED]"
    event = store.rows("SELECT prompt, error_type FROM inference_events")[0]
    prompt = json.loads(event["prompt"])
    assert prompt[1]["parts"][0]["arguments"] == {"user": "bob", "token": "[REDACTED]"}
    assert event["error_type"] == "failed: Authorization: [REDACTED]"


async def test_a_secret_in_a_bytes_value_never_reaches_otel_traces(stack: Any, store: Store, keys: Bootstrap) -> None:
    # Probe p35: a `bytes_value` attribute holding a key, or an array of bytes holding `Bearer <JWT>`, was stored as its
    # base64, which lockgate wrote after the scrub had looked at the value: no later scrub reads base64.
    key, jwt = "sk-proj-OTLPBYTESCANARY0000000", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJieXRlcyJ9.OTLPJWTBYTESCANARY00"
    request = trace_service_pb2.ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add(
        name="blobs", trace_id=b"\x03" * 16, span_id=b"\x03" * 8, start_time_unix_nano=time.time_ns(),
        end_time_unix_nano=time.time_ns() + 1000)
    span.attributes.add(key="blob").value.bytes_value = f"key {key}".encode()
    span.attributes.add(key="blobs").value.array_value.values.add().bytes_value = f"Bearer {jwt}".encode()
    span.attributes.add(key="raw").value.bytes_value = b"\x01\x02"
    async with grpc.aio.insecure_channel(stack.endpoints["otlp-grpc"]) as channel:
        await trace_service_pb2_grpc.TraceServiceStub(channel).Export(request, metadata=(("x-api-key", keys.app_key),))
    await stack["sink"].handlers.spans.wait_for(1)
    attrs = store.rows("SELECT SpanAttributes FROM otel_traces WHERE SpanName = 'blobs'")[0]["SpanAttributes"]
    assert base64.b64decode(attrs["blob"]) == b"key [REDACTED]"
    assert [base64.b64decode(b) for b in json.loads(attrs["blobs"])] == [b"Bearer [REDACTED]"]
    assert base64.b64decode(attrs["raw"]) == b"\x01\x02"  # bytes that hold no text are kept as they are


@pytest.mark.parametrize("other", [("globex", "shop"), ("acme", "web")])
async def test_another_tenant_or_app_sending_a_spans_ids_first_cannot_erase_it(
        stack: Any, store: Store, keys: Bootstrap, settings: Settings, other: tuple[str, str]) -> None:
    # Span ids travel in traceparent headers, so whoever a request reaches knows its caller's. Ids were
    # not namespaced by tenant: the first tenant to send them had its span and event stored, and the
    # other's were dropped as duplicates (by JetStream, then by the sink) while it was answered 200. Spans, stored
    # once per key since, were keyed by tenant alone: another app of the tenant sending them first had this app's
    # span dropped and its own shown in its place (probe s5).
    other_key, _ = KeyStore(settings.home).create(*other)
    request = trace_service_pb2.ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add(
        name="chat", trace_id=bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"), span_id=b"\x00\xf0g\xaa\x0b\xa9\x02\xb7",
        start_time_unix_nano=time.time_ns())
    span.attributes.add(key="gen_ai.operation.name").value.string_value = "chat"
    span.attributes.add(key="gen_ai.request.model").value.string_value = "gpt-4o-mini"
    span.attributes.add(key="gen_ai.usage.input_tokens").value.int_value = 10
    async with grpc.aio.insecure_channel(stack.endpoints["otlp-grpc"]) as channel:
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        for key in (other_key, keys.app_key):  # the other tenant first
            reply = await stub.Export(request, metadata=(("x-api-key", key),))
            assert not reply.HasField("partial_success")
    sink = stack["sink"].handlers
    await eventually(lambda: _count(store, "inference_events") == 2, [sink.events], what="both events")
    await eventually(lambda: _count(store, "otel_traces", "SpanName = 'chat'") == 2, [sink.spans], what="both spans")
    events = store.rows("SELECT tenant, app FROM inference_events")
    assert sorted((r["tenant"], r["app"]) for r in events) == sorted([("acme", "shop"), other])
    senders = store.rows("SELECT SenderTenant AS t, SenderApp AS a FROM otel_traces WHERE SpanName = 'chat'")
    assert sorted((r["t"], r["a"]) for r in senders) == sorted([("acme", "shop"), other])


async def test_grpc_answers_a_request_that_does_not_decode_with_invalid_argument(
        stack: Any, keys: Bootstrap) -> None:
    # grpc.aio decoded it before the servicer ran, and answered UNKNOWN "Unexpected <class DecodeError>".
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.resource_spans.add().scope_spans.add().spans.add(name="ZZZZ", trace_id=b"\x01" * 16, span_id=b"\x02" * 8,
                                                             start_time_unix_nano=time.time_ns())
    bad_utf8 = request.SerializeToString().replace(b"ZZZZ", b"\xff\xfe\xfa\xfb")
    async with grpc.aio.insecure_channel(stack.endpoints["otlp-grpc"]) as channel:
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                     request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for body in (bad_utf8, b"\xff\xff\xff\xff"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await export(body, metadata=(("x-api-key", keys.app_key),))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            assert err.value.details().startswith("not a valid Export request: Error parsing message")
        assert await export(request.SerializeToString(), metadata=(("x-api-key", keys.app_key),)) == b""


async def test_grpc_checks_the_key_before_it_parses_the_export(stack: Any, settings: Settings, keys: Bootstrap) -> None:
    # Found by a probe: grpc.aio parsed the request before the servicer checked its key, so anyone able to connect
    # had a 15 MB export parsed on the event loop the embedded router shares (0.17 s each) for an UNAUTHENTICATED.
    # Bytes that are no protobuf show it: parsed, they are INVALID_ARGUMENT; refused first, UNAUTHENTICATED.
    viewer_key, _ = KeyStore(settings.home).create("acme", "shop", role="viewer")
    garbage = b"\xff\xff\xff\xff" * (4 * 2**20)  # 16 MiB, the largest request the receiver takes
    async with grpc.aio.insecure_channel(stack.endpoints["otlp-grpc"],
                                         options=[("grpc.max_send_message_length", 32 * 2**20)]) as channel:
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                     request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED),
                               ((("authorization", "Bearer lg-wrong"),), grpc.StatusCode.UNAUTHENTICATED),
                               ((("x-api-key", viewer_key),), grpc.StatusCode.PERMISSION_DENIED)):
            for body in (garbage[:4], garbage):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await export(body, metadata=metadata)
                assert err.value.code() == code, (metadata, len(body), err.value)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # the same bytes with a sender's key: parsed, and refused
            await export(garbage[:4], metadata=(("x-api-key", keys.app_key),))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value


async def test_a_resource_naming_another_tenant_refuses_the_export_whatever_its_span_says(
        stack: Any, store: Store, keys: Bootstrap, caplog: pytest.LogCaptureFixture) -> None:
    # The span's claim was read first (`or`): a span saying the key's tenant hid a resource naming
    # another, and the export was stored as the key's tenant's.
    made = []
    for tenant, name in (("globex", "refused"), ("acme", "accepted")):
        spans = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource.create({"service.name": "bot", "lockgate.tenant": tenant}))
        provider.add_span_processor(SimpleSpanProcessor(spans))
        provider.get_tracer("test-app").start_span(name, attributes={"lockgate.tenant": "acme"}).end()
        made += spans.get_finished_spans()
    refused, accepted = made
    exporter = HttpExporter(endpoint=stack.endpoints["otlp-http"] + "/v1/traces", headers={"x-api-key": keys.app_key})
    assert await asyncio.to_thread(exporter.export, [refused]) == SpanExportResult.FAILURE
    assert await asyncio.to_thread(exporter.export, [accepted]) == SpanExportResult.SUCCESS
    assert "code: 403" in caplog.text, caplog.text  # what the exporter says of the refusal
    await stack["sink"].handlers.spans.wait_for(1)  # the accepted export, published after the refused one
    assert [r["SpanName"] for r in store.rows("SELECT SpanName FROM otel_traces")] == ["accepted"]


@pytest.mark.parametrize(("body", "said"), [
    ({"resourceSpans": ["x"]}, "Expected `object`, got `str` - at `$.resourceSpans[0]`"),
    ({"resourceSpans": [{"scopeSpans": {"spans": []}}]}, "Expected `array | null`, got `object` - at "
                                                        "`$.resourceSpans[0].scopeSpans`"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": [{"links": [7]}]}]}]},
     "Expected `object`, got `int` - at `$.resourceSpans[0].scopeSpans[0].spans[0].links[0]`"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": 12}]}]}]},
     "Expected `str | null`, got `int` - at `$.resourceSpans[0].scopeSpans[0].spans[0].traceId`"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": [{"links": [{"spanId": "zz"}]}]}]}]},
     "spanId 'zz' is not hex - at `$.resourceSpans[0].scopeSpans[0].spans[0].links[0].spanId`"),
    ([1], "an OTLP/JSON request is an object with `resourceSpans` - at `$`"),
])
async def test_a_malformed_otlp_json_body_is_a_400_saying_what_and_where(
        stack: Any, keys: Bootstrap, body: Any, said: str) -> None:
    # These were answered in Python's words: "'str' object has no attribute 'get'".
    async with aiohttp.ClientSession() as http, http.post(
            stack.endpoints["otlp-http"] + "/v1/traces", json=body, headers={"x-api-key": keys.app_key}) as r:
        assert r.status == 400
        assert said in (await r.json())["message"]


async def test_a_span_with_a_bad_link_or_no_sensible_end_is_refused_alone(
        stack: Any, store: Store, keys: Bootstrap) -> None:
    # Link ids went to otel_traces unchecked, and a span ending at 2**64-1 became an event 584 years long.
    request = trace_service_pb2.ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    now = time.time_ns()
    chat = [KeyValue(key="gen_ai.operation.name", value=AnyValue(string_value="chat")),
            KeyValue(key="gen_ai.request.model", value=AnyValue(string_value="gpt-4o-mini"))]
    for n, (name, end, link) in enumerate([("bad link", now + 1, (b"\x00" * 16, b"\x01" * 8)),
                                           ("short link", now + 1, (b"\x01" * 16, b"\x01" * 4)),
                                           ("endless", 2**64 - 1, None), ("kept", now + 10**9, (b"\x01" * 16, b"\x02" * 8))]):
        span = spans.add(name=name, trace_id=b"\x01" * 16, span_id=bytes([n + 1]) * 8, start_time_unix_nano=now,
                         end_time_unix_nano=end, attributes=chat)
        if link:
            span.links.add(trace_id=link[0], span_id=link[1])
    async with grpc.aio.insecure_channel(stack.endpoints["otlp-grpc"]) as channel:
        reply = await trace_service_pb2_grpc.TraceServiceStub(channel).Export(
            request, metadata=(("x-api-key", keys.app_key),))
    assert reply.partial_success.rejected_spans == 3
    message = reply.partial_success.error_message
    assert "link 0 trace_id" in message and "link 0 span_id" in message and "after the accepted window" in message
    sink = stack["sink"].handlers
    await eventually(lambda: _count(store, "inference_events") == 1, [sink.events], what="event stored")
    await sink.spans.wait_for(1)
    assert store.rows("SELECT SpanName, Links.TraceId AS links FROM otel_traces") == [
        {"SpanName": "kept", "links": ["01" * 16]}]
    assert store.scalar("SELECT latency_ms FROM inference_events") == 1000


async def test_a_scoped_keys_model_call_must_name_a_deployment_of_its_scope(
        stack: Any, store: Store, settings: Settings) -> None:
    # A model call naming no deployment is watched by drift as the deployment named like its app: a key scoped
    # to `support` swayed the drift and canary analysis of the deployment named like its app.
    # Before: stored (the scope was checked only on model calls that named a deployment).
    url = stack.endpoints["otlp-http"] + "/v1/traces"
    scoped, _ = KeyStore(settings.home).create("acme", "shop", deployments=["support"])
    async with aiohttp.ClientSession() as http:
        async def post(**resource: str) -> tuple[int, Any]:
            body = _json_request("5b8efff798038103d269b633813fc60c", "call", **resource)
            async with http.post(url, json=body, headers={"x-api-key": scoped}) as r:
                return r.status, await r.json()

        status, body = await post(**{"service.name": "billing"})
        assert status == 403 and "names no deployment (it would count as deployment 'shop'" in body["message"]
        assert scoped not in body["message"]
        status, body = await post(**{"service.name": "billing", "lockgate.deployment": "support"})
        assert status == 200 and body == {}
    sink = stack["sink"].handlers
    await eventually(lambda: _count(store, "inference_events") == 1, [sink.events], what="event stored")
    assert store.rows("SELECT app, deployment FROM inference_events") == [{"app": "shop", "deployment": "support"}]


def _protobuf_post(url: str, key: str, request: trace_service_pb2.ExportTraceServiceRequest) -> Any:
    """POST one OTLP/HTTP protobuf export; (status, parsed answer, headers)."""
    async def post(http: aiohttp.ClientSession) -> tuple[int, Any, Any]:
        async with http.post(url, data=request.SerializeToString(),
                             headers={"x-api-key": key, "Content-Type": "application/x-protobuf"}) as r:
            body = await r.read()
            parsed = (trace_service_pb2.ExportTraceServiceResponse.FromString(body) if r.status == 200
                      else status_pb2.Status.FromString(body))
            return r.status, parsed, r.headers
    return post


async def test_a_span_event_time_the_store_cannot_hold_refuses_that_span_alone(
        stack: Any, store: Store, keys: Bootstrap) -> None:
    # An event at 2**64-1 ns (year 2554) or in 2300 fails a DateTime64(9) column: the sink dead-lettered the
    # whole SpanBatch, so the 5 valid spans sent with it were lost while the exporter was answered 200.
    request = trace_service_pb2.ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "poisoned"
    spans = rs.scope_spans.add().spans
    now = time.time_ns()
    year_2300 = 10_413_792_000 * 10**9
    for n in range(7):
        span = spans.add(name=f"span {n}", trace_id=b"\x07" * 16, span_id=bytes([n + 1]) * 8,
                         start_time_unix_nano=now, end_time_unix_nano=now + 10**6)
        span.events.add(name="retry", time_unix_nano=now + 1000)
        if n == 0:
            span.attributes.extend([KeyValue(key="gen_ai.operation.name", value=AnyValue(string_value="chat")),
                                    KeyValue(key="gen_ai.request.model", value=AnyValue(string_value="gpt-4o-mini"))])
    spans[5].events.add(name="endless", time_unix_nano=2**64 - 1)
    spans[6].events.add(name="far", time_unix_nano=year_2300)
    async with aiohttp.ClientSession() as http:
        status, reply, _ = await _protobuf_post(stack.endpoints["otlp-http"] + "/v1/traces", keys.app_key, request)(http)
    assert status == 200
    assert reply.partial_success.rejected_spans == 2
    message = reply.partial_success.error_message
    assert f"span {'06' * 8} refused: its event 1 ('endless') time 2554-" in message, message
    assert f"span {'07' * 8} refused: its event 1 ('far') time 2300-" in message, message
    assert "outside the accepted window" in message
    sink = stack["sink"].handlers
    await eventually(lambda: _count(store, "otel_traces", "ServiceName = 'poisoned'") == 5, [sink.spans],
                     what="the 5 valid spans stored")
    await eventually(lambda: _count(store, "inference_events") == 1, [sink.events], what="the model call's event")
    assert sorted(r["SpanName"] for r in store.rows("SELECT SpanName FROM otel_traces")) == [
        f"span {n}" for n in range(5)]
    assert sink.dead_letters.count == 0


async def test_service_name_trace_state_and_scope_are_scrubbed_too(stack: Any, store: Store, keys: Bootstrap) -> None:
    # ServiceName, TraceState, ScopeName, ScopeVersion and a link's TraceState kept an API key intact, while
    # the same key in ResourceAttributes['service.name'] was masked.
    secret = "sk-proj-" + "Q9w8E7r6" * 4
    request = trace_service_pb2.ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = secret
    ss = rs.scope_spans.add()
    ss.scope.name, ss.scope.version = f"lib {secret}", f"1.0+{secret}"
    span = ss.spans.add(name="leaky", trace_id=b"\x09" * 16, span_id=b"\x09" * 8, trace_state=f"vendor={secret}",
                        start_time_unix_nano=time.time_ns())
    span.links.add(trace_id=b"\x0a" * 16, span_id=b"\x0a" * 8, trace_state=f"other={secret}")
    async with grpc.aio.insecure_channel(stack.endpoints["otlp-grpc"]) as channel:
        reply = await trace_service_pb2_grpc.TraceServiceStub(channel).Export(
            request, metadata=(("x-api-key", keys.app_key),))
    assert not reply.HasField("partial_success")
    sink = stack["sink"].handlers
    await eventually(lambda: _count(store, "otel_traces", "SpanName = 'leaky'") == 1, [sink.spans],
                     what="the span stored")
    row = store.rows("SELECT * FROM otel_traces WHERE SpanName = 'leaky'")[0]
    assert secret not in repr(row), row
    assert (row["ServiceName"], row["ResourceAttributes"]["service.name"]) == ("[REDACTED]", "[REDACTED]")
    assert (row["TraceState"], row["ScopeName"], row["ScopeVersion"]) == (
        "vendor=[REDACTED]", "lib [REDACTED]", "1.0+[REDACTED]")
    assert row["Links.TraceState"] == ["other=[REDACTED]"]


async def test_an_export_being_decoded_holds_a_slot_and_leaves_the_event_loop_free(
        run_services: Callable[..., Any], keys: Bootstrap, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 15 MB export was parsed, mapped and scrubbed on the event loop, before it took an in-flight slot: the
    # router (same loop, embedded) stalled for seconds, and concurrent exports were not bounded at all.
    import threading

    from lockgate.services.otlp import domain

    otlp = (await run_services("otlp"))["otlp"]
    otlp.receiver.work = OffLoop("otlp-decode", slots=1, busy=otlp.receiver.work.busy)  # the second finds it full
    decoding, release = threading.Event(), threading.Event()
    released: list[bool] = []  # whether the hold ended by the test's release (not by its timeout)
    decode = domain.decode

    def held(request: Any, **kwargs: Any) -> Any:
        if request.resource_spans[0].scope_spans[0].spans[0].name == "held":
            decoding.set()
            # On the event loop (before), this froze the test too, so nothing released it before its timeout.
            released.append(release.wait(timeout=5))
        return decode(request, **kwargs)

    monkeypatch.setattr(domain, "decode", held)

    def one(name: str) -> trace_service_pb2.ExportTraceServiceRequest:
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.resource_spans.add().scope_spans.add().spans.add(
            name=name, trace_id=b"\x0b" * 16, span_id=bytes([len(name)]) * 8, start_time_unix_nano=time.time_ns())
        return request

    url = otlp.endpoints["otlp-http"] + "/v1/traces"
    async with aiohttp.ClientSession() as http:
        first = asyncio.create_task(_protobuf_post(url, keys.app_key, one("held"))(http))
        assert await asyncio.to_thread(decoding.wait, 10)
        try:
            # Answered while the first export is still being decoded: the loop is free, and the slot is taken.
            status, answer, headers = await _protobuf_post(url, "lg-not-a-key", one("other"))(http)
            assert status == 401
            status, answer, headers = await _protobuf_post(url, keys.app_key, one("second"))(http)
            assert (status, headers["Retry-After"]) == (503, "1")
            assert "too many OTLP exports in flight" in answer.message
            assert answer.details[0].Is(error_details_pb2.RetryInfo.DESCRIPTOR)
            assert not first.done()
        finally:
            release.set()
        status, reply, _ = await first
        assert released == [True], "the event loop was blocked while the export was decoded"
        assert status == 200 and not reply.HasField("partial_success")
        status, _, _ = await _protobuf_post(url, keys.app_key, one("second"))(http)  # the slot is free again
        assert status == 200


async def test_bodies_being_received_are_bounded_in_number_and_time(
        run_services: Callable[..., Any], keys: Bootstrap) -> None:
    # Found by a probe: 40 connections each declaring 16 MB and trickling it a byte every 5 s held 600 MB for as
    # long as they liked (the decode slot is taken once the body is in). Now at most MAX_BODIES bodies are being
    # received (past them: 503, retry), and one that does not arrive within its time is dropped (408).
    otlp = (await run_services("otlp"))["otlp"]
    otlp.http.slots = BodySlots(1, 1)
    otlp.http.limits = msgspec.structs.replace(otlp.http.limits, body_max_s=0.5)
    url = otlp.endpoints["otlp-http"]
    host, port = url.split("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v1/traces HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {keys.app_key}\r\n"
                 f"Content-Type: application/x-protobuf\r\nContent-Length: 16000000\r\n\r\n".encode() + b"\x0a" * 1000)
    await writer.drain()
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.resource_spans.add().scope_spans.add().spans.add(
        name="ok", trace_id=b"\x0c" * 16, span_id=b"\x0c" * 8, start_time_unix_nano=time.time_ns())
    async with aiohttp.ClientSession() as http:
        # The one body slot is the trickler's (its headers are in, its body is not): told to retry.
        status = 0
        while status != 503:  # until the trickler's request has reached the handler and holds the slot
            status, answer, headers = await _protobuf_post(url + "/v1/traces", keys.app_key, request)(http)
            assert status in (200, 503)
        assert headers["Retry-After"] == "1" and "too many OTLP exports being received" in answer.message
        trickled = await asyncio.wait_for(reader.read(200), 10)  # dropped once its time is up
        assert trickled.startswith(b"HTTP/1.1 408"), trickled[:80]
        status, _, _ = await _protobuf_post(url + "/v1/traces", keys.app_key, request)(http)
    writer.close()
    assert status == 200


def _model_call(trace_id: str, span_id: str, start_ns: int) -> Any:
    """One GenAI chat span (so each becomes an inference event too) with these ids."""
    span = trace_service_pb2.ExportTraceServiceRequest().resource_spans.add().scope_spans.add().spans.add(
        name="chat gpt-4o-mini", trace_id=bytes.fromhex(trace_id), span_id=bytes.fromhex(span_id), kind=3,
        start_time_unix_nano=start_ns, end_time_unix_nano=start_ns + 120_000_000)
    span.attributes.extend([KeyValue(key="gen_ai.operation.name", value=AnyValue(string_value="chat")),
                            KeyValue(key="gen_ai.request.model", value=AnyValue(string_value="gpt-4o-mini")),
                            KeyValue(key="gen_ai.usage.input_tokens", value=AnyValue(int_value=100))])
    return span


async def test_a_span_is_stored_once_whichever_exports_carry_it(stack: Any, store: Store, keys: Bootstrap) -> None:
    # A span was stored once per export that carried it (only an identical re-send was recognised, by its batch
    # id): a Collector re-batching after a timeout, an export re-sent over the other protocol, or one export
    # carrying a span twice gave it two rows, and `lockgate traces` listed it twice. Its event was stored once.
    trace_id = "6e0c63257de34c926f9efcd03927272e"
    a, b, c, d, e = (f"{n:016x}" for n in range(0xA1, 0xA6))
    now = time.time_ns()
    start = {a: now, b: now + 1000, c: now + 2000, d: now + 3000, e: now + 4000}

    def export(*span_ids: str) -> trace_service_pb2.ExportTraceServiceRequest:
        request = trace_service_pb2.ExportTraceServiceRequest()
        rs = request.resource_spans.add()
        rs.resource.attributes.add(key="service.name").value.string_value = "once"
        rs.scope_spans.add().spans.extend(_model_call(trace_id, s, start[s]) for s in span_ids)
        return request

    url = stack.endpoints["otlp-http"] + "/v1/traces"
    async with aiohttp.ClientSession() as http:
        for spans in ((a, b), (b, c), (d, d)):  # overlapping exports, then a span twice in one
            status, reply, _ = await _protobuf_post(url, keys.app_key, export(*spans))(http)
            assert status == 200 and not reply.HasField("partial_success"), spans
    async with grpc.aio.insecure_channel(stack.endpoints["otlp-grpc"]) as channel:
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        for spans in ((a,), (e,)):  # a again over the other protocol; e last, so its row says all were handled
            reply = await stub.Export(export(*spans), metadata=(("x-api-key", keys.app_key),))
            assert not reply.HasField("partial_success"), spans
    sink = stack["sink"].handlers
    await eventually(lambda: _count(store, "otel_traces", f"SpanId = '{e}'") >= 1, [sink.spans], what="span e stored")
    await eventually(lambda: _count(store, "inference_events") == 5, [sink.events], what="the 5 events")
    rows = store.rows("SELECT SpanId, count() AS n FROM otel_traces WHERE TraceId = {t:String} GROUP BY SpanId "
                      "ORDER BY SpanId", {"t": trace_id})
    assert rows == [{"SpanId": s, "n": 1} for s in (a, b, c, d, e)]
    # What `lockgate traces <id>` shows: every span once, as many spans as model calls stored.
    listed = [r["span_id"] for r in trace(store, trace_id)]
    assert sorted(listed) == [a, b, c, d, e]
    assert _count(store, "inference_events", f"trace_id = '{trace_id}'") == len(listed)


async def test_refused_grpc_exports_leave_nothing_of_their_request_in_memory(stack: Any) -> None:
    # Found by a probe (p62 F3): unauthenticated 16 MB exports, refused before parsing, one at a time, took the process
    # from 645 MB to 5.8 GB, and it stayed: the abort's error (which grpc.aio keeps) held the frame holding the bytes,
    # in a cycle only a full garbage collection frees (lockgate makes them rare). With the collector off, nothing of a
    # refused export may stay: 25 of them kept about 340 MB (the allocator's own keeping stays under 110 MB).
    body = b"\xff" * (16 * 2**20 - 64)

    async with grpc.aio.insecure_channel(stack.endpoints["otlp-grpc"],
                                         options=[("grpc.max_send_message_length", 32 * 2**20)]) as channel:
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                     request_serializer=lambda b: b, response_deserializer=lambda b: b)

        async def refused() -> None:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await export(body, metadata=(("x-api-key", "lg-wrong"),), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        grown = await rss_growth_mib(refused, 25)
    assert grown < 200, f"RSS grew {grown:.0f} MiB over 25 refused 16 MiB exports"

