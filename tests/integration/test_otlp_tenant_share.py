"""The OTLP receiver's decode work is shared between tenants, over both transports. Found by a probe (p89 F1): one
tenant's app key filled the 64 in-flight slots over OTLP/gRPC with ~70 concurrent 15 MiB exports, and every other
tenant's export was refused (UNAVAILABLE / 503) until the standard exporters gave up and dropped the batch; and
with only its 4 OTLP/HTTP bodies (each ~10 s to scrub) it held every decode thread, other tenants' exports queued
behind them past the exporters' 10 s.

acme's exports are held in their decode here (a thread blocked until the test lets go), as the probe's took seconds
each; bravo's must still be answered within the standard exporters' 10 s."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from lockgate.config import Settings
from lockgate.server.apikeys import Bootstrap, KeyStore
from lockgate.server.service import Progress
from lockgate.services.otlp import domain
from lockgate.services.otlp.bodies import TENANT_BODIES
from tests.helpers import eventually
from tests.integration import test_otlp

pytestmark = pytest.mark.timeout(90)

keys = test_otlp.keys
_post = test_otlp._protobuf_post
EXPORTER_TIMEOUT_S = 10.0  # the standard exporters' whole export (OTEL_EXPORTER_OTLP_TIMEOUT): dropped after it


def _export(name: str, n: int = 0) -> trace_service_pb2.ExportTraceServiceRequest:
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.resource_spans.add().scope_spans.add().spans.add(
        name=name, trace_id=b"\x0e" * 16, span_id=(n + 1).to_bytes(8, "big"), start_time_unix_nano=time.time_ns())
    return request


def _hold(monkeypatch: pytest.MonkeyPatch, tenant: str, release: threading.Event) -> None:
    """`tenant`'s exports stay in their decode (in a receiver thread) until `release` is set."""
    decode = domain.decode

    def held(request: Any, **kwargs: Any) -> Any:
        if kwargs["tenant"] == tenant:
            release.wait(timeout=60)
        return decode(request, **kwargs)

    monkeypatch.setattr(domain, "decode", held)


def _admissions(monkeypatch: pytest.MonkeyPatch, work: Any) -> Progress:
    """Bumped as each export takes its in-flight slot in the receiver."""
    admitted, slot = Progress(), work.slot

    @contextlib.asynccontextmanager
    async def counted(*args: Any, **kwargs: Any) -> AsyncIterator[None]:
        async with slot(*args, **kwargs):
            await admitted.bump()
            yield

    monkeypatch.setattr(work, "slot", counted)
    return admitted


async def _bravo_answered_promptly(otlp: Any, stub: Any, bravo: str) -> None:
    """bravo's export over gRPC and over OTLP/HTTP, each answered OK within the exporters' deadline."""
    reply = await stub.Export(_export("bravo grpc"), metadata=(("x-api-key", bravo),), timeout=EXPORTER_TIMEOUT_S)
    assert not reply.HasField("partial_success")
    async with aiohttp.ClientSession() as http:
        status, answer, _ = await asyncio.wait_for(
            _post(otlp.endpoints["otlp-http"] + "/v1/traces", bravo, _export("bravo http", 1))(http),
            EXPORTER_TIMEOUT_S)
    assert status == 200, answer


async def test_one_tenant_flooding_otlp_grpc_holds_only_its_share_of_the_decode_work(
        run_services: Callable[..., Any], settings: Settings, keys: Bootstrap,
        monkeypatch: pytest.MonkeyPatch) -> None:
    otlp = (await run_services("otlp"))["otlp"]
    bravo, _ = KeyStore(settings.home).create("bravo", "web")
    release = threading.Event()
    _hold(monkeypatch, "acme", release)
    admitted, refused = _admissions(monkeypatch, otlp.receiver.work), otlp.receiver.retry_asked
    acme: list[asyncio.Future[Any]] = []
    async with grpc.aio.insecure_channel(otlp.endpoints["otlp-grpc"]) as channel:
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        try:
            while refused.count == 0:  # acme sends until it is told to retry: it holds all it may
                acme.append(asyncio.ensure_future(
                    stub.Export(_export("acme", len(acme)), metadata=(("x-api-key", keys.app_key),))))
                await eventually(lambda: admitted.count + refused.count == len(acme), [admitted, refused],
                                 what="acme's export taken or refused")
            held = admitted.count
            # Before: acme held all 64 slots, and this was UNAVAILABLE "too many OTLP exports in flight".
            await _bravo_answered_promptly(otlp, stub, bravo)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await acme[-1]
        finally:
            release.set()
            await asyncio.gather(*acme, return_exceptions=True)
    share = otlp.receiver.work.slots.per_owner
    assert (held, share, otlp.receiver.work.slots.total) == (share, 32, 64)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == ("tenant acme already has 32 OTLP exports in flight, its share of the receiver's "
                                   "64; retry shortly")
    assert dict(err.value.trailing_metadata()).get("google.rpc.retryinfo-bin"), "the exporter is told when to retry"
    assert all(not task.exception() for task in acme[:-1]), "acme's held exports went through once let go"


async def test_one_tenants_slow_otlp_http_bodies_leave_decode_threads_for_the_others(
        run_services: Callable[..., Any], settings: Settings, keys: Bootstrap,
        monkeypatch: pytest.MonkeyPatch) -> None:
    otlp = (await run_services("otlp"))["otlp"]
    bravo, _ = KeyStore(settings.home).create("bravo", "web")
    release = threading.Event()
    _hold(monkeypatch, "acme", release)
    admitted = _admissions(monkeypatch, otlp.receiver.work)
    url = otlp.endpoints["otlp-http"] + "/v1/traces"
    async with aiohttp.ClientSession() as http, grpc.aio.insecure_channel(otlp.endpoints["otlp-grpc"]) as channel:
        # Within acme's share of the bodies received: every one of them is decoded at length (the probe's took 10.7 s).
        acme = [asyncio.create_task(_post(url, keys.app_key, _export("acme", i))(http)) for i in range(TENANT_BODIES)]
        try:
            await eventually(lambda: admitted.count == TENANT_BODIES, [admitted], what="acme's exports taken")
            # Before: acme's held every decode thread, and bravo's waited behind them past the deadline.
            await _bravo_answered_promptly(otlp, trace_service_pb2_grpc.TraceServiceStub(channel), bravo)
        finally:
            release.set()
            answers = await asyncio.gather(*acme, return_exceptions=True)
    assert [a[0] for a in answers] == [200] * TENANT_BODIES, answers
