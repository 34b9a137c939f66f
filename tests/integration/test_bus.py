"""The bus against a real nats-server: topology, idempotent publish, DLQ on bad input."""

from __future__ import annotations

import asyncio

import pytest
from nats.js.api import DiscardPolicy
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from lockgate.bus import Bus, Delivery, consume
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import DeadLetter, InferenceEvent
from lockgate.server.natsserver import NatsServer
from lockgate.subjects import Subjects
from tests.helpers import dead_letters, delete_topology, metric_points

pytestmark = pytest.mark.timeout(60)


async def test_topology_is_idempotent(bus: Bus) -> None:
    await bus.ensure_topology()
    await bus.ensure_topology()
    info = await bus.js.stream_info(bus.subjects.streams["inference"].name)
    assert info.config.subjects == [f"{bus.subjects.prefix}.inference.>"]


async def test_a_store_the_server_failed_to_create_once_is_declared_again(
        nats_server: NatsServer, settings: Settings) -> None:
    # CI met nats-server's "error creating store for stream" (10049) once among thousands of declarations, and a
    # service failed to start. A file where the stream's directory belongs makes the server fail the same way; it
    # removes what it half made, so the next declaration passes.
    subjects = Subjects(settings.prefix)
    streams = nats_server.store_dir / "jetstream" / "$G" / "streams"
    streams.mkdir(parents=True, exist_ok=True)
    (streams / subjects.streams["inference"].name).write_text("in the way")
    bus = Bus(settings.nats_url, subjects, name="test")
    try:
        await bus.connect()
        info = await bus.js.stream_info(subjects.streams["inference"].name)
        assert info.config.subjects == [f"{settings.prefix}.inference.>"]
    finally:
        await bus.close()
        await delete_topology(settings)


async def test_every_stream_has_its_age_bytes_and_discard_limits(bus: Bus) -> None:
    for spec in bus.subjects.streams.values():
        cfg = (await bus.js.stream_info(spec.name)).config
        assert (cfg.max_age, cfg.max_bytes, DiscardPolicy(cfg.discard)) == (spec.max_age_s, spec.max_bytes,
                                                                            DiscardPolicy(spec.discard))
    # Unconsumed events are refused, never dropped, when the stream is full; only spans, the events stream's
    # history (which one identity could otherwise fill for every other: test_events_limits.py) and cost records
    # (which any application's inference makes: test_cost_stream.py), go oldest first.
    assert {n for n, s in bus.subjects.streams.items() if s.discard == "old"} == {"telemetry", "events", "cost"}


async def test_same_event_published_twice_is_stored_once_by_jetstream(bus: Bus) -> None:
    e = InferenceEvent(app="shop", model="m")
    a1 = await bus.publish(bus.subjects.inference("shop"), e)
    a2 = await bus.publish(bus.subjects.inference("shop"), e)
    assert a2.duplicate and not a1.duplicate
    info = await bus.js.stream_info(bus.subjects.streams["inference"].name)
    assert info.state.messages == 1


@pytest.mark.parametrize(
    ("payload", "reason_part"),
    [
        (b"{not json", "malformed"),
        (b'{"type":"lockgate.inference","app":"x","input_tokens":"many"}', "$.input_tokens"),
        (b'{"type":"lockgate.nonsense","app":"x"}', "unknown event type"),
    ],
)
async def test_bad_input_goes_to_dlq_and_consumer_keeps_going(bus: Bus, payload: bytes, reason_part: str, metric_reader: InMemoryMetricReader) -> None:
    good: asyncio.Queue[InferenceEvent] = asyncio.Queue()

    async def handle(value: InferenceEvent, delivery: Delivery) -> None:
        await good.put(value)

    consume(
        bus,
        bus.consumers,
        subject=bus.subjects.inference_all,
        stream="inference",
        durable=bus.subjects.durable("test", "inference"),
        wire_type=InferenceEvent,
        origin="test",
        handler=handle,
    )
    dlq_codec: Codec[DeadLetter] = Codec(DeadLetter)
    sub = await bus.nc.subscribe(bus.subjects.dlq_all)
    await bus.start()
    await bus.publish(bus.subjects.inference("x"), payload, msg_id="bad-1")
    ok = InferenceEvent(app="x")
    await bus.publish(bus.subjects.inference("x"), ok)

    msg = await sub.next_msg(timeout=10)
    letter = dlq_codec.decode(msg.data)
    assert letter.origin == "test"
    assert letter.payload == payload
    assert reason_part in letter.error
    got = await asyncio.wait_for(good.get(), 10)
    assert got.id == ok.id
    assert dead_letters(metric_reader) == 1
    # only the event that decoded was taken in
    assert metric_points(metric_reader, "lockgate.events.received") == {(("service", "test"),): 1}


async def test_handlers_see_one_message_at_a_time_in_stream_order(bus: Bus) -> None:
    """Messages published before the consumer starts are all waiting at once; stateful handlers
    still see them one by one, in stream order."""
    seen: list[int] = []
    in_flight = 0
    max_in_flight = 0
    done = asyncio.Event()

    async def handle(value: InferenceEvent, delivery: Delivery) -> None:
        nonlocal in_flight, max_in_flight
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        await bus.nc.flush()  # a real I/O round trip inside the handler
        seen.append(value.input_tokens)
        in_flight -= 1
        if len(seen) == 40:
            done.set()

    consume(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference",
            durable=bus.subjects.durable("test", "ordered"), wire_type=InferenceEvent, origin="test",
            handler=handle, batch_size=16)
    for i in range(40):
        await bus.publish(bus.subjects.inference("x"), InferenceEvent(app="x", input_tokens=i))
    await bus.start()
    await asyncio.wait_for(done.wait(), 20)
    assert seen == list(range(40))
    assert max_in_flight == 1


async def test_stored_since_reads_a_subject_from_a_time_to_the_last_message_at_the_call(bus: Bus) -> None:
    stream, s = bus.subjects.streams["events"].name, bus.subjects
    assert [m async for m in bus.stored_since(stream, s.drift_all, 0.0)] == []  # an empty stream
    seqs = []
    for i in range(9):  # drift reports interleaved with other events, as the events stream holds them
        subject = s.drift(f"d{i % 2}") if i % 3 else s.rollout("x")
        seqs.append(((await bus.publish(subject, f"m{i}".encode(), msg_id=f"m{i}")).seq, subject, f"m{i}".encode()))
    drifts = [m for m in seqs if ".drift." in m[1]]
    assert [m async for m in bus.stored_since(stream, s.drift_all, 0.0)] == drifts
    for i, (seq, _, _) in enumerate(seqs):  # from each message's own stored time: it and the later ones
        at = (await bus.js.get_msg(stream, seq)).time.timestamp()
        expected = [m for m in drifts if m[0] >= seq]
        assert [m async for m in bus.stored_since(stream, s.drift_all, at)] == expected, i
    assert [m async for m in bus.stored_since(stream, s.drift("d1"), 0.0)] == [m for m in drifts
                                                                                 if m[1] == s.drift("d1")]
    assert [m async for m in bus.stored_since(stream, s.drift_all, at + 3600)] == []

    read = []
    async for m in bus.stored_since(stream, s.drift_all, 0.0):  # what is stored meanwhile is not read
        if not read:
            await bus.publish(s.drift("d0"), b"later", msg_id="later")
        read.append(m)
    assert read == drifts


async def test_kv_entries_lists_every_live_key_each_time_and_leaves_deleted_ones_out(bus: Bus) -> None:
    bucket = bus.subjects.kv_gitops
    kv = await bus.kv(bucket)
    assert await bus.kv_entries(bucket) == {}
    for i in range(12):
        await kv.put(f"artifact.k{i}", b"v%d" % i)
    await kv.put("artifact.k0", b"newer")
    await kv.delete("artifact.k1")
    await kv.purge("artifact.k2")
    want = {f"artifact.k{i}": b"v%d" % i for i in range(3, 12)} | {"artifact.k0": b"newer"}
    # nats-py's keys() read this bucket as empty now and then (its watcher ended before counting the
    # messages already on their way): read it many times, several at once.
    for _ in range(10):
        assert await asyncio.gather(*(bus.kv_entries(bucket) for _ in range(5))) == [want] * 5
