"""The SDK where an application first meets it going wrong: no NATS at the URL, emits from a worker thread,
a credential revoked while it runs, emits after close, and a NATS without lockgate's streams."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

import pytest

from lockgate.bus import Bus
from lockgate.client import Client
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.errors import BusUnavailable
from tests.integration.test_client import client, events_codec, stored

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


async def test_emit_from_worker_threads_publishes_each_event_once_without_a_flush(
        bus: Bus, settings: Settings) -> None:
    # Before: the first emit made from a thread other than the loop's raised RuntimeError('no running event
    # loop') after buffering the event (every one of them, as the flush task never started), and nothing was
    # published until the loop's thread called flush() or close(): an app retrying on the error stored each twice.
    threads, each = 4, 250
    total = threads * each
    got: list[InferenceEvent] = []
    all_arrived = asyncio.Event()

    async def arrived(msg: Any) -> None:
        got.extend(events_codec.decode(msg.data))
        if len(got) >= total:
            all_arrived.set()

    watch = await bus.nc.subscribe(bus.subjects.inference("shop"), cb=arrived)
    errors: list[BaseException] = []
    accepted: list[bool] = []
    async with client(settings) as c:

        def request_thread(k: int) -> None:  # a sync web framework's request handler
            for i in range(each):
                try:
                    accepted.append(c.emit(model="m", input_tokens=k * each + i))
                except BaseException as exc:  # any exception is the defect
                    errors.append(exc)

        workers = [threading.Thread(target=request_thread, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            await asyncio.to_thread(w.join)
        assert errors == [] and accepted == [True] * total
        # Published by the client's own flush task, with no flush() or close() from the loop's thread.
        await asyncio.wait_for(all_arrived.wait(), 20)
        assert c.sent == total
    await watch.unsubscribe()
    assert (c.sent, c.failed, c.dropped) == (total, 0, 0)
    events, _ = await stored(bus)
    assert sorted(e.input_tokens for e in events) == list(range(total))  # each stored once


async def test_flush_and_close_include_what_other_threads_emitted_before(bus: Bus, settings: Settings) -> None:
    c = client(settings, flush_interval_s=60)  # only flush() or close() publishes
    await c.start()
    await asyncio.to_thread(lambda: [c.emit(release="from-thread") for _ in range(3)])
    await c.flush()
    assert c.sent == 3
    await asyncio.to_thread(lambda: [c.emit(release="before-close") for _ in range(2)])
    await c.close()
    assert (c.sent, c.dropped) == (5, 0)


async def test_emit_after_close_is_counted_and_logged_once(
        bus: Bus, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    # Before: it returned False and counted the event in `dropped`, and nothing was logged.
    async with client(settings) as c:
        assert c.emit()
    with caplog.at_level(logging.WARNING, logger="lockgate.client"):
        assert not c.emit() and not c.emit()
        assert not await asyncio.to_thread(c.emit)  # from another thread alike
    assert c.dropped == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "lockgate.client"]
    assert len(warnings) == 1 and "emit() after close()" in warnings[0] and "make a new Client" in warnings[0]
