"""The SDK against a nats-server that hangs (SIGSTOP: its connections stay open, nothing answers) while a batch is
published (probe p72 F2): a batch it gives up on under `max_attempts` was sent, and is stored once the server runs
again, so it is counted `unconfirmed` and logged "not confirmed ... may be stored", never `failed` and "not
published" (an application re-sending its "failed" events under new ids had them billed twice)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest

from lockgate.bus import Bus
from lockgate.client import Client
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.server.natsserver import NatsServer
from lockgate.signing import trust_file_path
from lockgate.subjects import Subjects
from tests.helpers import hang

pytestmark = pytest.mark.timeout(90)

EVENTS = 50  # one batch, one message


async def test_a_batch_given_up_on_a_hung_bus_is_counted_unconfirmed_not_failed_and_is_stored_once(
        tmp_path: Path, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    server = NatsServer(tmp_path / "js")
    await server.start()
    assert server.proc is not None
    pid = server.proc.pid
    bus = Bus(server.url, Subjects(settings.prefix), name="test")
    await bus.connect()  # the streams
    c = Client(server.url, prefix=settings.prefix, app="shop", max_attempts=2, flush_interval_s=60,
               trust_file=str(trust_file_path(settings)))
    try:
        await c.start()
        await hang(pid)
        ids = [InferenceEvent(tenant="default", app="shop", model="m").id for _ in range(EVENTS)]
        for event_id in ids:
            assert c.emit(id=event_id, model="m", input_tokens=3, output_tokens=2)
        with caplog.at_level(logging.WARNING, logger="lockgate.outbox"):
            await c.flush()  # both attempts time out: given up
        os.kill(pid, signal.SIGCONT)
        assert (c.sent, c.failed, c.dropped) == (0, 0, 0)  # before: (0, 50, 0)
        assert c.unconfirmed == EVENTS
        said = [r.getMessage() for r in caplog.records if r.name == "lockgate.outbox"]
        assert [m for m in said if f"{EVENTS} inference events" in m and "not confirmed" in m
                and "may be stored" in m], said
        assert not [m for m in said if "not published" in m], said

        # Sent, they are stored once the server runs again: the fetch waits for the server to store them.
        stream = bus.subjects.streams["inference"].name
        sub = await bus.js.pull_subscribe(bus.subjects.inference_all, stream=stream)
        msgs = await sub.fetch(1, timeout=30)
        stored = Codec(list[InferenceEvent]).decode(msgs[0].data)
        assert sorted(e.id for e in stored) == sorted(ids)
        assert (await bus.js.stream_info(stream)).state.messages == 1
    finally:
        os.kill(pid, signal.SIGCONT)  # again, if a failure came first: harmless on a running process
        await c.close()
        await bus.close()
        server.stop()
