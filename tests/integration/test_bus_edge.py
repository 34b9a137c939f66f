"""The consumer edge against a real nats-server: nack/retry, batch fallback, concurrency, graceful
stop, and one NATS connection per process. Acks are observed on the wire: JetStream acks are plain
messages on `$JS.ACK.<stream>.<consumer>.>` (empty = ack, `-NAK ...` = nack), so a test sees exactly
what the edge told the server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy, DiscardPolicy
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from lockgate import bus as bus_module
from lockgate import limits as limits_module
from lockgate.bus import Bus, Delivery, consume, consume_batch
from lockgate.codec import Codec
from lockgate.contracts import DeadLetter, InferenceEvent
from lockgate.errors import LockgateError, PayloadTooLarge, Retryable, StoreUnavailable
from lockgate.limits import EventLimits
from lockgate.retry import RetryPolicy
from lockgate.server.natsserver import binary
from lockgate.subjects import Subjects
from tests.helpers import dead_letters, metric_points

pytestmark = pytest.mark.timeout(60)

letters: Codec[DeadLetter] = Codec(DeadLetter)


async def _ack_wire(bus: Bus, durable: str, stream: str = "inference") -> Any:
    """A subscription that sees every ack/nack sent for one durable consumer."""
    return await bus.nc.subscribe(f"$JS.ACK.{bus.subjects.streams[stream].name}.{durable}.>")


async def _settlements(sub: Any, n: int) -> list[str]:
    """The next n settlements on the wire, as 'ack' or 'nak'."""
    out = []
    for _ in range(n):
        data = (await sub.next_msg(timeout=10)).data
        out.append("nak" if data.startswith(b"-NAK") else "ack" if data in (b"", b"+ACK") else data.decode())
    return out


async def test_retryable_twice_then_success_is_processed_once_and_acked(bus: Bus, metric_reader: InMemoryMetricReader) -> None:
    durable = bus.subjects.durable("test", "retry")
    calls: list[int] = []
    processed: list[str] = []

    async def handle(value: InferenceEvent, delivery: Delivery) -> None:
        calls.append(delivery.deliveries)
        if len(calls) <= 2:
            raise Retryable("store busy, try later")
        processed.append(value.id)

    consume(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference", durable=durable,
            wire_type=InferenceEvent, origin="test", handler=handle, max_deliver=5)
    wire = await _ack_wire(bus, durable)
    await bus.start()
    event = InferenceEvent(app="x")
    await bus.publish(bus.subjects.inference("x"), event)

    assert await _settlements(wire, 3) == ["nak", "nak", "ack"]
    assert calls == [1, 2, 3]
    assert processed == [event.id]
    assert dead_letters(metric_reader) == 0


async def test_always_retryable_is_dead_lettered_after_max_deliver(bus: Bus) -> None:
    durable = bus.subjects.durable("test", "exhaust")
    calls: list[int] = []

    async def handle(value: InferenceEvent, delivery: Delivery) -> None:
        calls.append(delivery.deliveries)
        raise Retryable("upstream still down")

    consume(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference", durable=durable,
            wire_type=InferenceEvent, origin="test", handler=handle, max_deliver=3)
    wire = await _ack_wire(bus, durable)
    dlq = await bus.nc.subscribe(bus.subjects.dlq("test"))
    await bus.start()
    event = InferenceEvent(app="x")
    await bus.publish(bus.subjects.inference("x"), event)

    letter = letters.decode((await dlq.next_msg(timeout=10)).data)
    assert letter.reason == "retries exhausted" and letter.deliveries == 3
    assert letter.error == "upstream still down" and b'"app":"x"' in letter.payload
    assert await _settlements(wire, 3) == ["nak", "nak", "ack"]
    assert calls == [1, 2, 3]


async def test_invalid_utf8_is_dead_lettered_and_the_consumer_goes_on(bus: Bus) -> None:
    durable = bus.subjects.durable("test", "utf8")
    good: asyncio.Queue[InferenceEvent] = asyncio.Queue()

    async def handle(value: InferenceEvent, delivery: Delivery) -> None:
        await good.put(value)

    consume(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference", durable=durable,
            wire_type=InferenceEvent, origin="test", handler=handle)
    dlq = await bus.nc.subscribe(bus.subjects.dlq("test"))
    wire = await _ack_wire(bus, durable)
    await bus.start()
    bad = b'{"type":"lockgate.inference","app":"caf\xe9"}'  # latin-1, not UTF-8, inside a string
    await bus.publish(bus.subjects.inference("x"), bad, msg_id="latin-1")
    ok = InferenceEvent(app="x")
    await bus.publish(bus.subjects.inference("x"), ok)

    letter = letters.decode((await dlq.next_msg(timeout=10)).data)
    assert letter.reason == "invalid event" and "UTF-8" in letter.error and letter.payload == bad
    assert (await asyncio.wait_for(good.get(), 10)).id == ok.id
    assert await _settlements(wire, 2) == ["ack", "ack"]


async def test_batch_with_one_poison_item_dead_letters_only_that_message(bus: Bus, metric_reader: InMemoryMetricReader) -> None:
    durable = bus.subjects.durable("test", "batch")
    stored: list[str] = []
    batch_sizes: list[int] = []

    async def write(items: list[tuple[InferenceEvent, Delivery]]) -> None:
        batch_sizes.append(len(items))
        if any(value.app == "poison" for value, _ in items):
            raise LockgateError("column model refuses this row")  # the whole insert fails, nothing stored
        stored.extend(value.id for value, _ in items)

    events = [InferenceEvent(app="poison" if i == 7 else "shop", input_tokens=i) for i in range(20)]
    for e in events:  # all waiting before the consumer starts, so they arrive in one fetch
        await bus.publish(bus.subjects.inference("shop"), e)
    consume_batch(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference", durable=durable,
                  wire_type=InferenceEvent, origin="test", handler=write, batch_size=32)
    dlq = await bus.nc.subscribe(bus.subjects.dlq("test"))
    wire = await _ack_wire(bus, durable)
    await bus.start()

    assert await _settlements(wire, 20) == ["ack"] * 20
    letter = letters.decode((await dlq.next_msg(timeout=10)).data)
    assert letter.reason == "rejected" and b'"app":"poison"' in letter.payload
    assert sorted(stored) == sorted(e.id for e in events if e.app != "poison")
    assert batch_sizes[0] > 1  # one write for many messages, then the fallback one by one
    assert dead_letters(metric_reader) == 1


async def test_batch_is_sized_by_the_rows_its_messages_hold(bus: Bus) -> None:
    durable = bus.subjects.durable("test", "rows")
    rows_per_call: list[int] = []

    async def write(items: list[tuple[list[InferenceEvent], Delivery]]) -> None:
        rows_per_call.append(sum(len(value) for value, _ in items))

    for m in range(6):  # six messages of four events, all waiting before the consumer starts
        await bus.publish(bus.subjects.inference("shop"), [InferenceEvent(app="shop", input_tokens=m * 4 + i)
                                                            for i in range(4)])
    # The age limit is far off: only the row count can close a batch before all six messages are in.
    consume_batch(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference", durable=durable,
                  wire_type=list[InferenceEvent], origin="test", handler=write, batch_size=32, max_wait_s=30,
                  max_rows=10, rows=len)
    wire = await _ack_wire(bus, durable)
    await bus.start()

    assert await _settlements(wire, 6) == ["ack"] * 6
    assert rows_per_call == [12, 12]  # three messages reach 10 rows; one insert each


async def test_batch_that_fails_retryably_is_nacked_whole_and_stored_on_redelivery(bus: Bus, metric_reader: InMemoryMetricReader) -> None:
    durable = bus.subjects.durable("test", "batchretry")
    stored: list[str] = []
    failures = 1

    async def write(items: list[tuple[InferenceEvent, Delivery]]) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise StoreUnavailable("ClickHouse is restarting")
        stored.extend(value.id for value, _ in items)

    events = [InferenceEvent(app="shop", input_tokens=i) for i in range(5)]
    for e in events:
        await bus.publish(bus.subjects.inference("shop"), e)
    consume_batch(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference", durable=durable,
                  wire_type=InferenceEvent, origin="test", handler=write, batch_size=32)
    wire = await _ack_wire(bus, durable)
    await bus.start()

    assert sorted(await _settlements(wire, 10)) == ["ack"] * 5 + ["nak"] * 5
    assert sorted(stored) == sorted(e.id for e in events)
    assert dead_letters(metric_reader) == 0


async def test_unordered_consumer_runs_at_most_max_workers_at_once(bus: Bus) -> None:
    durable = bus.subjects.durable("test", "workers")
    in_flight = peak = 0
    full = asyncio.Event()
    done: list[int] = []
    all_done = asyncio.Event()

    async def handle(value: InferenceEvent, delivery: Delivery) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if in_flight == 4:
            full.set()
        await asyncio.wait_for(full.wait(), 10)  # hold until four run side by side
        in_flight -= 1
        done.append(value.input_tokens)
        if len(done) == 12:
            all_done.set()

    for i in range(12):
        await bus.publish(bus.subjects.inference("x"), InferenceEvent(app="x", input_tokens=i))
    consume(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference", durable=durable,
            wire_type=InferenceEvent, origin="test", handler=handle, batch_size=16, max_workers=4, ordered=False)
    await bus.start()
    await asyncio.wait_for(all_done.wait(), 20)
    assert peak == 4
    assert sorted(done) == list(range(12))


def test_ordered_with_several_workers_is_refused(bus: Bus) -> None:
    async def handler(value: object, delivery: object) -> None:
        return None

    with pytest.raises(ValueError, match="ordered"):
        consume(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference",
                durable=bus.subjects.durable("test", "bad"), wire_type=InferenceEvent, origin="test",
                handler=handler, max_workers=4)


async def test_stop_finishes_the_handler_in_flight_and_acks_it(bus: Bus) -> None:
    durable = bus.subjects.durable("test", "stop")
    stopping: asyncio.Task[None] | None = None
    finished: list[str] = []

    async def handle(value: InferenceEvent, delivery: Delivery) -> None:
        nonlocal stopping
        stopping = asyncio.create_task(bus.stop_consumers())
        await bus.nc.flush()  # a real round trip: the stop begins while this handler still runs
        assert stopping is not None and not stopping.done()
        finished.append(value.id)

    consume(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference", durable=durable,
            wire_type=InferenceEvent, origin="test", handler=handle)
    wire = await _ack_wire(bus, durable)
    await bus.start()
    event = InferenceEvent(app="x")
    await bus.publish(bus.subjects.inference("x"), event)
    assert await _settlements(wire, 1) == ["ack"]
    assert stopping is not None
    await asyncio.wait_for(stopping, 15)
    assert finished == [event.id]


async def test_an_existing_consumer_with_other_fixed_settings_is_kept(bus: Bus) -> None:
    """A durable made by an older build (here: deliver policy `new`) keeps its position."""
    durable = bus.subjects.durable("test", "legacy")
    stream = bus.subjects.streams["inference"].name
    await bus.js.add_consumer(stream, ConsumerConfig(durable_name=durable, deliver_policy=DeliverPolicy.NEW,
                                                     filter_subject=bus.subjects.inference_all))
    got: asyncio.Queue[InferenceEvent] = asyncio.Queue()

    async def handle(value: InferenceEvent, delivery: Delivery) -> None:
        await got.put(value)

    consume(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference", durable=durable,
            wire_type=InferenceEvent, origin="test", handler=handle)
    await bus.start()
    event = InferenceEvent(app="x")
    await bus.publish(bus.subjects.inference("x"), event)
    assert (await asyncio.wait_for(got.get(), 10)).id == event.id
    assert (await bus.js.consumer_info(stream, durable)).config.deliver_policy == DeliverPolicy.NEW


# One connection per process: a nats-server of this test's own, with its monitoring port, so its
# /connz counts the connections of exactly one Bus.

_LISTEN = re.compile(rb"Listening for client connections on ([\d.]+:\d+)")
_MONITOR = re.compile(rb"Starting http monitor on ([\d.]+:\d+)")


@pytest.fixture
async def monitored_server(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """(nats url, monitoring base url) of a fresh nats-server on ports it picked itself."""
    proc = await asyncio.create_subprocess_exec(
        binary(), "-js", "-sd", str(tmp_path / "js"), "-a", "127.0.0.1", "-p", "-1", "-m", "-1",
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )
    assert proc.stderr is not None
    client = monitor = None
    async with asyncio.timeout(20):
        while True:
            line = await proc.stderr.readline()
            assert line, "nats-server exited during start"
            if m := _LISTEN.search(line):
                client = m.group(1).decode()
            if m := _MONITOR.search(line):
                monitor = m.group(1).decode()
            if b"Server is ready" in line:
                break
    # Keep reading stderr so the server never blocks on a full pipe.
    drain = asyncio.create_task(proc.stderr.read())
    assert client and monitor
    try:
        yield f"nats://{client}", f"http://{monitor}"
    finally:
        proc.terminate()
        await proc.wait()
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain


async def test_a_bus_with_consumers_holds_one_connection(monitored_server: tuple[str, str]) -> None:
    url, monitor = monitored_server
    bus = Bus(url, Subjects("one"), name="one-process")
    await bus.connect()
    handled = asyncio.Event()

    async def handle(value: Any, delivery: Delivery) -> None:
        handled.set()

    async def write(items: list[tuple[Any, Delivery]]) -> None:
        handled.set()

    async def respond(msg: Any) -> None:
        await msg.respond(b"pong")

    s = bus.subjects
    consume(bus, bus.consumers, subject=s.inference_all, stream="inference", durable=s.durable("t", "ordered"),
            wire_type=InferenceEvent, origin="t", handler=handle)
    consume(bus, bus.consumers, subject=s.rollout_all, stream="events", durable=s.durable("t", "workers"),
            wire_type=InferenceEvent, origin="t", handler=handle, max_workers=3, ordered=False)
    consume_batch(bus, bus.consumers, subject=s.inference_all, stream="inference", durable=s.durable("t", "batch"),
                  wire_type=InferenceEvent, origin="t", handler=write)
    try:
        await bus.start()
        await (await bus.kv(s.kv_routes)).put("k", b"v")  # KV, publish and request/reply share it too
        await bus.nc.subscribe(s.query, cb=respond)
        assert (await bus.nc.request(s.query, b"ping", timeout=5)).data == b"pong"
        await bus.publish(s.inference("x"), InferenceEvent(app="x"))
        await asyncio.wait_for(handled.wait(), 10)

        async with aiohttp.ClientSession() as http, http.get(f"{monitor}/connz?subs=1") as resp:
            connz = await resp.json()
        assert connz["num_connections"] == 1
        (conn,) = connz["connections"]
        assert conn["name"] == "one-process"
        # the three pull-consumer inboxes (the request mux is the wildcard one) and the query responder
        assert sum(sub.startswith("_INBOX.") and "*" not in sub for sub in conn["subscriptions_list"]) == 3
        assert s.query in conn["subscriptions_list"]
    finally:
        await bus.close()


@pytest.fixture
def quick_nacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Redeliveries within milliseconds, so a test sees many of them."""
    monkeypatch.setattr(bus_module, "NACK_BACKOFF", RetryPolicy(initial_s=0.01, max_s=0.05))
    monkeypatch.setattr(bus_module, "LETTER_BACKOFF", RetryPolicy(initial_s=0.01, max_s=0.05))


async def _refusing_dlq(bus: Bus) -> Callable[[], Awaitable[None]]:
    """Make the DLQ stream refuse every publish (full, discard new); returns what makes it take them again."""
    name = bus.subjects.streams["dlq"].name
    config = (await bus.js.stream_info(name)).config
    await bus.js.update_stream(config.evolve(max_msgs=1, discard=DiscardPolicy.NEW))
    await bus.publish(bus.subjects.dlq("filler"), b"{}", msg_id="filler")

    async def restore() -> None:
        await bus.js.update_stream(config.evolve(max_msgs=-1))
    return restore


async def test_a_message_whose_letter_the_dlq_refuses_is_redelivered_until_stored(
        bus: Bus, quick_nacks: None, metric_reader: InMemoryMetricReader) -> None:
    # The probe: with the DLQ full, 10 valid events and a far-future one in one message were nacked before
    # their handler ran, then dropped by JetStream after max_deliver+1 deliveries: never stored, no letter.
    durable = bus.subjects.durable("test", "dlqfull")
    handled: asyncio.Queue[list[str]] = asyncio.Queue()

    async def handle(value: list[InferenceEvent], delivery: Delivery) -> None:
        await handled.put([e.session_id for e in value])

    consume(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference", durable=durable,
            wire_type=list[InferenceEvent] | InferenceEvent, origin="test", handler=handle, max_deliver=2,
            limits=EventLimits())
    restore = await _refusing_dlq(bus)
    stored_letters = await bus.js.subscribe(bus.subjects.dlq("test"), ordered_consumer=True)
    wire = await _ack_wire(bus, durable)
    await bus.start()
    valid = [InferenceEvent(app="x", session_id=f"v{i}") for i in range(10)]
    far = InferenceEvent(app="x", session_id="far", time=datetime.now(UTC) + timedelta(days=30))
    await bus.publish(bus.subjects.inference("x"), [*valid, far])

    # The valid events are handled at once, and the message comes back past max_deliver (2) while its letter fails.
    for _ in range(5):
        assert await asyncio.wait_for(handled.get(), 10) == [e.session_id for e in valid]
    assert metric_points(metric_reader, "lockgate.dead_letters.failed") and dead_letters(metric_reader) == 0
    await restore()
    letter = letters.decode((await stored_letters.next_msg(timeout=10)).data)
    assert letter.reason == "over limits" and "after now" in letter.error
    assert [e.session_id for e in Codec(list[InferenceEvent]).decode(letter.payload)] == ["far"]
    while (settled := await _settlements(wire, 1)) != ["ack"]:
        assert settled == ["nak"]
    assert dead_letters(metric_reader) == 1


async def test_a_cut_letter_whose_original_the_full_bucket_refuses_goes_without_it(bus: Bus) -> None:
    # The probe: with the originals bucket full, every undecodable message over 256 KiB was nacked for ever (no
    # letter without its whole original); about 440 of them took every delivery of the sink's inference consumer, and
    # no tenant's events were stored. A bucket stays full for weeks: the letter now goes, saying what was lost.
    durable = bus.subjects.durable("test", "originals")
    consume(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference", durable=durable,
            wire_type=list[InferenceEvent] | InferenceEvent, origin="test", handler=_never_called, limits=EventLimits())
    bucket = f"OBJ_{bus.subjects.object_dead_letters}"
    config = (await bus.js.stream_info(bucket)).config
    await bus.js.update_stream(config.evolve(max_bytes=64 * 1024))  # full: refuses its first 128 KiB chunk
    stored_letters = await bus.js.subscribe(bus.subjects.dlq("test"), ordered_consumer=True)
    wire = await _ack_wire(bus, durable)
    await bus.start()
    body = b"\x00" + b"password=hunter2hunter2 " + b"x" * (bus_module.MAX_LETTER_PAYLOAD * 2)
    await bus.publish(bus.subjects.inference("x"), body, msg_id="big-garbage")

    assert await _settlements(wire, 1) == ["ack"]  # before: nak, nak, nak... until the bucket had room
    letter = letters.decode((await stored_letters.next_msg(timeout=10)).data)
    assert letter.cut_from == len(body) and letter.original == ""
    assert len(letter.payload) == bus_module.MAX_LETTER_PAYLOAD and b"hunter2" not in letter.payload
    assert "original was NOT kept" in letter.error and "maximum bytes exceeded" in letter.error, letter.error
    assert (await bus.js.stream_info(bucket)).state.messages == 0  # the refused put left nothing behind

    # Room again: the next one's whole original is kept, and its letter names it.
    await bus.js.update_stream(config)
    await bus.publish(bus.subjects.inference("x"), body + b"2", msg_id="big-garbage-2")
    assert await _settlements(wire, 1) == ["ack"]
    kept = letters.decode((await stored_letters.next_msg(timeout=10)).data)
    whole = await bus.original(kept.original)
    assert whole is not None and whole.endswith(b"x2") and b"hunter2" not in whole
    assert whole[:bus_module.MAX_LETTER_PAYLOAD] == kept.payload
    # Stored once (its 128 KiB chunks and their metadata).
    assert (await bus.js.stream_info(bucket)).state.messages == -(-len(whole) // (128 * 1024)) + 1


async def test_a_message_whose_letter_waits_comes_back_ever_later_and_is_warned_about_once(
        bus: Bus, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The probe: each of 440 messages whose letter could not be stored came back every 30 s at most, re-scrubbed and
    # re-tried, half a core and 13,191 warnings in 15 minutes. The delay now grows with the deliveries (to minutes:
    # here to milliseconds, without jitter, to read it off the wire), and the log says it once per message.
    monkeypatch.setattr(bus_module, "LETTER_BACKOFF", RetryPolicy(initial_s=0.02, max_s=10.0, jitter=False),
                        raising=False)
    durable = bus.subjects.durable("test", "waits")
    consume(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference", durable=durable,
            wire_type=list[InferenceEvent] | InferenceEvent, origin="test", handler=_never_called, limits=EventLimits())
    restore = await _refusing_dlq(bus)
    wire = await _ack_wire(bus, durable)
    caplog.set_level(logging.DEBUG, logger="lockgate.bus")
    await bus.start()
    await bus.publish(bus.subjects.inference("x"), b"{broken", msg_id="broken")

    delays = []
    for _ in range(5):
        data = (await wire.next_msg(timeout=10)).data
        assert data.startswith(b"-NAK"), data
        delays.append(json.loads(data[len(b"-NAK"):])["delay"] / 1e9)
    assert delays == pytest.approx([0.02, 0.04, 0.08, 0.16, 0.32])
    assert bus.letters_waiting == 1
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "not stored" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]

    await restore()
    while (settled := await _settlements(wire, 1)) != ["ack"]:
        assert settled == ["nak"]
    assert bus.letters_waiting == 0


async def test_a_message_every_consumer_refuses_makes_one_letter(bus: Bus) -> None:
    # Sink, cost, drift and evaluator each lettered the same garbage: 4 letters of 340 kB per 256 KiB message.
    names = ("one", "two", "three")
    wires = [await _ack_wire(bus, bus.subjects.durable("test", n)) for n in names]
    for n in names:
        consume(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference",
                durable=bus.subjects.durable("test", n), wire_type=list[InferenceEvent] | InferenceEvent, origin=n,
                handler=_never_called, limits=EventLimits())
    await bus.start()
    await bus.publish(bus.subjects.inference("x"), b"\x00" + bytes(range(256)) * 64, msg_id="garbage")
    for wire in wires:
        assert await _settlements(wire, 1) == ["ack"]
    assert (await bus.js.stream_info(bus.subjects.streams["dlq"].name)).state.messages == 1


async def _never_called(value: Any, delivery: Delivery) -> None:
    raise AssertionError(f"handler called with {value!r}")


class _ReadLate(datetime):
    """The clock of a consumer that reads a message 1.5 s after it was stored (behind, or redelivered)."""

    @classmethod
    def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
        return datetime.now(tz) + timedelta(seconds=1.5)


async def test_event_times_are_judged_at_the_time_the_message_was_stored(bus: Bus,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A consumer reading a message later than another (behind, or redelivered) refused an event the first
    # stored: 30 days minus a second was stored by the sink and refused by cost 1.5 s later.
    limits = EventLimits(past_s=2.0)
    edge = InferenceEvent(app="x", time=datetime.now(UTC) - timedelta(seconds=1))
    await bus.publish(bus.subjects.inference("x"), [edge])
    monkeypatch.setattr(limits_module, "datetime", _ReadLate)  # read by its clock, the event is over 2 s old
    got: asyncio.Queue[str] = asyncio.Queue()

    async def handle(value: list[InferenceEvent], delivery: Delivery) -> None:
        await got.put(value[0].id)

    consume(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference",
            durable=bus.subjects.durable("test", "late"), wire_type=list[InferenceEvent] | InferenceEvent,
            origin="test", handler=handle, limits=limits)
    await bus.start()
    assert await asyncio.wait_for(got.get(), 10) == edge.id


async def _letters_of(bus: Bus, name: str, *payloads: bytes) -> list[DeadLetter]:
    """The dead letters of these inference messages, each published in turn to a consumer that stores nothing."""
    consume(bus, bus.consumers, subject=bus.subjects.inference_all, stream="inference",
            durable=bus.subjects.durable("test", name), wire_type=list[InferenceEvent] | InferenceEvent,
            origin="test", handler=_never_called)
    dlq = await bus.nc.subscribe(bus.subjects.dlq("test"))
    await bus.start()
    out = []
    for i, payload in enumerate(payloads):
        await bus.publish(bus.subjects.inference("x"), payload, msg_id=f"{name}-{i}")
        out.append(letters.decode((await dlq.next_msg(timeout=10)).data))
    return out


async def test_invalid_utf8_outside_the_known_fields_is_dead_lettered(bus: Bus) -> None:
    # msgspec skips unknown fields unread: "mo\xc3del" was stored as an event whose model was empty.
    got = await _letters_of(bus, "utf8key", b'[{"type":"lockgate.inference","app":"x","mo\xc3del":"y"}]',
                            b'[{"type":"lockgate.inference","app":"x","extra":"\xff"}]')
    # Each in an array, the event is refused alone: the byte is counted in the event, named by its index.
    for letter, offset in zip(got, (42, 48), strict=True):
        assert letter.reason == "invalid event" and "not valid UTF-8" in letter.error
        assert letter.error.endswith(f"at byte {offset} - at `$[0]`")


async def test_a_lone_surrogate_escape_is_dead_lettered_saying_so(bus: Bus) -> None:
    # msgspec says "Input data was truncated" of whole JSON holding `\ud800` with no low half (probe s1): the letter
    # sent an operator looking for a cut message.
    (letter,) = await _letters_of(bus, "surrogate", b'[{"type":"lockgate.inference","app":"x","prompt":"\\ud800"}]')
    assert letter.reason == "invalid event" and "lone UTF-16 surrogate escape (\\ud800 at byte 50)" in letter.error
    assert "truncated" not in letter.error


async def test_a_message_over_max_payload_is_a_permanent_error(bus: Bus) -> None:
    # Mapped to BusUnavailable, it was retried as if NATS were down, and its message dead-lettered
    # "retries exhausted" at last: the same bytes are refused every time.
    with pytest.raises(PayloadTooLarge, match="max_payload") as refused:
        await bus.publish(bus.subjects.inference("x"), b"x" * (bus.nc.max_payload + 1), msg_id="too-large")
    assert not isinstance(refused.value, Retryable)
