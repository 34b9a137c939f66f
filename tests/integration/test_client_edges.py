"""The SDK where an application first meets it going wrong: no NATS at the URL, emits from a worker thread,
a credential revoked while it runs, emits after close, and a NATS without lockgate's streams."""

from __future__ import annotations

import asyncio
import socket

import pytest

from lockgate.client import Client
from lockgate.errors import BusUnavailable

pytestmark = pytest.mark.timeout(90)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("where", ["closed port", "unknown host"])
async def test_start_raises_bus_unavailable_when_nats_cannot_be_reached(where: str) -> None:
    # Before: start() (and `async with Client`) waited for ever, logging only at DEBUG: nats-py's unlimited
    # reconnections also retried the first connection.
    host = f"127.0.0.1:{closed_port()}" if where == "closed port" else "no-such-host.invalid:4222"
    url = f"nats://shop:S3CRET@{host}"
    c = Client(url, app="shop")
    with pytest.raises(BusUnavailable) as caught:
        async with asyncio.timeout(30):
            await c.start()
    message = str(caught.value)
    assert message.startswith(f"cannot reach NATS at nats://shop:[REDACTED]@{host}: "), message
    assert "S3CRET" not in message
    await c.close()
