"""Inference events leaving the process: the one publish routine, and the Outbox that feeds it.

Every producer of inference events (the SDK, the router, gRPC ingest) turns each event into an
`Encoded` with `encode_event` (secrets scrubbed, then encoded once: the SDK's validity check and
the message reuse the same bytes) and publishes through `publish_events`: events grouped by tenant and app
and chunked by count and bytes, one JetStream message per chunk on `subjects.inference(app, tenant)` with
`Nats-Msg-Id = batch_id(chunk)` (so a chunk retried after a lost ack is dropped by JetStream as a
duplicate), transient NATS errors retried with the one RetryPolicy. `Outbox` is the buffered way
in: the one Batcher in front of that routine, for producers that must never wait on the bus; given a
`lockgate.spool.Spool`, what it accepted also outlives its process (the router's does).

The SDK imports this module: it needs nothing beyond nats-py and msgspec.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec
import msgspec.inspect as mi
import nats.errors
import nats.js.errors

from lockgate.batcher import Batcher, Overflow
from lockgate.codec import encode
from lockgate.contracts import SCHEMA_VERSION, InferenceEvent
from lockgate.encoded import Encoded
from lockgate.errors import InvalidEvent, PublishFailed
from lockgate.ids import batch_id
from lockgate.limits import EventLimits
from lockgate.redact import refuse_credentials, scrub_event
from lockgate.retry import RetryPolicy
from lockgate.subjects import Subjects

if TYPE_CHECKING:
    from lockgate.spool import Spool

log = logging.getLogger("lockgate.outbox")

T = TypeVar("T")

BATCH_SIZE = 500
# Keeps each message under NATS' default 1 MB max_payload whatever the events' sizes (a chunk is cut
# before the event that would cross it; one larger event goes alone and the server says why).
BATCH_BYTES = 900_000

# Errors after which the same publish can succeed: no ack in time, JetStream not (yet) answering,
# a reconnect in progress. A closed connection, a payload over the limit or an unencodable event
# fail the same way every time, so they are not retried.
TRANSIENT: tuple[type[BaseException], ...] = (
    TimeoutError,  # nats.errors.TimeoutError is one too
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.FlushTimeoutError,
    nats.errors.UnexpectedEOF,
    nats.js.errors.ServiceUnavailableError,
    # No responder for the subject: js.publish's name for NoRespondersError, as while a JetStream cluster elects
    # the stream's new leader after a node died.
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServerError,
    OSError,
)

PUBLISH_RETRY = RetryPolicy(attempts=5, initial_s=0.05, max_s=2.0)

# How long a server answering a sender (an OTLP export, an Ingest.Send) waits for the bus's acknowledgements, all
# attempts together. The standard OpenTelemetry exporters give a whole export 10 s (OTEL_EXPORTER_OTLP_TIMEOUT) and
# drop the batch when it passes: the retryable answer must come well before, or they never send it again (probe p4:
# 3 attempts of 5 s each answered after 15 s, Ingest.Send's 5 after 25 s).
ANSWER_WITHIN_S = 4.0

Via = Literal["sent", "served", "relay"]

# An Outbox's publishes: retried until the bus is back, however long; the buffer's capacity bounds what an
# outage costs (its overflow policy counts what it refuses), and close() bounds how long a stop waits.
UNTIL_BACK = RetryPolicy(attempts=None, initial_s=0.05, max_s=2.0)


# The check at emit decodes with the sink's decoder's twin (msgspec checks `Meta` constraints, such as
# lengths and non-negative counts, only when decoding, never when a Struct is constructed): the same
# fields, types and constraints, derived from the contract, without the `__post_init__` name check.
# Every way of making an InferenceEvent (construct, decode, convert, replace) ran that check already,
# and running it again was a tenth of an emit.
_check = msgspec.json.Decoder(msgspec.defstruct(
    "InferenceEventCheck", [(f.name, f.type) for f in msgspec.structs.fields(InferenceEvent)], kw_only=True,
    gc=False))
# What a producer that cannot know the stack's settings (the SDK) checks against; a producer inside the stack (the
# router, gRPC ingest, the OTLP receiver) passes the stack's own (EventLimits.from_settings), as its consumers read.
DEFAULT_LIMITS = EventLimits()


def per_message(limits: EventLimits) -> int:
    """How many events a producer puts in one message under `limits`: BATCH_SIZE, or fewer when the consumers
    take fewer (`max_events`): a message over it is refused whole, so acknowledged it would be lost."""
    return max(1, min(BATCH_SIZE, limits.max_events))


def _kinds(t: mi.Type) -> str | None:
    """How a field's values are checked once `msgspec.convert` built them: "" (as convert judges them, so
    as the decoder would), "floats" (also finite: NaN and infinity leave as JSON null, which the decoder
    refuses), or None for a type this module does not reason about."""
    while isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(t, mi.FloatType):
        return "" if t.ge is not None and t.le is not None else "float"  # bounds refuse NaN and infinity
    if isinstance(t, mi.StrType | mi.IntType | mi.BoolType | mi.DateTimeType | mi.NoneType):
        return ""
    if isinstance(t, mi.UnionType):
        kinds = {_kinds(u) for u in t.types}
        return "" if kinds == {""} else None
    if isinstance(t, mi.DictType) and _kinds(t.key_type) == "":
        value = _kinds(t.value_type)
        return "" if value == "" else "floats" if value == "float" else None
    return None


_FIELDS = frozenset(f.name for f in msgspec.structs.fields(InferenceEvent))
_FIELD_KINDS = {f.name: _kinds(mi.type_info(f.type)) for f in msgspec.structs.fields(InferenceEvent)}
# The dict-of-float fields whose values must also be finite; None if some field's type is beyond `_kinds`,
# in which case every event is checked by decoding its bytes.
_FLOAT_MAPS: tuple[str, ...] | None = (
    None if None in _FIELD_KINDS.values() or "float" in _FIELD_KINDS.values()
    else tuple(name for name, kind in _FIELD_KINDS.items() if kind == "floats"))


def event_from_fields(fields: Mapping[str, Any]) -> InferenceEvent:
    """An InferenceEvent built from field values and checked in the same step (`msgspec.convert`: types,
    bounds and names, as the sink's decoder checks them), so `encode_event(..., check="built")` need not
    decode its bytes again. Raises InvalidEvent naming the field or the unknown field names."""
    if not fields.keys() <= _FIELDS:  # no set made in the usual case: a lookup per field
        unknown = fields.keys() - _FIELDS
        raise InvalidEvent(f"invalid inference event: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    try:
        return msgspec.convert(fields, InferenceEvent)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"invalid inference event: {exc}") from None


def encode_event(event: InferenceEvent, *, check: bool | str = False, clock_time: bool = False,
                 limits: EventLimits = DEFAULT_LIMITS, scrubbed: bool = False) -> Encoded:
    """Scrub, then encode. With `check`, raise InvalidEvent naming the field if the sink's decoder
    would refuse the bytes, or if they are more than one bus message carries: one bad event must never
    reach (and poison) a batch of good ones, nor wait for a publish that can never succeed.
    `check="built"` is for an event from `event_from_fields`, whose values convert checked already:
    only what convert cannot see is checked (non-finite floats, text without a UTF-8 form).
    `clock_time`: the event's time is this clock's reading as it was built (no time was given), so it
    lies inside the time window by construction and is not checked against it. `limits`: the time window checked,
    the stack's own for a producer inside it (what it acknowledges, its consumers keep). `scrubbed`: the event is
    `scrub_event`'s already (the router's, which counts what its scrub masked), so it is not scrubbed twice."""
    if not scrubbed:
        event = scrub_event(event)
    try:
        data = encode(event)
    except (msgspec.EncodeError, TypeError, UnicodeEncodeError) as exc:  # a non-string attribute value, a lone surrogate
        raise InvalidEvent(f"invalid inference event: {exc}") from None
    if check:
        try:
            if check != "built" or _FLOAT_MAPS is None:
                _check.decode(data)
            else:
                for name in _FLOAT_MAPS:
                    values = getattr(event, name)
                    if values and not all(map(math.isfinite, values.values())):
                        raise InvalidEvent(f"invalid inference event: Expected `float`, got `null` - at `$.{name}[...]`")
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise InvalidEvent(f"invalid inference event: {exc}") from None
        if len(data) > BATCH_BYTES:
            # No message can carry it (NATS' default max_payload is 1 MB): accepted, it failed at every
            # publish, and a caller told "unavailable" retried it for ever.
            raise InvalidEvent(f"invalid inference event: larger than {BATCH_BYTES} bytes encoded ({len(data):,}), "
                               "more than one bus message carries; shorten its prompt, response or attributes")
        if event.schema_version > SCHEMA_VERSION:  # as the sink's decoder refuses it
            raise InvalidEvent(f"invalid inference event: schema_version {event.schema_version} is newer than "
                               f"this build's {SCHEMA_VERSION} - at `$.schema_version`")
        # The consumers' window when the producer knows it (`limits`); the default one for the SDK, which does not:
        # a stack configured narrower parks what the SDK let through (before, probe p56 F2, gRPC ingest and OTLP
        # checked the default window too, and acknowledged events the stack's consumers then dead-lettered). The
        # window is around now, so a time read from the clock just now needs no look (a tenth of `encode_event`).
        if not clock_time and (reason := limits.event_error(event)):
            raise InvalidEvent(f"invalid inference event: {reason} - at `$.time`")
    parent = f"00-{event.trace_id}-{event.span_id}-01" if event.trace_id and event.span_id else ""
    return Encoded(event.app, event.id, event.tenant, parent, data)


def checked_unscrubbed(event: InferenceEvent, *, check: bool | str = True, clock_time: bool = False) -> None:
    """Raise InvalidEvent where `encode_event(event, check=check, clock_time=clock_time)` would, without scrubbing
    the event (the slow part of a large one): for a producer that scrubs and encodes it later, off its caller (the
    SDK's large events). Checked on the unscrubbed bytes: a scrub only masks secrets, and neither adds a field nor
    changes a type."""
    refuse_credentials(event)
    encode_event(event, check=check, clock_time=clock_time, scrubbed=True)


_sender, _data = attrgetter("tenant", "app"), attrgetter("data")


def chunk_by_sender(events: Sequence[Encoded], batch_size: int = BATCH_SIZE,
                    batch_bytes: int = BATCH_BYTES) -> list[list[Encoded]]:
    """Events grouped by tenant and app (in first-seen order: each group has a subject of its own) and cut
    into chunks of at most `batch_size` events and about `batch_bytes` bytes."""
    # The usual batch (an SDK's, or a router's with one app): one sender, within both limits, so one chunk,
    # found in C instead of a Python step per event.
    if events and len(events) <= batch_size and len(set(map(_sender, events))) == 1:
        if sum(map(len, map(_data, events))) + len(events) <= batch_bytes:
            return [list(events)]
    by_sender: dict[tuple[str, str], list[Encoded]] = {}
    for event in events:
        by_sender.setdefault((event.tenant, event.app), []).append(event)
    return [chunk for group in by_sender.values()
            for chunk in chunked(group, [len(e.data) + 1 for e in group], max_items=batch_size, max_bytes=batch_bytes)]


def chunked(items: Sequence[T], sizes: Sequence[int], *, max_items: int = BATCH_SIZE,
            max_bytes: int = BATCH_BYTES) -> list[list[T]]:
    """`items` in order, cut into chunks of at most `max_items` whose `sizes` (encoded bytes, separator
    included) add up to at most `max_bytes`: each chunk fits one bus message. A chunk is cut before the item
    that would cross a limit; one item larger than `max_bytes` goes alone (and the server says why)."""
    chunks: list[list[T]] = [[]]
    size = 0
    for item, n in zip(items, sizes, strict=True):
        if chunks[-1] and (len(chunks[-1]) >= max_items or size + n > max_bytes):
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += n
    return chunks if chunks[0] else []


async def publish_events(
    js: Any,
    subjects: Subjects,
    events: Sequence[Encoded],
    *,
    batch_size: int = BATCH_SIZE,
    headers: Mapping[str, str] | None = None,
    retry: RetryPolicy = PUBLISH_RETRY,
    give_up: Callable[[], bool] | None = None,
    timeout_s: float = 5.0,
    via: Via = "sent",
    on_acked: Callable[[list[Encoded]], None] | None = None,
    stop: asyncio.Event | None = None,
    deadline_s: float | None = None,
    connected: Callable[[], bool] | None = None,
) -> int:
    """Publish events, one message per tenant, app and chunk; returns how many JetStream acknowledged.

    Raises PublishFailed (carrying `sent`, `failed` and `unconfirmed`) when any chunk was not acknowledged after
    the retries (`retry`'s attempts, or until `give_up()`); the other chunks are published all the
    same. A chunk one of whose attempts went out and timed out is unconfirmed: it may be stored. `connected()`
    says whether the connection is up (an attempt made while it is down did not go out; None: it went out). `headers` go on every message; a chunk without a `traceparent` there gets its first event's trace.
    `via`: "sent" on `subjects.inference`; "served", the router's events of requests it served, on
    `subjects.served`; "relay", an application NATS user's (its own or the shared `app`), on `subjects.ingest`
    (see there).
    `on_acked(chunk)` is called with each chunk JetStream acknowledged, as its ack arrives.
    `stop`, once set, ends the wait for an ack (or between retries) at once, as a timeout: a publisher
    that stops waiting (Outbox.close) is not held by the attempt in flight then.
    `deadline_s` (instead of `stop`) bounds the whole wait, all attempts together: a server answering a sender
    within the sender's own deadline (ANSWER_WITHIN_S)."""
    chunks = chunk_by_sender(events, batch_size)
    subject = {"sent": subjects.inference, "served": subjects.served, "relay": subjects.ingest}[via]
    timer = None
    if deadline_s is not None:
        if stop is not None:
            raise ValueError("publish_events takes stop or deadline_s, not both")
        stop = asyncio.Event()
        timer = asyncio.get_running_loop().call_later(deadline_s, stop.set)
        give_up = stop.is_set if give_up is None else give_up
    try:
        errors = await asyncio.gather(
            *(_publish_chunk(js, subject(c[0].app, c[0].tenant), c, headers, retry, give_up, timeout_s, on_acked,
                             stop, connected)
              for c in chunks)
        )
    finally:
        if timer is not None:
            timer.cancel()
    failed = sum(len(c) for c, exc in zip(chunks, errors, strict=True) if exc is not None)
    unconfirmed = sum(len(c) for c, exc in zip(chunks, errors, strict=True) if isinstance(exc, Unconfirmed))
    sent = len(events) - failed
    if failed:
        first = next(exc for exc in errors if exc is not None)
        # Only a transient error was retried: one that fails the same way every time (a payload over the
        # server's max_payload, a closed connection) was tried once, and saying otherwise misleads.
        tries = ("(not retried: it fails the same way each time)" if not isinstance(first, TRANSIENT)
                 else f"within {deadline_s:g} s" if deadline_s is not None and stop is not None and stop.is_set()
                 else f"after {retry.attempts} attempts" if retry.attempts is not None
                 else "(retried until the publisher stopped waiting)")
        # A publish whose acknowledgement did not come may have been stored all the same (it reached the server, or
        # sits in the client's reconnect buffer): "failed" would be untrue, and a sender must know its retry is safe.
        retry_safe = "a retry of the same events (the same ids) is deduplicated"
        fate = (f"{'they' if unconfirmed == failed else f'{unconfirmed} of them'} may have been stored all the same "
                f"(sent, but not acknowledged): {retry_safe}" if unconfirmed
                else retry_safe if isinstance(first, TRANSIENT) else "they were not stored")
        raise PublishFailed(
            f"JetStream did not acknowledge {failed} of {len(events)} inference events {tries}: {first!r}; {fate}",
            sent=sent,
            failed=failed,
            unconfirmed=unconfirmed,
        )
    return sent


async def _publish_chunk(
    js: Any,
    subject: str,
    chunk: list[Encoded],
    headers: Mapping[str, str] | None,
    retry: RetryPolicy,
    give_up: Callable[[], bool] | None,
    timeout_s: float,
    on_acked: Callable[[list[Encoded]], None] | None = None,
    stop: asyncio.Event | None = None,
    connected: Callable[[], bool] | None = None,
) -> Exception | None:
    # Set once an attempt went out and its acknowledgement never came: the server may have stored the batch (a probe
    # saw JetStream store it), whatever a later attempt met. Such a batch is Unconfirmed, never counted `failed`
    # (probe p72 F2: an SDK with max_attempts=2 counted 500 stored events failed and logged them "not published").
    unacked = False
    try:
        # The JSON array the sink decodes, made in one copy of the events' bytes: the brackets go on the
        # first and last event's (small) bytes, not around the joined batch (two more copies of ~200 kB).
        parts = [e.data for e in chunk]
        parts[0] = b"[" + parts[0]
        parts[-1] += b"]"
        data = b",".join(parts)
        hdrs = dict(headers or {})
        if "traceparent" not in hdrs and chunk[0].traceparent:
            hdrs["traceparent"] = chunk[0].traceparent
        # The same events always give the same id, so a retry after a lost ack is deduplicated.
        hdrs["Nats-Msg-Id"] = batch_id(chunk)

        async def attempt() -> Any:
            nonlocal unacked
            # Made while the connection is down, a publish waits in nats-py's reconnect buffer, which a close drops:
            # it went out only if the connection was up (or nothing says it was not).
            out = connected is None or connected()
            try:
                return await _unless(stop, lambda: js.publish(subject, data, headers=hdrs, timeout=timeout_s))
            except TimeoutError as exc:
                unacked = unacked or (out and not isinstance(exc, _Unsent))
                raise

        await retry.call(
            attempt,
            retry_on=TRANSIENT,
            what=f"publish of {len(chunk)} events to {subject}",
            give_up=give_up,
            sleep=asyncio.sleep if stop is None else lambda s: _until_set(stop, s),
        )
    except Exception as exc:  # counted by the caller, never lost silently
        if unacked:
            log.warning("%d inference events for %s not confirmed: sent, but %s, so they may be stored (a re-send of "
                        "them is deduplicated by its message id)", len(chunk), subject,
                        "the deadline came before their acknowledgement" if isinstance(exc, Unconfirmed)
                        else f"no acknowledgement came ({exc!r})")
            return exc if isinstance(exc, Unconfirmed) else Unconfirmed(f"sent, but not acknowledged: {exc!r}")
        if isinstance(exc, Unconfirmed):  # the deadline came while the connection was down: it never went out
            exc = TimeoutError(f"not sent (the connection was down): {exc}")
        log.warning("%d inference events for %s not published: %r", len(chunk), subject, exc)
        return exc
    if on_acked is not None:  # outside the try: what it does is no publish failure
        on_acked(chunk)
    return None


async def _unless(stop: asyncio.Event | None, publish: Callable[[], Awaitable[T]]) -> T:
    """`publish()`'s result, or TimeoutError as soon as `stop` is set (the publish is then cancelled)."""
    if stop is None:
        return await publish()
    if stop.is_set():
        raise _Unsent("the publisher stopped waiting for acknowledgements")
    task = asyncio.ensure_future(publish())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled itself: the publish goes with it, not left running alone
        task.cancel()
        raise
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        raise Unconfirmed("the publisher stopped waiting for the acknowledgement")
    return task.result()


class Unconfirmed(TimeoutError):
    """A publish sent whose acknowledgement never came (its attempts timed out, or the publisher stopped waiting at
    close()'s deadline): it may have been stored."""


class _Unsent(TimeoutError):
    """An attempt not made: the publisher had stopped waiting before it (nothing went out)."""


async def _until_set(stop: asyncio.Event, seconds: float) -> None:
    """A retry's backoff, cut short once `stop` is set (the next attempt then fails at once and gives up)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


class Outbox:
    """Inference events buffered by the one Batcher and published by `publish_events`.

    `add` never blocks and never raises: when the buffer refuses an event (full under
    `drop_newest`, evicted under `drop_oldest`, or the outbox closed) it counts in `dropped`.
    `sent` counts events JetStream acknowledged, `failed` those given up after the retries that were never
    stored, `unconfirmed` those given up that were sent and never acknowledged: they may be stored (a re-send
    is deduplicated by its message id). With `retry=UNTIL_BACK` a publish is retried until the bus is back,
    however long (the bounded buffer takes the events meanwhile), and only once `close()` has waited
    `close_timeout_s` is what is left counted failed or unconfirmed. Nothing is published before `start(js)`. A server process passes `on_sent(n)` and
    `on_drop(n, reason)` to count the same in its metrics (the SDK passes none: no OpenTelemetry).

    With a `spool` (lockgate.spool), each event accepted is appended to it before it enters the buffer,
    and settled there once acknowledged (or refused or evicted by the buffer, as counted in `dropped`):
    what is neither when the process dies (kill -9) or closes (a bus still away) is published by the next
    Outbox on the same spool, before its own events (`recovered` counts them). Failures are then reported
    to `on_drop` as "spooled", not lost. The Outbox closes the spool when it closes.
    """

    def __init__(
        self,
        subjects: Subjects,
        *,
        batch_size: int = BATCH_SIZE,
        max_age_s: float = 0.05,
        capacity: int = 100_000,
        overflow: Overflow = "drop_newest",
        max_in_flight: int = 1,
        retry: RetryPolicy = PUBLISH_RETRY,
        close_timeout_s: float = 10.0,
        publish_timeout_s: float = 5.0,
        via: Via = "sent",
        name: str = "outbox",
        on_sent: Callable[[int], None] | None = None,
        on_drop: Callable[[int, str], None] | None = None,
        spool: Spool | None = None,
        cause: Callable[[], str | None] | None = None,
    ) -> None:
        self.subjects = subjects
        self._cause = cause  # why the bus is refusing this publisher now, if its owner knows (logged with failures)
        self.batch_size = batch_size
        self.retry = retry
        self.close_timeout_s = close_timeout_s
        self.publish_timeout_s = publish_timeout_s  # each attempt's wait for its ack
        self.via = via  # which subject its events go on (publish_events)
        self._give_up_at: float | None = None  # set by close(): when publishes still failing are given up
        self._stop: asyncio.Event | None = None  # set at _give_up_at: ends the attempts (and backoffs) in flight
        self.js: Any = None
        self._connected: Callable[[], bool] | None = None
        self.sent = 0
        self.failed = 0
        self.unconfirmed = 0
        self._refused_closed = 0
        self._on_sent = on_sent
        self._on_drop = on_drop
        self.spool = spool
        self._batcher: Batcher[Encoded] = Batcher(
            self._publish,
            max_items=batch_size,
            max_age_s=max_age_s,
            capacity=capacity,
            overflow=overflow,
            on_drop=on_drop,
            on_evict=None if spool is None else self._settle_one,
            max_in_flight=max_in_flight,
            name=name,
            autostart=False,
        )
        self.recovered = 0  # events an earlier process left in the spool, queued first
        if spool is not None:
            for event in spool.take_recovered():
                self.recovered += self._batcher.add(event)

    @property
    def dropped(self) -> int:
        """Events the buffer refused or evicted."""
        return self._batcher.dropped + self._refused_closed

    def __len__(self) -> int:
        return len(self._batcher)

    @property
    def closed(self) -> bool:
        """True once close() began: events are refused from then on."""
        return self._batcher.closed

    def start(self, js: Any, connected: Callable[[], bool] | None = None) -> None:
        """Publish through this JetStream context from now on (events added before wait for it). `connected`
        says whether its connection is up: a publish that timed out while it was down never went out, and is
        counted failed, not unconfirmed."""
        self.js = js
        self._connected = connected
        self._stop = asyncio.Event()
        self._batcher.start()

    def add(self, event: Encoded) -> bool:
        """Queue one event (O(1), never blocks); False if it was refused."""
        spool = self.spool
        if spool is not None and not self._batcher.closed:
            event = spool.append(event)  # before the buffer: from here on a kill -9 does not lose it
            if self._batcher.add(event):
                return True
            spool.settle((event,))  # refused (full under drop_newest) and counted dropped: not kept either
            return False
        try:
            return self._batcher.add(event)  # asked first: a closed batcher is the rare case, and raises
        except RuntimeError:
            if not self._batcher.closed:
                raise
        # e.g. a request finishing while the process shuts down
        self._refused_closed += 1
        self._report(self._on_drop, 1, "closed")
        return False

    def refuse(self) -> None:
        """Count one event refused without being offered (its producer knows nothing can publish it)."""
        self._refused_closed += 1
        self._report(self._on_drop, 1, "closed")

    async def flush(self) -> None:
        """Return once every event added before this call is acknowledged or counted failed."""
        await self._batcher.flush()

    async def close(self) -> None:
        """Flush what is left and wait for the acks (publishes still failing after `close_timeout_s` are
        counted failed, or unconfirmed if sent); later events are refused. Never started, nothing can
        publish what is buffered: it is counted dropped ("closed") rather than kept unseen."""
        if self.js is None:
            self._batcher.abandon("closed" if self.spool is None else "spooled")
        else:
            self._give_up_at = time.monotonic() + self.close_timeout_s
            # The bound is close()'s whole: an attempt in flight, or one begun just before the deadline, would
            # wait its own timeout (5 s) past it (close_timeout_s=10 took 14 s).
            deadline = asyncio.get_running_loop().call_later(self.close_timeout_s, self._stop_now)
            try:
                await self._batcher.close()
            finally:
                deadline.cancel()
        if self.spool is not None:
            self.spool.close()  # what was not acknowledged stays there for the next start

    def _settle_one(self, event: Encoded) -> None:
        assert self.spool is not None
        self.spool.settle((event,))

    def _stop_now(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _give_up(self) -> bool:
        return (self._stop is not None and self._stop.is_set()) or (
            self._give_up_at is not None and time.monotonic() >= self._give_up_at)

    async def _publish(self, events: list[Encoded]) -> None:
        try:
            # Awaited before the add: `self.sent += await ...` would read the counter before the
            # await and lose the counts of batches acknowledged meanwhile.
            sent = await publish_events(self.js, self.subjects, events, batch_size=self.batch_size, retry=self.retry,
                                        give_up=self._give_up, timeout_s=self.publish_timeout_s,
                                        via=self.via, on_acked=None if self.spool is None else self.spool.settle,
                                        stop=self._stop, connected=self._connected)
        except PublishFailed as exc:
            failed = exc.failed - exc.unconfirmed
            self.sent += exc.sent
            self.failed += failed
            self.unconfirmed += exc.unconfirmed
            if failed and self._cause is not None and (why := self._cause()):
                log.error("%d inference events counted failed: %s", failed, why)
            self._report(self._on_sent, exc.sent)
            # Spooled, they are published by the next start on the spool: not lost, but not published by this one.
            for n, reason in ((failed, "publish_failed"), (exc.unconfirmed, "unconfirmed")):
                if n:
                    self._report(self._on_drop, n, reason if self.spool is None else "spooled")
        else:
            self.sent += sent
            self._report(self._on_sent, sent)

    def _report(self, callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is not None:
            try:
                callback(*args)
            except Exception:  # counting must never lose an event or fail a request
                log.debug("outbox counter callback failed", exc_info=True)
