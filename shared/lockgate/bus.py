"""The NATS edge: broker factory, topology, publish with idempotency headers, consumers with DLQ."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from faststream import AckPolicy
from faststream.nats import JStream, NatsBroker, NatsMessage, NatsRouter, PullSub
from nats.js.api import ConsumerConfig, StorageType, StreamConfig

from lockgate import metrics, telemetry
from lockgate.codec import Codec, encode
from lockgate.contracts import DeadLetter, Event
from lockgate.errors import BusUnavailable, InvalidEvent, LockgateError, Retryable
from lockgate.ids import batch_id
from lockgate.subjects import Subjects

log = logging.getLogger("lockgate.bus")


@dataclass
class Delivery:
    """What a handler may know about the message it is processing."""

    subject: str
    msg_id: str
    headers: dict[str, str]
    deliveries: int
    stream_seq: int
    trace_context: Any = None
    # Resets JetStream's ack_wait timer; long handlers (an eval run) call it as a heartbeat.
    in_progress: Callable[[], Awaitable[None]] | None = None


@dataclass
class BusStats:
    """In-process counters (dead letters are also an OTel metric and, per origin, `lockgate status`)."""

    dead_letters: int = 0


class Bus:
    """One process's connection to NATS: FastStream broker for consumers, nats-py for the rest."""

    def __init__(self, url: str, subjects: Subjects | None = None, *, name: str = "lockgate") -> None:
        self.url = url
        self.subjects = subjects or Subjects()
        self.name = name
        # FastStream logs every message at INFO; at 100k events/s that is the bottleneck.
        self.servers = [u.strip() for u in url.split(",") if u.strip()]  # a cluster: comma-separated URLs
        self.broker = NatsBroker(self.servers, logger=None, graceful_timeout=10.0)
        self.nc: nats.NATS | None = None
        self.js: Any = None
        self.stats = BusStats()

    async def connect(self) -> None:
        """Connect, then create streams, KV buckets and the object store (idempotent)."""
        try:
            self.nc = await nats.connect(
                self.servers, name=self.name, max_reconnect_attempts=-1, connect_timeout=5, allow_reconnect=True
            )
        except (OSError, nats.errors.Error) as exc:
            raise BusUnavailable(f"cannot reach NATS at {self.url}: {exc}") from None
        self.js = self.nc.jetstream()
        await self.ensure_topology()

    async def start(self) -> None:
        """Connect and start every included router's consumers."""
        if self.nc is None:
            await self.connect()
        await self.broker.start()

    async def close(self) -> None:
        """Stop consumers (finishing in-flight handlers), then drain the publisher connection."""
        await self.broker.stop()
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.drain()

    async def ensure_topology(self) -> None:
        """Declare every stream and bucket from subjects.py; safe to run any number of times."""
        for spec in self.subjects.streams.values():
            cfg = StreamConfig(
                name=spec.name,
                subjects=list(spec.subjects),
                storage=StorageType.FILE,
                max_age=spec.max_age_s,
                duplicate_window=spec.duplicate_window_s,
            )
            try:
                await self.js.add_stream(cfg)
            except nats.js.errors.BadRequestError:
                await self.js.update_stream(cfg)
        for bucket in (self.subjects.kv_gates, self.subjects.kv_routes, self.subjects.kv_keys, self.subjects.kv_drift):
            await self.js.create_key_value(bucket=bucket, history=10)
        # Cached upstream responses expire so a stale answer never outlives a model update for long.
        await self.js.create_key_value(bucket=self.subjects.kv_eval_cache, history=1, ttl=7 * 24 * 3600)
        await self.js.create_object_store(bucket=self.subjects.object_store)

    async def kv(self, bucket: str) -> Any:
        """A KV bucket handle (created at connect)."""
        return await self.js.key_value(bucket)

    async def objects(self) -> Any:
        """The content-addressed artifact object store."""
        return await self.js.object_store(self.subjects.object_store)

    async def publish(
        self,
        subject: str,
        payload: Event | Sequence[Event] | bytes,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """Publish to JetStream with Nats-Msg-Id (dedup) and the current traceparent; returns the PubAck."""
        if isinstance(payload, bytes):
            data = payload
        else:
            data = encode(payload)
            if msg_id is None:
                msg_id = payload.id if isinstance(payload, Event) else batch_id(payload)
        hdrs = {**(headers or {})}
        if msg_id:
            hdrs["Nats-Msg-Id"] = msg_id
        telemetry.inject(hdrs)
        try:
            return await self.js.publish(subject, data, headers=hdrs, timeout=5)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"JetStream did not acknowledge publish to {subject}: {exc!r}") from None

    async def dead_letter(
        self,
        origin: str,
        *,
        subject: str,
        payload: bytes,
        reason: str,
        error: str = "",
        headers: dict[str, str] | None = None,
        deliveries: int = 1,
    ) -> None:
        """Send an unprocessable message to `<prefix>.dlq.<origin>` with the reason and original bytes."""
        headers = {k: v for k, v in (headers or {}).items() if not k.lower().startswith("authorization")}
        letter = DeadLetter(
            origin=origin,
            subject=subject,
            reason=reason,
            error=error[:2000],
            payload=payload,
            headers=headers,
            deliveries=deliveries,
        )
        self.stats.dead_letters += 1
        metrics.dead_letter(origin)
        log.warning("dead letter from %s on %s: %s", origin, subject, reason)
        await self.publish(self.subjects.dlq(origin), letter)


Handler = Callable[[Any, Delivery], Awaitable[None]]
BatchHandler = Callable[[list[tuple[Any, Delivery]]], Awaitable[None]]


def _raw_decoder(msg: NatsMessage) -> bytes:
    return msg.body


def consume(
    bus: Bus,
    router: NatsRouter,
    *,
    subject: str,
    stream: str,
    durable: str,
    wire_type: Any,
    origin: str,
    handler: Handler,
    batch_size: int = 16,
    max_deliver: int = 8,
    ack_wait_s: float = 30.0,
    max_workers: int = 1,
    ordered: bool = True,
) -> None:
    """Register a durable pull consumer whose handler gets decoded Structs.

    FastStream runs the messages of one fetch concurrently, in no guaranteed order; with
    `ordered` (the default) it fetches one message at a time, so the handler sees them one by one
    in stream order, which stateful handlers (rollouts, drift windows, gate decisions) rely on.

    The edge owns acknowledgement: undecodable -> DLQ + ack; Retryable -> nack with
    exponential backoff (DLQ after max_deliver); any other failure -> DLQ + ack, so one
    bad message never stops the consumer.
    """
    codec: Codec[Any] = Codec(wire_type)
    stream_name = bus.subjects.streams[stream].name
    if ordered:
        batch_size = 1

    async def on_message(msg: NatsMessage) -> None:
        raw = msg.raw_message
        meta = raw.metadata
        deliveries = meta.num_delivered if meta else 1
        headers = dict(raw.headers or {})
        body = raw.data
        try:
            value = codec.decode(body)
        except InvalidEvent as exc:
            await _dead_letter_and_ack(bus, msg, origin, body, headers, deliveries, "invalid event", exc.message)
            return
        delivery = Delivery(
            subject=raw.subject,
            msg_id=headers.get("Nats-Msg-Id", ""),
            headers=headers,
            deliveries=deliveries,
            stream_seq=meta.sequence.stream if meta else 0,
            trace_context=telemetry.extract(headers),
            in_progress=msg.in_progress,
        )
        try:
            await handler(value, delivery)
        except Retryable as exc:
            if deliveries >= max_deliver:
                await _dead_letter_and_ack(
                    bus, msg, origin, body, headers, deliveries, "retries exhausted", exc.message
                )
            else:
                await msg.nack(delay=min(0.2 * 2**deliveries, 30.0))
            return
        except LockgateError as exc:
            await _dead_letter_and_ack(bus, msg, origin, body, headers, deliveries, "rejected", exc.message)
            return
        except Exception as exc:  # a handler bug must not stop the consumer; keep the message
            log.exception("handler for %s failed", origin)
            await _dead_letter_and_ack(bus, msg, origin, body, headers, deliveries, "handler crashed", repr(exc))
            return
        await msg.ack()

    router.subscriber(
        subject,
        stream=JStream(stream_name, declare=False),
        durable=durable,
        config=ConsumerConfig(ack_wait=ack_wait_s, max_deliver=max_deliver + 1),
        pull_sub=PullSub(batch_size=batch_size, timeout=1.0),
        ack_policy=AckPolicy.MANUAL,
        decoder=_raw_decoder,
        max_workers=max_workers,
    )(on_message)


class Coalescer:
    """Gathers items submitted by concurrent handlers into one flush (e.g. one ClickHouse insert).

    Each `submit` returns when the flush holding its item finished, and raises what that flush
    raised, so every message is acked only after its rows are stored. A flush of several items
    that fails with a non-retryable error is retried item by item, so one poison message cannot
    take the others down with it.
    """

    def __init__(self, flush: BatchHandler, *, max_items: int, max_wait_s: float) -> None:
        self._flush = flush
        self.max_items = max_items
        self.max_wait_s = max_wait_s
        self._pending: list[tuple[tuple[Any, Delivery], asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        # One flush at a time: what arrives meanwhile forms the next, larger batch, so batch
        # size grows with load instead of the insert rate.
        self._flushing = False

    async def submit(self, value: Any, delivery: Delivery) -> None:
        """Queue one decoded message and wait for the flush that stores it."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(((value, delivery), fut))
        if len(self._pending) >= self.max_items:
            self._start_flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._start_flush)
        await fut

    def _start_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._flushing = True
        asyncio.create_task(self._run(batch))

    async def _run(self, batch: list[tuple[tuple[Any, Delivery], asyncio.Future[None]]]) -> None:
        try:
            await self._flush_batch(batch)
        finally:
            self._flushing = False
            if self._pending:
                self._start_flush()

    async def _flush_batch(self, batch: list[tuple[tuple[Any, Delivery], asyncio.Future[None]]]) -> None:
        try:
            await self._flush([item for item, _ in batch])
        except Retryable as exc:
            _settle(batch, exc)
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch, exc)
                return
            log.warning("batch of %d failed (%r); retrying one by one", len(batch), exc)
            for item, fut in batch:
                try:
                    await self._flush([item])
                except Exception as single:
                    _settle([(item, fut)], single)
                else:
                    _settle([(item, fut)], None)
        else:
            _settle(batch, None)


def _settle(batch: list[tuple[Any, asyncio.Future[None]]], exc: BaseException | None) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc) if exc is not None else fut.set_result(None)


def consume_batch(
    bus: Bus,
    router: NatsRouter,
    *,
    handler: BatchHandler,
    batch_size: int = 32,
    max_wait_s: float = 0.005,
    **options: Any,
) -> Coalescer:
    """Like `consume`, but the messages of one fetch (processed concurrently by FastStream) are
    coalesced into one handler call, so a sink writes one large insert instead of one per message.
    Acknowledgement and dead-lettering stay per message, in the `consume` edge."""
    coalescer = Coalescer(handler, max_items=batch_size, max_wait_s=max_wait_s)
    consume(bus, router, handler=coalescer.submit, batch_size=batch_size, max_workers=batch_size, ordered=False,
            **options)
    return coalescer


async def _dead_letter_and_ack(
    bus: Bus,
    msg: NatsMessage,
    origin: str,
    body: bytes,
    headers: dict[str, str],
    deliveries: int,
    reason: str,
    error: str,
) -> None:
    try:
        await bus.dead_letter(
            origin,
            subject=msg.raw_message.subject,
            payload=body,
            reason=reason,
            error=error,
            headers=headers,
            deliveries=deliveries,
        )
    except BusUnavailable:
        # Could not park it: leave it unacked so JetStream redelivers rather than lose it.
        await msg.nack(delay=5.0)
        return
    await msg.ack()
