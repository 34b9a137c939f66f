"""gRPC API (grpc.aio): ingest inference events, read and follow gate decisions.

A thin edge over the bus: protos become Structs here, and nothing else knows about protobuf.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

import grpc
import msgspec
import nats.errors
import nats.js.errors
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from lockgate import artifacts, propagation
from lockgate.bus import Bus
from lockgate.client import get_decision
from lockgate.config import Settings
from lockgate.contracts import GateDecided, InferenceEvent
from lockgate.contracts.names import check_name
from lockgate.decisionwatch import DecisionWithdrawn, Unreadable, verified, watch_decisions
from lockgate.encoded import Encoded
from lockgate.errors import BusUnavailable, InvalidEvent, InvalidName, NotFound, SignatureError
from lockgate.ids import uuid7_time
from lockgate.limits import EventLimits
from lockgate.natsclient import raise_if_cancelled
from lockgate.outbox import ANSWER_WITHIN_S, DEFAULT_LIMITS, encode_event, per_message, publish_events
from lockgate.server.apikeys import (
    ApiKey,
    AuthError,
    Forbidden,
    KeyStore,
    bearer,
    event_out_of_scope,
    owns_release,
    while_allowed,
)
from lockgate.server.grpcdecode import Requests
from lockgate.server.offloop import OffLoop
from lockgate.server.tls import bind_grpc, grpc_credentials, grpc_server
from lockgate.signing import TRUST_CHECK_S, Verifier, canonical
from lockgate.v1 import gates_pb2, gates_pb2_grpc, ingest_pb2, ingest_pb2_grpc

log = logging.getLogger("lockgate.gateway")

# Proto3 strings cannot be absent: an empty one means "use the contract's default".
_STRING_FIELDS = tuple(
    f
    for f in InferenceEvent.__struct_fields__
    if f in ingest_pb2.InferenceEvent.DESCRIPTOR.fields_by_name
    and ingest_pb2.InferenceEvent.DESCRIPTOR.fields_by_name[f].type == FieldDescriptor.TYPE_STRING
    and f not in ("prompt", "response")
)
_NUMBER_FIELDS = ("input_tokens", "output_tokens", "cached_tokens", "latency_ms", "ttft_ms")


def event_from_proto(msg: ingest_pb2.InferenceEvent, tenant: str, app: str) -> InferenceEvent:
    """Validate one proto event into the contract, as the caller's key's tenant and app; raises InvalidEvent
    with the reason."""
    raw: dict[str, Any] = {f: getattr(msg, f) for f in _STRING_FIELDS if getattr(msg, f)}
    # Send refused any event naming another tenant or app before this; one naming none is the key's.
    raw["tenant"], raw["app"] = tenant, app
    raw.update({f: getattr(msg, f) for f in _NUMBER_FIELDS})
    for f in ("prompt", "response"):
        if msg.HasField(f):
            raw[f] = getattr(msg, f)
    if msg.HasField("time"):
        try:
            raw["time"] = msg.time.ToDatetime(tzinfo=UTC)
        except ValueError as exc:  # seconds or nanos outside Timestamp's range: no datetime at all
            raise InvalidEvent(f"{exc} - at `$.time`") from None
    elif (made := uuid7_time(msg.id)) is not None:
        # A retried Send must be the same event, time included (the sink finds a stored copy in its time
        # range): the time the id was made, not this call's. Other ids without a time get the call's.
        raw["time"] = made
    raw["attributes"] = dict(msg.attributes)
    raw["scores"] = dict(msg.scores)
    try:
        return msgspec.convert(raw, InferenceEvent)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(str(exc)) from None


def decision_to_proto(d: GateDecided) -> gates_pb2.Decision:
    """The contract's GateDecided as the API's Decision message."""
    ts = Timestamp()
    ts.FromDatetime(d.time)
    return gates_pb2.Decision(
        release=d.release,
        decision=d.decision,
        rules=[
            gates_pb2.RuleResult(
                rule=r.rule,
                metric=r.metric,
                op=r.op,
                threshold=r.threshold,
                observed=r.observed,
                verdict=r.verdict,
                hint=r.hint,
            )
            for r in d.rules
        ],
        eval_run=d.eval_run,
        policy=d.policy,
        reason=d.reason,
        signature=d.signature,
        key_id=d.key_id,
        id=d.id,
        time=ts,
        tenant=d.tenant,
        baseline=d.baseline,
        artifacts=d.artifacts,
        signed=canonical(d),
    )


def _presented(context: grpc.aio.ServicerContext) -> str | None:
    """The API key a call presents (`authorization: Bearer lg-...` metadata), if any."""
    metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    return bearer(metadata.get("authorization"))


async def authenticate(keys: KeyStore, context: grpc.aio.ServicerContext, *, sender: bool = False) -> ApiKey:
    """The caller's API key from `authorization: Bearer lg-...` metadata; aborts UNAUTHENTICATED otherwise, and
    PERMISSION_DENIED for a `sender` call (events) from a key whose role may not send."""
    presented = _presented(context)
    try:
        return keys.authenticate_sender(presented) if sender else keys.authenticate(presented)
    except AuthError as exc:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
        raise  # abort raises; this keeps type checkers and readers sure nothing follows
    except Forbidden as exc:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, exc.message)
        raise


SEND = "/lockgate.v1.Ingest/Send"
# The most events one Send takes: about half a second of checking and encoding in the gateway's threads. They are
# published cut to the stack's max_events_per_message a message (`per_message`).
SEND_MAX_EVENTS = 5000


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]  # IndexError: cut short (as a varint too long is)
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:  # no varint is longer: a run of continuation bytes must not cost a step each
            raise IndexError("varint too long")


def _fields(data: bytes, most: int) -> int:
    """How many top-level fields the protobuf message `data` holds, counted no further than `most` (at most `most`
    steps, whatever `data` is); a malformed field ends the count (the parse then says what is wrong)."""
    count, at, end = 0, 0, len(data)
    with contextlib.suppress(IndexError):  # a field cut short ends the count: the count so far stands
        while at < end and count < most:
            tag, at = _varint(data, at)
            kind = tag & 7
            if kind == 0:
                _, at = _varint(data, at)
            elif kind == 2:
                size, at = _varint(data, at)
                at += size
            elif kind in (1, 5):
                at += 8 if kind == 1 else 4
            else:
                break
            count += 1
    return count


def read_batch(data: bytes, max_events: int) -> ingest_pb2.InferenceBatch:
    """A Send's InferenceBatch, parsed only if it holds at most `max_events` events (fields: it has no other),
    counted on the wire first: 4 MiB of empty events took a second and 840 MB to parse (probe p62 F2). ValueError
    (answered INVALID_ARGUMENT) naming the bound otherwise."""
    if _fields(data, max_events + 1) > max_events:
        raise ValueError(f"it carries more than {max_events:,} events, the most one Send takes: send them in "
                         "several calls")
    return ingest_pb2.InferenceBatch.FromString(data)


def _checked(events: Any, key: ApiKey, limits: EventLimits) -> tuple[list[Encoded], list[Any]]:
    """(encoded events, rejections) of a batch the key may send; Forbidden naming the first event it may not.
    Pure CPU, about 100 us an event: run in the server's threads (OffLoop), off the event loop."""
    # Ingest keys are tenant-scoped: one event for another tenant refuses the whole batch, so a
    # key can never add to another tenant's ledger. A key scoped to deployments may report only theirs:
    # events feed each deployment's drift and canary analysis, which another app's key must not sway.
    for index, msg in enumerate(events):
        if msg.tenant and msg.tenant != key.tenant:
            raise Forbidden(f"event {index} is for tenant {msg.tenant!r}; {key.label} may only ingest "
                            f"for tenant {key.tenant!r}")
        if msg.app and msg.app != key.app:  # its spend and drift would be another app's
            raise Forbidden(f"event {index} is for app {msg.app!r}; {key.label} may only ingest for app {key.app!r}")
        if what := event_out_of_scope(key.deployments, msg.deployment, key.app):
            raise Forbidden(f"event {index} {what}; {key.label} may only ingest for {key.scope}: "
                            "name the deployment of each event")
    encoded: list[Encoded] = []
    rejections = []
    for index, msg in enumerate(events):
        try:
            # Checked as the SDK checks (contract and time window), but against the stack's own limits, as its
            # consumers read them: what Send acknowledges, none of them parks.
            encoded.append(encode_event(event_from_proto(msg, key.tenant, key.app), check=True, limits=limits))
        except InvalidEvent as exc:
            rejections.append(ingest_pb2.Rejection(index=index, reason=exc.message))
    return encoded, rejections


class IngestServicer(ingest_pb2_grpc.IngestServicer):
    """Ingest.Send: reject invalid events one by one, publish the rest grouped by app."""

    def __init__(self, bus: Bus, keys: KeyStore, work: OffLoop, limits: EventLimits = DEFAULT_LIMITS) -> None:
        self.bus = bus
        self.keys = keys
        self.work = work  # the server's threads and slots, which decoding the requests shares
        self.limits = limits  # the stack's (its consumers'): what Send acknowledges, they keep

    async def Send(self, request: ingest_pb2.InferenceBatch, context: grpc.aio.ServicerContext) -> Any:
        """Validate and publish a batch; UNAVAILABLE if JetStream does not acknowledge (safe to retry)."""
        key = await authenticate(self.keys, context, sender=True)  # admitted already (a stat): the key itself
        try:
            # Off the event loop: on it, a Send of 1,000,000 events held it 51 s (probe p62 F2).
            async with self.work.slot():
                events, rejections = await self.work.run(functools.partial(_checked, request.events, key,
                                                                           self.limits))
        except Forbidden as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, exc.message)
        except BusUnavailable as exc:  # Busy: every slot is taken
            await context.abort(grpc.StatusCode.UNAVAILABLE, exc.message)
        headers: dict[str, str] = {}
        propagation.inject(headers)  # this call's trace, if any, continues on the bus
        if events and self.bus.state != "connected":
            # At once: nats-py would hold the publishes in its reconnect buffer while each waited out its
            # acknowledgement, past the caller's deadline.
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the bus is {self.bus.state} (NATS does not answer): "
                                "none of these events was published; retry them")
        try:
            # msg id = batch_id(chunk): a client retrying the same events is deduplicated. The whole wait is bounded
            # (ANSWER_WITHIN_S): 5 attempts of 5 s answered after 25 s, past a caller's own deadline (probe p4).
            accepted = await publish_events(self.bus.js, self.bus.subjects, events, headers=headers,
                                            batch_size=per_message(self.limits), deadline_s=ANSWER_WITHIN_S)
        except BusUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, exc.message)
        return ingest_pb2.IngestReply(accepted=accepted, rejected=len(rejections), rejections=rejections)


def ingest_handler(servicer: IngestServicer, max_events: int) -> grpc.GenericRpcHandler:
    """`Ingest/Send`, its batch decoded by `read_batch` (the generated code's decoder counts nothing)."""
    send = grpc.unary_unary_rpc_method_handler(
        servicer.Send, request_deserializer=functools.partial(read_batch, max_events=max_events),
        response_serializer=ingest_pb2.IngestReply.SerializeToString)
    return grpc.method_handlers_generic_handler("lockgate.v1.Ingest", {"Send": send})


def _no_decision(release: str) -> str:
    """NOT_FOUND's message: the same for a release never decided, never bound, or of another tenant or app."""
    return f"no gate decision for release {release!r} (not evaluated yet?)"


# What the bus not answering raises: nats-py's errors, the connection lost (OSError), lockgate's BusUnavailable.
_BUS_FAILED = (BusUnavailable, nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError)

# The least interval between a client's keepalive pings the gateway takes (the README's WatchDecisions part tells
# clients to ping every 5 s): gRPC's default, 5 minutes, answered the third faster ping with a GOAWAY
# `too_many_pings`, which ended a quiet watch UNAVAILABLE with nothing wrong, so no client could notice a silent
# partition sooner than that (probe p80 F2).
CLIENT_PING_MIN_MS = 500


def keepalive(cut_off_s: float) -> list[tuple[str, int]]:
    """The gateway's gRPC keepalive: it takes clients' pings as often as CLIENT_PING_MIN_MS, with or without a call or
    data, and pings each client itself after `cut_off_s` (router_cut_off_s, at least 1 s) of silence, dropping one
    that does not answer within as long: a watch whose client is gone behind a partition ends, and its subscriptions
    with it, instead of lasting until a write to it fails."""
    ms = max(1000, int(cut_off_s * 1000))
    return [("grpc.keepalive_time_ms", ms), ("grpc.keepalive_timeout_ms", ms),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_PING_MIN_MS)]


@contextlib.asynccontextmanager
async def _bus_answers(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """UNAVAILABLE, which a client retries, for the bus not answering while a Gates call reads it. Before (probe p39
    F4), WatchDecisions while the bus was down answered UNKNOWN "Unexpected <class 'nats.errors.TimeoutError'>":
    nats-py's internals, and no retry."""
    try:
        yield
    except _BUS_FAILED as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE, exc.message if isinstance(exc, BusUnavailable)
                            else f"the bus does not answer ({exc!r}): retry")


class GatesServicer(gates_pb2_grpc.GatesServicer):
    """Gates: the latest decision per release (KV), and a stream of decisions (announcements, read from KV).

    A key reads the decisions of its own tenant's and app's releases only (`owns_release`: whose a release
    is comes from its binding); any other release is answered as one never decided. Only decisions whose
    signature verifies are served: a client in any language can act on what it receives (and still verify
    it again with the key from `lockgate gate keys`)."""

    def __init__(self, bus: Bus, verifier: Verifier, keys: KeyStore, *, cut_off_s: float) -> None:
        self.bus = bus
        self.verifier = verifier
        self.keys = keys
        self.cut_off_s = cut_off_s  # a watch whose bus connection answers nothing this long ends UNAVAILABLE

    async def _owned(self, key: ApiKey, release: str, context: grpc.aio.ServicerContext) -> bool:
        """Whether `release` is bound to the key's tenant and app; UNAVAILABLE if the binding cannot be read
        (a watch then ends, rather than skip a decision the key may read: the client watches again)."""
        try:
            async with _bus_answers(context):
                bundle: dict[str, Any] | None = await artifacts.release_of(self.bus, release)
        except NotFound:
            bundle = None
        return owns_release(key, bundle)

    async def GetDecision(
        self, request: gates_pb2.GetDecisionRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        """The latest decision for a release of the key's tenant and app; NOT_FOUND if the gate never decided
        it, or if it is not the key's (alike, so a key cannot learn which releases exist)."""
        key = await authenticate(self.keys, context)
        if not request.release:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "release is required")
        try:
            check_name(request.release, "release")
        except InvalidName as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        # Before the decision is read: a stored decision of another tenant's release, even a bad one, says nothing.
        if not await self._owned(key, request.release, context):
            await context.abort(grpc.StatusCode.NOT_FOUND, _no_decision(request.release))
        try:
            async with _bus_answers(context):
                decision = await get_decision(await self.bus.kv(self.bus.subjects.kv_gates), request.release)
        except SignatureError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, exc.message)
        if decision is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, _no_decision(request.release))
        try:
            await self.verifier.verify(decision)
        except SignatureError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, exc.message)
        return decision_to_proto(decision)

    async def WatchDecisions(
        self, request: gates_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gates_pb2.Decision]:
        """Current decisions of the key's tenant's and app's releases, then each new one, until the client
        cancels; other releases' decisions are skipped. A decision streamed that stops verifying (its key revoked or
        retired, an approval withdrawn: decisionwatch.verified) ends the stream FAILED_PRECONDITION naming its
        release, its id and why: the client reads the release again (GetDecision) and watches again. A key revoked
        while it watches ends the stream UNAUTHENTICATED, as its next call is answered (`while_allowed`: looked at
        before each decision and every second), and is sent no decision made after."""
        key = await authenticate(self.keys, context)
        presented = _presented(context)
        async with _bus_answers(context):
            kv = await self.bus.kv(self.bus.subjects.kv_gates)
            decisions = await watch_decisions(kv, request.release_prefix, nc=self.bus.nc,
                                              subjects=self.bus.subjects, reconnects=self.bus, cut_off=self.cut_off_s)

        async def owned() -> AsyncIterator[GateDecided | Unreadable]:  # a value no decision too (verified)
            async for decision in decisions:
                if await self._owned(key, decision.release, context):
                    yield decision

        checked = verified(owned(), self.verifier,
                           refused=lambda exc: log.warning("not streaming gate decision: %s", exc.message))
        # A cancellation of the call lost on its way (`raise_if_cancelled`) is seen within a second, as a revoked key is.
        allowed = while_allowed(checked, lambda: raise_if_cancelled() and self.keys.authenticate(presented),
                                every_s=TRUST_CHECK_S)
        try:
            # Initial metadata tells the client the watch is live: later decisions will arrive.
            await context.send_initial_metadata((("lockgate-watch", "ready"),))
            try:
                async with _bus_answers(context):  # its first read fails at once, as GetDecision's does
                    async for decision in allowed:
                        yield decision_to_proto(decision)
            except DecisionWithdrawn as exc:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, exc.message)
            except AuthError as exc:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{key.label} is no longer valid "
                                    f"({exc.message}): this watch ends; watch again with a live key")
        finally:
            await allowed.aclose()
            await checked.aclose()
            await decisions.aclose()


class GrpcServer:
    """The gRPC API on one port (0 picks a free one; read `.port` after start)."""

    def __init__(self, bus: Bus, host: str = "127.0.0.1", port: int = 0, settings: Settings | None = None) -> None:
        self.bus = bus
        self.host = host
        self.port = port
        # the configured trust roots only (trust file, pinned PEMs), never keys published on the bus
        self.settings = settings or Settings()
        self.verifier = Verifier(bus, self.settings)
        self.keys = KeyStore.of(self.settings)  # every call presents one of these API keys
        # Requests decoded and Send batches checked and encoded: threads of their own, at most 64 requests at once.
        self.work = OffLoop("grpc-ingest", busy="too many gRPC requests being decoded or checked; retry shortly")
        self._server: grpc.aio.Server | None = None

    async def _admit(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """A call's key, from its metadata alone, before its request is decoded: aborts one it refuses."""
        await authenticate(self.keys, context, sender=method == SEND)

    @property
    def address(self) -> str:
        """host:port to dial."""
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve."""
        # The key is looked at before a request is decoded, and a large one decoded in the server's threads.
        server = grpc_server(options=keepalive(self.settings.router_cut_off_s), requests=Requests(self._admit, self.work))
        limits = EventLimits.from_settings(self.settings)
        ingest = IngestServicer(self.bus, self.keys, self.work, limits)
        server.add_generic_rpc_handlers((ingest_handler(ingest, SEND_MAX_EVENTS),))
        gates = GatesServicer(self.bus, self.verifier, self.keys, cut_off_s=self.settings.router_cut_off_s)
        gates_pb2_grpc.add_GatesServicer_to_server(gates, server)
        self.port = await bind_grpc(server, self.host, self.port, grpc_credentials(self.settings), what="gRPC",
                                    flag="--grpc-port")
        await server.start()
        self._server = server
        log.info("gRPC API on %s", self.address)

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls; running ones get `grace` seconds (open watches are then cancelled)."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        self.work.close()
