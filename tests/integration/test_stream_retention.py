"""The inference stream's byte limit bounds the backlog its consumers have not taken, not the traffic they took
(interest retention), on a real nats-server through the runtime's bus and consumer edge. Before, every stream kept
its messages until they expired (7 days): a probe's 2 GiB of valid events, each consumed at once, filled the stream,
and it then refused every producer although no consumer had anything pending."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import aiohttp
import pytest
from nats.js.api import RetentionPolicy

from lockgate.bus import Bus, Delivery, consume
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.errors import BusUnavailable
from lockgate.server.health import HealthServer
from lockgate.server.service import Progress
from lockgate.subjects import Subjects

pytestmark = pytest.mark.timeout(60)

MAX_BYTES = 64 * 1024
PROMPT = "x" * 5000  # about 5.3 kB a message: twelve fill the stream


@pytest.fixture
async def small(settings: Settings, bus: Bus) -> AsyncIterator[Bus]:
    """A bus whose inference stream holds MAX_BYTES (the test's prefix; `bus` deletes the streams after)."""
    subjects = Subjects(settings.prefix)
    subjects.streams["inference"] = dataclasses.replace(subjects.streams["inference"], max_bytes=MAX_BYTES)
    b = Bus(settings.nats_url, subjects, name="small")
    await b.connect()
    yield b
    await b.close()


def readers(bus: Bus) -> dict[str, Progress]:
    """The inference stream's consumers, as the sink, evaluator, drift monitor and cost service run them (their
    durable names, the runtime's consumer edge): each counts the messages it took."""
    taken: dict[str, Progress] = {}
    for durable in bus.subjects.streams["inference"].readers:
        done = taken[durable] = Progress()

        async def handle(value: object, delivery: Delivery, done: Progress = done) -> None:
            await done.bump()

        consume(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference", durable=durable,
                wire_type=list[InferenceEvent] | InferenceEvent, origin="test", handler=handle)
    return taken


async def publish(bus: Bus) -> None:
    await bus.publish(bus.subjects.inference("shop"), InferenceEvent(app="shop", model="m", prompt=PROMPT))


async def test_a_stream_filled_with_events_its_consumers_took_accepts_new_ones(small: Bus) -> None:
    taken = readers(small)
    await small.start()
    sent = 0
    for _ in range(8):  # 32 messages, 170 kB: 2.6 times the stream's limit, a third of it at a time
        for _ in range(4):
            await publish(small)  # before: BusUnavailable (maximum bytes exceeded) from the 13th on
            sent += 1
        for done in taken.values():
            await done.wait_for(sent)
    assert await small.full_streams() == []


async def test_an_unconsumed_backlog_is_refused_never_dropped_and_accepted_again_once_taken(
        small: Bus, settings: Settings) -> None:
    accepted = 0
    with pytest.raises(BusUnavailable):  # discard new: the publisher is told, and keeps its events to retry
        for _ in range(30):
            await publish(small)
            accepted += 1
    stream = small.subjects.streams["inference"].name
    assert 0 < accepted < 13 and (await small.js.stream_info(stream)).state.messages == accepted  # none dropped
    assert [s["stream"] for s in await small.full_streams()] == [stream]
    health = HealthServer(lambda: [small], "127.0.0.1", 0)
    url = await health.start()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/readyz") as resp:
            body = await resp.json()
        assert [s["stream"] for s in body["streams_full"]] == [stream], body
    finally:
        await health.stop()

    taken = readers(small)  # the services come (back): each takes every event kept for it
    await small.start()
    for done in taken.values():
        await done.wait_for(accepted)
    await publish(small)


async def test_a_stream_made_with_limits_retention_is_changed_in_place(small: Bus) -> None:
    # A home made before: its inference stream kept consumed events. The next start changes it in place; what
    # every consumer took goes, what one has not taken stays.
    stream = small.subjects.streams["inference"].name
    config = (await small.js.stream_info(stream)).config
    await small.js.update_stream(config.evolve(retention=RetentionPolicy.LIMITS))
    await publish(small)
    await publish(small)
    for durable in small.subjects.streams["inference"].readers:
        sub = await small.js.pull_subscribe_bind(durable, stream)
        for msg in await sub.fetch(2, timeout=5):
            await msg.ack_sync()
    await publish(small)
    assert (await small.js.stream_info(stream)).state.messages == 3
    await small.ensure_topology()
    info = await small.js.stream_info(stream)
    assert (info.config.retention, info.state.messages) == (RetentionPolicy.INTEREST, 1)
