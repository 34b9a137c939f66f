"""OTLP exports and Ingest.Send while the bus does not acknowledge, on an embedded stack as `lockgate up` runs it:
the retryable answer (503 with Retry-After, UNAVAILABLE) comes within the 10 s the standard OpenTelemetry exporters
give an export (OTEL_EXPORTER_OTLP_TIMEOUT), and once the bus is back the same export is stored once.

Before (probe p4): each publish waited out JetStream's 5 s acknowledgement, 3 times (Ingest.Send 5 times), so the
answer came after 15 s (25 s); the exporters had given up at 10 s and dropped the batch, never sending it again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from lockgate.config import Settings
from lockgate.ids import uuid7
from lockgate.server.apikeys import Bootstrap, bootstrap
from lockgate.server.runtime import Runtime
from lockgate.v1 import ingest_pb2, ingest_pb2_grpc
from tests.helpers import eventually, hang
from tests.integration.test_otlp import _json_request

pytestmark = pytest.mark.timeout(120)

DEADLINE_S = 10.0  # the standard exporters' whole export (OTEL_EXPORTER_OTLP_TIMEOUT's default)


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[tuple[Runtime, Bootstrap]]:
    """Sink, OTLP receiver and gateway on their own supervised nats-server; an app key of acme/shop."""
    keys = bootstrap(settings.home, tenant="acme", app="shop")
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink", "otlp", "gateway"])
    await runtime.start()
    try:
        yield runtime, keys
    finally:
        await runtime.stop()


class Sender:
    """One OTLP/HTTP export (JSON: a model call, so a span and an inference event), one OTLP/gRPC export and one
    Ingest.Send, each with a 10 s deadline; sent again unchanged, as an exporter's retry is."""

    def __init__(self, runtime: Runtime, keys: Bootstrap, name: str) -> None:
        self.endpoints, self.key, self.name = runtime.endpoints, keys.app_key, name
        self.http_request = _json_request(os.urandom(16).hex(), f"{name}-http")
        grpc_request = trace_service_pb2.ExportTraceServiceRequest()
        grpc_request.resource_spans.add().scope_spans.add().spans.add(
            name=f"{name}-grpc", trace_id=os.urandom(16), span_id=os.urandom(8),
            start_time_unix_nano=time.time_ns(), end_time_unix_nano=time.time_ns())
        self.grpc_request = grpc_request
        self.batch = ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(id=uuid7(), model="gpt-4o-mini",
                                                                                 session_id=f"{name}-send")])

    async def http(self) -> tuple[int, str | None, str]:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE_S)) as http:
                async with http.post(self.endpoints["otlp-http"] + "/v1/traces", json=self.http_request,
                                     headers={"x-api-key": self.key}) as r:
                    return r.status, r.headers.get("Retry-After"), (await r.json()).get("message", "")
        except TimeoutError:  # what the exporter sees: it gives up, and drops the batch
            return 0, None, f"no answer within {DEADLINE_S:g} s"

    async def export(self) -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(self.endpoints["otlp-grpc"]) as channel:
            try:
                await trace_service_pb2_grpc.TraceServiceStub(channel).Export(
                    self.grpc_request, metadata=(("x-api-key", self.key),), timeout=DEADLINE_S)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    async def send(self) -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(self.endpoints["grpc"]) as channel:
            try:
                reply = await ingest_pb2_grpc.IngestStub(channel).Send(
                    self.batch, metadata=(("authorization", f"Bearer {self.key}"),), timeout=DEADLINE_S)
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, f"accepted {reply.accepted}"

    async def all(self) -> tuple[Any, ...]:
        return tuple(await asyncio.gather(self.http(), self.export(), self.send()))

    async def stored_once(self, runtime: Runtime) -> None:
        """Once the bus is back: the same requests succeed, and each span and event is stored once."""
        for bus in runtime.buses:
            await bus.wait_state("connected")
            await bus.nc.flush(timeout=30)  # it answers again (a server resumed after SIGSTOP)
        (status, _, _), export, send = await self.all()
        assert (status, export, send) == (200, grpc.StatusCode.OK, (grpc.StatusCode.OK, "accepted 1"))
        assert runtime.ctx is not None and runtime.ctx.store is not None and runtime.services is not None
        store, sink = runtime.ctx.store, runtime.services["sink"].handlers

        def counts() -> tuple[int, ...]:
            return (store.scalar(f"SELECT count() FROM otel_traces WHERE SpanName = '{self.name}-http'"),
                    store.scalar(f"SELECT count() FROM otel_traces WHERE SpanName = '{self.name}-grpc'"),
                    store.scalar("SELECT count() FROM inference_events WHERE model = 'gpt-4o'"),
                    store.scalar(f"SELECT count() FROM inference_events WHERE session_id = '{self.name}-send'"))

        await eventually(lambda: min(counts()) >= 1, [sink.spans, sink.events], what=lambda: f"stored: {counts()}")
        assert counts() == (1, 1, 1, 1)
        # One message each on the bus (the retries deduplicated by their message ids): nothing more to store later.
        # (The telemetry stream also carries the stack's own spans, of these requests: source "lockgate".)
        bus = runtime.buses[0]
        for stream, sent in (("telemetry", b'"source":"otlp"'), ("inference", b"")):
            name = bus.subjects.streams[stream].name
            info = await bus.js.stream_info(name)
            messages = [(await bus.js.get_msg(name, seq)).data for seq in range(1, info.state.last_seq + 1)]
            assert len([m for m in messages if sent in m]) == 2, (stream, messages)


def _retry_answered(answers: tuple[Any, ...], took: float) -> None:
    (status, retry_after, message), export, (send, details) = answers
    assert took < DEADLINE_S, f"answered after {took:.1f} s: {answers}"
    assert (status, retry_after, export, send) == (503, "1", grpc.StatusCode.UNAVAILABLE,
                                                   grpc.StatusCode.UNAVAILABLE), answers
    assert "retry" in message and "retry" in details, answers


async def test_a_hung_bus_is_answered_retry_within_the_exporters_deadline_and_the_retry_is_stored_once(
        stack: tuple[Runtime, Bootstrap]) -> None:
    runtime, keys = stack
    assert runtime.nats is not None and runtime.nats.proc is not None
    sender = Sender(runtime, keys, "hung")
    pid = runtime.nats.proc.pid
    await hang(pid)  # its connections stay open (still "connected"), nothing is acknowledged
    try:
        began = time.monotonic()
        answers = await sender.all()
        took = time.monotonic() - began
    finally:
        os.kill(pid, signal.SIGCONT)
    _retry_answered(answers, took)
    # Sent but not acknowledged: they may be stored (here they are, once the server runs again), and the caller is
    # told so, not that they failed.
    details = answers[2][1]
    assert "may have been stored" in details and "deduplicated" in details and "counted as failed" not in details
    await sender.stored_once(runtime)


async def test_a_bus_that_is_down_is_answered_retry_at_once_and_the_retry_is_stored_once(
        stack: tuple[Runtime, Bootstrap]) -> None:
    runtime, keys = stack
    assert runtime.nats is not None
    sender = Sender(runtime, keys, "down")
    runtime.nats.stop()  # and no restart: the supervisor stops with it
    for bus in runtime.buses:
        await bus.wait_state("reconnecting")
    began = time.monotonic()
    answers = await sender.all()
    _retry_answered(answers, time.monotonic() - began)
    assert "reconnecting" in answers[0][2] and "reconnecting" in answers[2][1], answers
    await runtime.nats.start()  # on the same port and store
    await sender.stored_once(runtime)
