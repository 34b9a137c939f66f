"""Only an application's key (or an admin's) sends data: traffic through the router, gRPC `Ingest/Send` events and
OTLP spans. Through the official `openai` client, the gRPC API and the OTLP receiver (HTTP and gRPC), against a real
nats-server, the router, the gateway and the receiver.

Found by a probe: a viewer key, the kind handed to dashboards and CI readers, had a chat request served (200: the
upstream called, the event stored as served, so canary evidence), a gRPC event accepted and billed and an OTLP
export stored: every data-plane path checked that a key was valid, never its role."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import openai
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from lockgate.server.apikeys import Bootstrap, KeyStore, bootstrap
from lockgate.server.service import ServiceContext
from lockgate.v1 import ingest_pb2, ingest_pb2_grpc
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import grpc_key, register_model_release, store_pass

pytestmark = pytest.mark.timeout(90)

HI = [{"role": "user", "content": "hi"}]
READERS = ("viewer", "approver", "operator")  # roles that read or operate rollouts


@pytest.fixture
def keys(context: ServiceContext) -> Bootstrap:
    """The admin key and an app key of tenant default (app shop), whose releases the router serves."""
    return bootstrap(context.settings.home, tenant="default", app="shop")


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(SimConfig(models={"m": ModelSpec(default="served")})) as s:
        yield s


@pytest.fixture
async def stack(context: ServiceContext, run_services: Any, sim: SimServer, keys: Bootstrap) -> Any:
    """The router (deployment `chat` served by r1, gated, on the simulator), the gRPC gateway and the OTLP
    receiver."""
    context.settings = context.settings.replace(stable_upstream=sim.url, canary_upstream=sim.url, deployment="chat",
                                                app="shop", passthrough=False)
    services = await run_services("router", "gateway", "otlp")
    await register_model_release(context.bus, "r1", "m", "default")
    await store_pass(context.bus, "r1", context.settings)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as http, http.put(
            f"{services['router'].url}/lockgate/v1/deployments/chat", json={"stable_release": "r1"}) as resp:
        assert resp.status == 200, await resp.text()
    return services


def _key(context: ServiceContext, role: str) -> str:
    """A key of `role`, of the releases' tenant and with no deployment scope: only its role keeps it out."""
    return KeyStore(context.settings.home).create("default", "shop", role)[0]


def _refusal_names_the_role(message: str, role: str) -> None:
    assert "requires role app (or admin)" in message and f"a {role} key only reads or operates" in message, message


@pytest.mark.parametrize("role", READERS)
async def test_the_router_serves_no_traffic_to_a_key_that_only_reads_or_operates(
        stack: Any, context: ServiceContext, sim: SimServer, keys: Bootstrap, role: str) -> None:
    router, key = stack["router"], _key(context, role)
    async with openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=0, timeout=20) as client:
        calls = {"chat": lambda: client.chat.completions.create(model="m", messages=HI),
                 "chat streamed": lambda: client.chat.completions.create(model="m", messages=HI, stream=True),
                 "completions": lambda: client.completions.create(model="m", prompt="hi"),
                 "embeddings": lambda: client.embeddings.create(model="m", input="hi"),
                 "responses": lambda: client.responses.create(model="m", input="hi")}
        for what, call in calls.items():
            with pytest.raises(openai.PermissionDeniedError) as caught:
                await call()
            err = caught.value
            assert (err.status_code, err.type, err.code) == (403, "permission_denied", "insufficient_role"), what
            _refusal_names_the_role(err.message, role)
            assert key not in err.message
        # Reading what it may send to stays open to it (a dashboard lists models).
        assert {m.id async for m in client.models.list()} == {"chat"}
    assert sim.total_requests == 0  # refused before any upstream: no provider money spent

    # The app key, and the admin key (which may do anything), are served the same request.
    for sender in (keys.app_key, keys.admin_key):
        async with openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=sender, max_retries=0) as client:
            answer = await client.chat.completions.create(model="m", messages=HI)
        assert answer.choices[0].message.content == "served"
    assert sim.total_requests == 2


@pytest.mark.parametrize("role", READERS)
async def test_grpc_ingest_refuses_the_events_of_a_key_that_only_reads_or_operates(
        stack: Any, context: ServiceContext, keys: Bootstrap, role: str) -> None:
    address = stack["gateway"].endpoints["grpc"]
    batch = ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(
        app="shop", deployment="chat", model="m", input_tokens=100_000, output_tokens=100_000)])
    async with grpc.aio.insecure_channel(address, interceptors=grpc_key(_key(context, role))) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ingest_pb2_grpc.IngestStub(channel).Send(batch, timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    _refusal_names_the_role(caught.value.details() or "", role)
    async with grpc.aio.insecure_channel(address, interceptors=grpc_key(keys.app_key)) as channel:
        assert (await ingest_pb2_grpc.IngestStub(channel).Send(batch, timeout=10)).accepted == 1


def _export(trace_id: str) -> dict[str, Any]:
    """An OTLP/JSON export of one GenAI model call (it would be billed to the key's tenant)."""
    start = time.time_ns() - 1_000_000_000
    span = {"traceId": trace_id, "spanId": "00f067aa0ba902b7", "name": "chat m", "kind": 3,
            "startTimeUnixNano": str(start), "endTimeUnixNano": str(start + 250_000_000),
            "attributes": [{"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
                           {"key": "gen_ai.request.model", "value": {"stringValue": "m"}},
                           {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "100000"}}]}
    return {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "bot"}}]},
                               "scopeSpans": [{"spans": [span]}]}]}


@pytest.mark.parametrize("role", READERS)
async def test_the_otlp_receiver_refuses_the_spans_of_a_key_that_only_reads_or_operates(
        stack: Any, context: ServiceContext, keys: Bootstrap, role: str) -> None:
    otlp, key = stack["otlp"], _key(context, role)
    url = otlp.endpoints["otlp-http"] + "/v1/traces"
    body = _export("5b8efff798038103d269b633813fc60c")
    async with aiohttp.ClientSession() as http:
        for headers in ({"x-api-key": key}, {"Authorization": f"Bearer {key}"}):
            async with http.post(url, json=body, headers=headers) as resp:
                status, answer = resp.status, await resp.json()
            assert (status, answer.get("code")) == (403, 7), answer  # 7: PERMISSION_DENIED
            _refusal_names_the_role(answer["message"], role)
        async with http.post(url, json=body, headers={"x-api-key": keys.app_key}) as resp:
            assert (resp.status, await resp.json()) == (200, {})  # stored whole

    request = trace_service_pb2.ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    start = time.time_ns() - 1_000_000_000
    rs.scope_spans.add().spans.add(name="chat m", trace_id=b"\x01" * 16, span_id=b"\x02" * 8,
                                   start_time_unix_nano=start, end_time_unix_nano=start + 250_000_000)
    async with grpc.aio.insecure_channel(otlp.endpoints["otlp-grpc"]) as channel:
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Export(request, metadata=(("authorization", f"Bearer {key}"),), timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        _refusal_names_the_role(caught.value.details() or "", role)
        reply = await stub.Export(request, metadata=(("authorization", f"Bearer {keys.app_key}"),), timeout=10)
        assert reply.partial_success.rejected_spans == 0
