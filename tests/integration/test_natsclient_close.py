"""`close()` of a connection lost while something was still pending closes it. nats-py wrote the pending bytes to the
lost socket and waited for them to drain: ConnectionResetError, the close stopped half-way (subscriptions and socket
left open) and the caller's stop failed (ci-local: a test's teardown while its bus reconnected)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse

import nats.errors
import pytest

from lockgate import natsclient
from lockgate.server.natsserver import NatsServer

pytestmark = pytest.mark.timeout(30)


async def test_a_connection_lost_with_a_publish_pending_closes(nats_server: NatsServer) -> None:
    server_port = urlparse(nats_server.url).port
    relayed: list[asyncio.StreamWriter] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relayed.append(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    listener = await asyncio.start_server(relay, "127.0.0.1", 0)
    lost = asyncio.Event()

    async def disconnected() -> None:
        lost.set()

    nc = await natsclient.connect(f"nats://127.0.0.1:{listener.sockets[0].getsockname()[1]}",
                                  disconnected_cb=disconnected, reconnect_time_wait=5)
    received = await nc.subscribe("lost.close")
    listener.close()  # no reconnect succeeds: the publish below stays pending
    for writer in relayed:
        writer.transport.abort()  # a reset, as a server or a network that goes away
    await lost.wait()
    await nc.publish("lost.close", b"pending")
    assert nc.is_reconnecting

    await nc.close()
    assert nc.is_closed
    with pytest.raises(nats.errors.ConnectionClosedError):  # the subscription ended with it, not left open
        await received.next_msg(timeout=1)
