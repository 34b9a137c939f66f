"""The SDK where an application first meets it going wrong: no NATS at the URL, emits from a worker thread,
a credential revoked while it runs, emits after close, and a NATS without lockgate's streams."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from lockgate.bus import Bus
from lockgate.client import Client
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.errors import BusUnavailable
from lockgate.server.natsserver import NatsServer
from lockgate.server.runtime import Runtime
from lockgate.subjects import Subjects
from tests.integration import test_app_credentials
from tests.integration.test_app_credentials import app_credential
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


class Seen(logging.Handler):
    """Log records of one logger, and a wait for the first that says `text`."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._said: dict[str, threading.Event] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        for text, said in self._said.items():
            if text in record.getMessage():
                said.set()

    async def said(self, text: str, timeout_s: float = 20.0) -> None:
        said = self._said.setdefault(text, threading.Event())
        if any(text in r.getMessage() for r in self.records):
            return
        assert await asyncio.to_thread(said.wait, timeout_s), f"nothing logged saying {text!r}"

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


# An embedded stack as `lockgate up` runs it, whose nats-server applies app credentials at once.
stack = test_app_credentials.stack


@pytest.fixture
def seen() -> Any:
    handler = Seen()
    loggers = [logging.getLogger(name) for name in ("lockgate.client", "lockgate.outbox")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


async def test_a_credential_revoked_mid_run_is_said_once_and_close_keeps_to_its_bound(
        stack: Runtime, seen: Seen) -> None:
    # Before: the refusal was logged at DEBUG only, emits kept returning True, decision() answered after 34 s
    # with "is the gateway service running", the failed events were put down to a TimeoutError, and close()
    # took 14.1 s with close_timeout_s=10 (11.5 s with 5).
    created = await app_credential(stack, "create", "--tenant", "acme", "--app", "shop", "--json")
    assert created.exit_code == 0, created.output
    secret = json.loads(await asyncio.to_thread(Path(json.loads(created.output)["file"]).read_text))
    c = Client(stack.settings.nats_url, prefix=stack.ctx.bus.subjects.prefix, app="shop", tenant="acme",
               user=secret["user"], password=secret["password"], close_timeout_s=2)
    await c.start()
    c.emit()
    await c.flush()
    assert c.sent == 1
    revoked = await app_credential(stack, "revoke", "--tenant", "acme", "--app", "shop")
    assert revoked.exit_code == 0, revoked.output
    await seen.said("refused this application's credentials")
    for _ in range(5):
        assert c.emit()
    started = time.monotonic()
    with pytest.raises(BusUnavailable, match="refused this application's credentials"):
        await c.decision("shop-v1")
    assert time.monotonic() - started < 2
    started = time.monotonic()
    await c.close()
    took = time.monotonic() - started
    assert took < 2.5, f"close() took {took:.1f}s with close_timeout_s=2"
    assert (c.sent, c.failed) == (1, 5)
    errors = [m for m in seen.at(logging.ERROR) if m.startswith("lockgate-sdk: NATS at")]
    assert len(errors) == 1, seen.at(logging.ERROR)  # once, though nats-py retries (and is refused) every 2 s
    failed = [m for m in seen.at(logging.WARNING) + seen.at(logging.ERROR) if "counted failed" in m]
    assert failed and all("refused this application's credentials" in m for m in failed), failed


async def test_a_nats_without_lockgates_streams_is_named_in_one_warning(
        tmp_path: Path, settings: Settings, seen: Seen) -> None:
    # Before: start() succeeded, flush() waited for ever and nothing was logged until close().
    server = NatsServer(tmp_path / "js")  # a plain nats-server with JetStream: no lockgate stack on it
    await server.start()
    try:
        c = Client(server.url, prefix=settings.prefix, app="shop", close_timeout_s=1, flush_interval_s=0.01)
        await c.start()
        assert c.emit()
        await seen.said("nothing answers publishes on")
        assert c.emit() and c.emit()
        await c.close()
        assert (c.sent, c.failed) == (0, 3)
        warnings = [m for m in seen.at(logging.WARNING) if "nothing answers publishes" in m]
        assert len(warnings) == 1, warnings
        subject = Subjects(settings.prefix).inference("shop")
        assert (f"nothing answers publishes on {subject} at NATS {server.url} (no stream captures it): "
                f"is it a lockgate stack with prefix {settings.prefix!r}?") in warnings[0]
    finally:
        server.stop()


async def test_a_bus_that_stops_answering_after_it_did_is_said_restarting_not_misconfigured(
        tmp_path: Path, settings: Settings, seen: Seen) -> None:
    # Before (probe p4): when nats-server restarted, the SDK reconnected before the gateway subscribed again and
    # logged "is it a lockgate stack with prefix 'lg'?" of a stack that had acknowledged its events a second before.
    server = NatsServer(tmp_path / "js")
    await server.start()
    subject = Subjects(settings.prefix).inference("shop")
    nc = await nats.connect(server.url)
    try:
        await nc.jetstream().add_stream(name="captures", subjects=[subject])
        c = Client(server.url, prefix=settings.prefix, app="shop", close_timeout_s=1, flush_interval_s=0.01)
        await c.start()
        assert c.emit()
        await c.flush()
        assert c.sent == 1  # this stack and prefix answer
        await nc.jetstream().delete_stream("captures")  # then nothing does, as while the bus restarts
        assert c.emit()
        await seen.said("nothing answers publishes on")
        await c.close()
        assert (c.sent, c.failed) == (1, 1)
        warnings = [m for m in seen.at(logging.WARNING) if "nothing answers publishes" in m]
        assert len(warnings) == 1, warnings
        assert (f"nothing answers publishes on {subject} at NATS {server.url} any more, though it did before: the bus "
                "is restarting or unreachable, or the stream capturing them is not back yet") in warnings[0], warnings
        assert "is it a lockgate stack" not in warnings[0]
    finally:
        await nc.close()
        server.stop()


async def test_emit_after_the_clients_loop_ended_is_refused_not_raised_or_stranded(
        bus: Bus, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    # Found by a probe (p10): on the thread that started the client, after its loop ended, emit() buffered the event
    # and raised RuntimeError('no running event loop'); inside a new loop it returned True and the event was never
    # published. Either way the event is now refused, counted in `dropped`, and said once.
    def app() -> tuple[Client, bool, bool]:
        c = client(settings)
        asyncio.run(c.start())  # the loop ends with the client never closed

        async def in_another_loop() -> bool:
            return c.emit(model="m")
        return c, c.emit(model="m"), asyncio.run(in_another_loop())

    with caplog.at_level(logging.WARNING, logger="lockgate.client"):
        c, after, elsewhere = await asyncio.to_thread(app)
    assert (after, elsewhere, c.dropped, c.pending) == (False, False, 2, 0)
    assert len([r for r in caplog.records if "no longer running" in r.getMessage()]) == 1
