"""OTLP/HTTP body slots are shared between tenants, and a trickled body is cut by a minimum rate. Found by a probe
(p37 F2): tenant acme's app key trickled bodies on 9 connections, re-sending each as soon as it was answered, and
held all 8 slots: tenant bravo's exports over 67 s were answered {503: 131, 200: 1}. Each body held its slot for
its whole 30 s."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from lockgate.config import Settings
from lockgate.server.apikeys import Bootstrap, KeyStore
from lockgate.services.otlp.bodies import BODY_GRACE_S, BODY_READ_S, MAX_BODIES, TENANT_BODIES, BodySlots
from tests.integration import test_otlp

pytestmark = pytest.mark.timeout(90)

keys = test_otlp.keys
_post = test_otlp._protobuf_post
DECLARED = 16_000_000  # each trickled body's Content-Length: it never all arrives


async def _trickle(url: str, key: str | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose request declares a 16 MB protobuf body and sends only its first 100 bytes."""
    host, port = url.split("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    writer.write(f"POST /v1/traces HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/x-protobuf\r\n"
                 f"Content-Length: {DECLARED}\r\n\r\n".encode() + b"\x0a" * 100)
    await writer.drain()
    return reader, writer


async def _answer(reader: asyncio.StreamReader) -> tuple[int, status_pb2.Status]:
    """The status and OTLP Status message of the answer on a trickling connection (its body still unsent)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    lines = head.split("\r\n")
    length = next(int(v) for k, _, v in (h.partition(": ") for h in lines[1:]) if k.lower() == "content-length")
    return int(lines[0].split()[1]), status_pb2.Status.FromString(await reader.readexactly(length))


def _export(name: str) -> trace_service_pb2.ExportTraceServiceRequest:
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.resource_spans.add().scope_spans.add().spans.add(
        name=name, trace_id=b"\x0d" * 16, span_id=len(name).to_bytes(8, "big"), start_time_unix_nano=time.time_ns())
    return request


async def test_one_tenant_trickling_bodies_on_every_connection_leaves_other_tenants_their_exports(
        run_services: Callable[..., Any], settings: Settings, keys: Bootstrap) -> None:
    otlp = (await run_services("otlp"))["otlp"]
    url = otlp.endpoints["otlp-http"]
    bravo, _ = KeyStore(settings.home).create("bravo", "web")
    answers: Counter[int] = Counter()
    stop = asyncio.Event()

    async def trickler() -> None:  # as the probe's: each answered request is sent again at once
        while not stop.is_set():
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                reader, writer = await _trickle(url, keys.app_key)
                try:
                    answers[(await _answer(reader))[0]] += 1
                finally:
                    writer.close()

    trickling = [asyncio.create_task(trickler()) for _ in range(MAX_BODIES + 1)]  # more than every slot
    try:
        async with aiohttp.ClientSession() as http:
            status = 200
            while status == 200:  # until acme's trickled bodies hold every slot it may have
                status, answer, headers = await _post(url + "/v1/traces", keys.app_key, _export("acme"))(http)
            # Before: acme held all 8, and each of these was 503.
            seen = Counter([(await _post(url + "/v1/traces", bravo, _export(f"bravo {i}"))(http))[0]
                            for i in range(10)])
        assert seen == {200: 10}, f"bravo's exports while acme trickles: {dict(seen)}"
        # acme had several bodies in at once, its share, and was told to retry past it
        assert (status, headers["Retry-After"]) == (503, "1"), answer
        assert f"tenant acme already has {TENANT_BODIES} OTLP exports being received" in answer.message
        assert answers[503] >= 1, "acme's connections past its share were refused"
    finally:
        stop.set()
        for task in trickling:
            task.cancel()
        await asyncio.gather(*trickling, return_exceptions=True)


async def test_a_trickled_body_is_cut_by_the_minimum_rate_well_before_its_total_time(
        run_services: Callable[..., Any], keys: Bootstrap) -> None:
    otlp = (await run_services("otlp"))["otlp"]
    otlp.http.slots = BodySlots(1, 1)  # the trickle holds the one slot, and the export after it needs it
    url = otlp.endpoints["otlp-http"]
    reader, writer = await _trickle(url, keys.app_key)
    try:
        # Before, the trickle held its slot for the whole 30 s and was answered "did not arrive within 30 s".
        status, answer = await asyncio.wait_for(_answer(reader), BODY_READ_S / 2)
    finally:
        writer.close()
    assert status == 408
    assert "the request body arrived too slowly: 100 bytes in" in answer.message
    assert f"after the first {BODY_GRACE_S:g} s a body must arrive at 16 KiB/s or more" in answer.message
    async with aiohttp.ClientSession() as http:
        assert (await _post(url + "/v1/traces", keys.app_key, _export("after"))(http))[0] == 200  # freed


async def test_a_request_without_a_valid_sending_key_holds_no_body_slot(
        run_services: Callable[..., Any], settings: Settings, keys: Bootstrap) -> None:
    otlp = (await run_services("otlp"))["otlp"]
    url = otlp.endpoints["otlp-http"]
    viewer, _ = KeyStore(settings.home).create("acme", "dash", "viewer")
    held: list[asyncio.StreamWriter] = []
    try:
        # More than every slot, each answered while its body is still being sent; none took a slot (before the key
        # was looked at, they would all have been held, and the export below answered 503).
        for key, expected in [(None, 401), ("lg-not-a-key", 401), (viewer, 403)] * (MAX_BODIES // 2):
            reader, writer = await _trickle(url, key)
            held.append(writer)
            status, _ = await asyncio.wait_for(_answer(reader), 10)
            assert status == expected, key
        async with aiohttp.ClientSession() as http:
            status, _, _ = await _post(url + "/v1/traces", keys.app_key, _export("ok"))(http)
        assert status == 200
    finally:
        for writer in held:
            with contextlib.suppress(ConnectionError):
                writer.close()
