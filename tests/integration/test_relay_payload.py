"""The gateway's relay and a message near the server's max_payload, on the embedded runtime as `lockgate up` runs
it (users and permissions on): the relay never republishes more than the server takes, and a connection nats-py
closed for good does not go unnoticed."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import nats
import nats.aio.client
import nats.errors
import nats.js.errors
import pytest

from lockgate import credentials
from lockgate.codec import encode
from lockgate.config import Settings
from lockgate.contracts import DecisionsRead, InferenceEvent
from lockgate.errors import PayloadTooLarge
from lockgate.server.runtime import Runtime

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    for tenant, app in (("evil", "x"), ("acme", "shop")):
        credentials.create_app(settings.home, tenant, app)  # before the start: the server loads them at once
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink", "gateway"])
    await runtime.start()
    yield runtime
    await runtime.stop()


async def _connect(runtime: Runtime, user: str) -> nats.NATS:
    if user == "app":
        auth = credentials.for_identity(runtime.settings, "app")
        name, password = auth.user, auth.password
    else:
        found = await asyncio.to_thread(credentials.apps, runtime.settings.home)
        name, password = user, found[user]["password"]
    return await nats.connect(runtime.settings.nats_url, user=name, password=password, allow_reconnect=False,
                              connect_timeout=5, inbox_prefix=f"_INBOX.{name}")


def _hpub_headers_size(headers: dict[str, str]) -> int:
    """What nats-py puts before the payload of a message with `headers` (the server counts it in max_payload)."""
    return len(b"NATS/1.0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n")


async def test_a_message_the_relay_would_lengthen_past_max_payload_is_refused_alone(stack: Runtime) -> None:
    # Found by a probe: an application user sent one message on its own `ingest` subject with a Nats-Msg-Id, its
    # payload and headers a few bytes under max_payload. The relay republished it with the id scoped to its
    # tenant and app (longer), nats-py counted only the payload and sent it, nats-server answered -ERR 'Maximum
    # Payload Violation' and nats-py closed the gateway's connection for good: relay, reads and the gRPC API dead
    # for every tenant, silently. It is refused alone now, and its sender told why.
    s, relay = stack.ctx.bus.subjects, stack.services["gateway"].relay
    gateway = stack.services["gateway"].ctx.bus
    for attacker, tenant, app in (("apps.evil.x", "evil", "x"), ("app", "globex", "shop")):
        nc = await _connect(stack, attacker)
        try:
            headers = {"Nats-Msg-Id": "x"}
            body = b"A" * (nc.max_payload - _hpub_headers_size(headers))  # fits exactly, as the server took it
            with pytest.raises(nats.js.errors.APIError, match="max_payload") as refused:
                await nc.jetstream().publish(s.ingest(app, tenant), body, headers=headers, timeout=5)
            assert refused.value.code == 400, refused.value  # a permanent refusal: the SDK does not retry it
        finally:
            await nc.close()
    assert relay.oversized.count == 2 and gateway.state == "connected"

    # Another tenant's events are still relayed and acknowledged, and reads still answered.
    victim = await _connect(stack, "apps.acme.shop")
    try:
        ack = await victim.jetstream().publish(s.ingest("shop", "acme"), encode([InferenceEvent(app="shop",
                                                                                                tenant="acme")]),
                                               headers={"Nats-Msg-Id": "after"}, timeout=5)
        assert ack.seq > 0 and not ack.duplicate
        read = await victim.request(s.read_decisions("shop", "acme", ""), b"", timeout=5)
        assert msgspec.json.decode(read.data, type=DecisionsRead).error == ""
    finally:
        await victim.close()
    await stack.services["sink"].handlers.events.wait_for(1)
    rows = stack.ctx.store.rows("SELECT tenant, app, count() AS n FROM inference_events GROUP BY tenant, app")
    assert rows == [{"tenant": "acme", "app": "shop", "n": 1}]


async def test_a_connection_closed_for_good_is_reported_and_ends_the_runtime(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    # Before, a connection nats-py closed after a protocol -ERR was never replaced and nothing said so: the process
    # served on without it, /healthz ok, its subscriptions gone. It is logged, /readyz says so, and the runtime
    # fails (`lockgate up` and `serve` stop and exit non-zero, for a supervisor to start the process again).
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", health_port=_free_port()),
                      services=["sink", "gateway"])
    await runtime.start()
    try:
        failed = asyncio.ensure_future(runtime.failed())
        gateway = runtime.services["gateway"].ctx.bus
        nc = gateway.nc
        # What nats-py sent before the bus's check: a header-heavy message over max_payload (nats-py's own publish,
        # without the check), which the server answers with -ERR 'Maximum Payload Violation'.
        with caplog.at_level(logging.ERROR, logger="lockgate.bus"):
            await nats.aio.client.Client.publish(nc, "nowhere", b"A" * (nc.max_payload - 10), headers=_PAD)
            failure = await asyncio.wait_for(failed, 10)
        assert gateway.state == "closed" and gateway.name in failure.message, failure
        assert "maximum payload violation" in failure.message.lower(), failure
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [failure.message]
        async with aiohttp.ClientSession() as http, http.get(runtime.health_url + "/readyz") as resp:
            body = await resp.json()
        assert resp.status == 503 and body["bus"][gateway.name] == "closed", body
        assert {state for name, state in body["bus"].items() if name != gateway.name} == {"connected"}, body
    finally:
        await runtime.stop()


async def test_a_header_heavy_message_over_max_payload_never_reaches_the_wire(stack: Runtime) -> None:
    # nats-py compares only the payload with max_payload; the server counts the headers too and answers a larger
    # message with -ERR, on which nats-py closes the connection for good. Every lockgate connection checks both.
    bus = stack.ctx.bus
    body = b"A" * (bus.nc.max_payload - 10)
    with pytest.raises(nats.errors.MaxPayloadError):
        await bus.nc.publish("nowhere", body, headers=_PAD)
    with pytest.raises(PayloadTooLarge, match="of headers"):
        await bus.publish(bus.subjects.inference("shop"), body, msg_id="too-large-with-headers", headers=_PAD)
    await bus.nc.flush()
    assert bus.state == "connected" and bus.closed_error is None
    ack = await bus.publish(bus.subjects.inference("shop"), [InferenceEvent(app="shop")])
    assert ack.seq > 0


_PAD = {"X-Pad": "p" * 100}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
