"""`flush()` confirms every command the connection sent before it. nats-py wrote its PING straight to the socket,
ahead of a SUB still queued for its flusher task, so the PONG confirmed no subscription made just before: another
connection's request sent right after found no responders (CI failed so: an apply right after the lineage recorder
started, `no lineage recorder answers applies`)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse

import pytest

from lockgate import natsclient
from lockgate.server.natsserver import NatsServer

pytestmark = pytest.mark.timeout(30)


async def test_a_flush_reaches_the_server_after_the_subscription_made_before_it(nats_server: NatsServer) -> None:
    # The bytes the client sends, in order, on their way to the real server.
    sent = bytearray()
    server_port = urlparse(nats_server.url).port

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            while data := await src.read(65536):
                if record:
                    sent.extend(data)
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False), return_exceptions=True)

    listener = await asyncio.start_server(relay, "127.0.0.1", 0)
    nc = await natsclient.connect(f"nats://127.0.0.1:{listener.sockets[0].getsockname()[1]}")
    try:
        before = len(sent)
        await nc.subscribe("flush.order", queue="q")
        await nc.flush()
        after = bytes(sent[before:])
        assert b"SUB flush.order q" in after and after.rindex(b"PING") > after.index(b"SUB flush.order q"), after
    finally:
        await nc.close()
        listener.close()
