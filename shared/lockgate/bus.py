"""The NATS edge: one nats-py connection per process for topology, publish with idempotency headers,
KV, object store, request/reply and the durable pull consumers, whose edge owns ack and the DLQ."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import ssl
import time
import types
import typing
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import msgspec.inspect as mi
import nats
import nats.aio.client
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    ObjectInfo,
    ObjectMetaOptions,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.object_store import OBJ_DEFAULT_CHUNK_SIZE
from nats.nuid import NUID

from lockgate import metrics, permissions, propagation
from lockgate.batcher import Batcher
from lockgate.codec import UNDECODABLE, Codec, encode
from lockgate.contracts import DeadLetter, Event, InferenceEvent
from lockgate.credentials import NatsAuth, NotAllowed
from lockgate.errors import (
    BusClosed,
    BusUnavailable,
    BusUnreachable,
    InvalidEvent,
    LockgateError,
    NotFound,
    OriginalAltered,
    PayloadTooLarge,
    Retryable,
    StoreNotCreated,
)
from lockgate.ids import batch_id, derived_ids
from lockgate.kvread import kv_keys
from lockgate.limits import EventLimits
from lockgate.natsclient import NatsClient, TlsNotOffered, wire_size
from lockgate.redact import scrub_bytes, scrub_events, scrub_mapping, scrub_secrets, shown_url
from lockgate.retry import RetryPolicy
from lockgate.subjects import DLQ_ORIGINALS_MAX_BYTES, StreamSpec, Subjects

log = logging.getLogger("lockgate.bus")

# Delay before JetStream redelivers a nacked message, by its delivery count (jittered, so the
# messages of one failed batch do not all come back in the same instant).
NACK_BACKOFF = RetryPolicy(initial_s=0.2, max_s=30.0)
# Delay before JetStream redelivers a message whose letter was not stored (the DLQ full or down), by its delivery
# count: it grows to minutes, so messages that cannot be settled yet come back seldom and leave the consumer's workers
# to the messages behind them (at 30 s, about 440 of them took every delivery of the sink's inference consumer).
LETTER_BACKOFF = RetryPolicy(initial_s=0.2, max_s=300.0)
# Losses of the connection whose times `lost_at` keeps (a reader this many losses behind reads from the oldest kept).
_LOSSES_KEPT = 64
# Pause after a failed fetch (reconnecting, consumer gone), by consecutive failures.
FETCH_BACKOFF = RetryPolicy(initial_s=0.1, max_s=5.0)
# A pull request lives this long on the server, so one orphaned by a stop expires soon.
FETCH_TIMEOUT_S = 1.0
# How long a stop waits for in-flight handlers; what is still running then is cancelled, unacked,
# and redelivered after ack_wait.
GRACE_S = 10.0
# A dead letter must fit in one NATS message (1 MB by default) with its payload in base64: a larger
# payload is cut to this, and the whole original is kept in the dead-letter originals bucket (`original_name`).
MAX_LETTER_PAYLOAD = 256 * 1024
# Declaring streams, buckets and consumers: JetStream API calls the cluster's metadata leader answers.
# Between two leaders, or with many processes starting at once, one can time out; each is idempotent.
API_RETRY = RetryPolicy(attempts=6, initial_s=0.2, max_s=3.0)
_API_TRANSIENT = (TimeoutError, nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError)
# The JetStream API's subject prefix (no JetStream domain is used).
_API = "$JS.API"
# JetStream's answers to a put that mean the bucket will not take it until an operator acts: its store failed
# (maximum bytes or messages exceeded), or the server's storage is exhausted. Retried, they only come back.
_STORE_REFUSED = frozenset({10077, 10047, 10023})
# nats-server's one answer to any failure to make a stream's store (its log alone names the cause). It clears
# what it half made, so a second declaration may pass: a CI run met it once among thousands of declarations.
_STORE_NOT_CREATED = 10049
# nats-server's answer to a create of a stream that exists with another configuration (a create with the same one
# is answered with the stream): how a declaration that may only create tells that a stream differs from lockgate's.
_STREAM_EXISTS_OTHERWISE = 10058
# nats-server's answer to a create of a stream whose subjects another stream captures: on a home made before a
# subject moved to a stream of its own (cost records), until the old stream is narrowed (admin's update does it first).
_SUBJECTS_OVERLAP = 10065
# How `Bus.ensure_topology` names a stream it could not make for that reason (and so declares no readers on).
_OVERLAPPED = "missing: another stream still captures its subjects"
# The admin command that brings existing streams and buckets to lockgate's configuration (`Bus.ensure_topology`
# with `update`): a service's identity may only create what is missing.
TOPOLOGY_APPLY = "lockgate --role admin topology apply"
# How a kept stream (`Subjects.kept_streams`: the records of who did what) that differs from lockgate's configuration
# is named: no lockgate identity may change it, admin included (permissions.kept), so every declaration leaves it.
KEPT_BY_OPERATOR = "kept: only the server's operator changes it, with nats-server's own tools"
# How many messages waiting for their letter a bus remembers (`letters_waiting`): each is warned about once.
_UNSENT_MAX = 10_000
# A dead letter's payload from this size up is scrubbed off the event loop (`Bus._scrubbed_payload`): scrubbing 900 KB
# of random bytes takes about half a second of CPU, which held every service sharing the loop (probe p16 F3).
_SCRUB_OFF_LOOP = 64 * 1024
# How many bytes of payloads a bus remembers the scrubbed form of, so a message whose letter waits (its original's
# put failed, the DLQ is down) is not scrubbed again at each redelivery.
_SCRUBBED_MAX_BYTES = 32 * 1024 * 1024
# How long a health check waits for the bus's answers (`Bus.health`): a nats-server that works answers in
# milliseconds (a busy one, just restarted, in tenths of a second), and a probe's own timeout (1 s by default in
# Kubernetes) must not run out first.
HEALTH_DEADLINE_S = 0.8
# How long a first connection waits for nats-server's greeting (a hung server accepts the TCP connection, then says
# nothing).
CONNECT_TIMEOUT_S = 5


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



Handler = Callable[[Any, Delivery], Awaitable[None]]
BatchHandler = Callable[[list[tuple[Any, Delivery]]], Awaitable[None]]


@dataclass(frozen=True, eq=False)
class ConsumerSpec:
    """One durable pull consumer: where it reads, how much at once, and the edge run on each message."""

    subject: str
    stream: str  # the JetStream stream's name
    durable: str
    origin: str
    config: ConsumerConfig
    batch_size: int
    max_workers: int
    ordered: bool
    on_message: Callable[[Msg], Awaitable[None]]
    # Run after a stop, once in-flight handlers are done (e.g. close a batcher).
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


class Consumers:
    """The durable consumers one service registers with `consume`; the bus it is included in starts them."""

    def __init__(self) -> None:
        self.specs: list[ConsumerSpec] = []

    def add(self, spec: ConsumerSpec) -> None:
        """Register one consumer."""
        self.specs.append(spec)

    def __iter__(self) -> Iterator[ConsumerSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def stream_full(stored: int, max_bytes: int, max_payload: int) -> bool:
    """Whether a discard-new stream holding `stored` of its `max_bytes` refuses publishes: less room than one large
    message (a tenth of the stream, at most `max_payload`, the largest the server accepts)."""
    return max_bytes > 0 and max_bytes - stored < min(max_payload, max_bytes // 10)


def _stream_config(spec: StreamSpec, replicas: int) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        storage=StorageType.FILE,
        max_age=spec.max_age_s,
        max_bytes=spec.max_bytes,
        discard=DiscardPolicy.NEW if spec.discard == "new" else DiscardPolicy.OLD,
        duplicate_window=spec.duplicate_window_s,
        deny_delete=spec.append_only,
        deny_purge=spec.append_only,
        num_replicas=replicas,
        retention=RetentionPolicy.INTEREST if spec.retention == "interest" else RetentionPolicy.LIMITS,
    )


def _kv_config(bucket: str, replicas: int, *, history: int, ttl: float | None = None) -> StreamConfig:
    # A KV bucket's stream as nats-py's `create_key_value` (2.16) makes it, so the buckets every home has are the
    # same configuration (a create of them is answered, not refused) and nats-py opens them as buckets. No
    # allow_direct: a get is a STREAM.MSG.GET, answered by the stream's leader, so a key read after its writer's
    # acknowledged put sees that write (the decision watch reads a key when the gatekeeper announces it); a direct
    # get may be answered by a replica that has not applied it yet.
    return StreamConfig(
        name=f"KV_{bucket}", subjects=[f"$KV.{bucket}.>"], allow_rollup_hdrs=True, allow_msg_ttl=True,
        deny_delete=True, discard=DiscardPolicy.NEW, duplicate_window=min(ttl, 120.0) if ttl else 120.0,
        max_age=ttl, max_consumers=-1, max_msgs=-1, max_msgs_per_subject=history, num_replicas=replicas)


def _object_config(bucket: str, replicas: int, *, ttl: float | None = None, max_bytes: int = -1) -> StreamConfig:
    # An object store's stream as nats-py's `create_object_store` (2.16) makes it.
    return StreamConfig(
        name=f"OBJ_{bucket}", subjects=[f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"], max_age=ttl, max_bytes=max_bytes,
        max_consumers=0, num_replicas=replicas, discard=DiscardPolicy.NEW, allow_rollup_hdrs=True, allow_direct=True)


# The releases bucket: every key written once, by the server's rule (one value per release name). A create alone
# (expected last sequence 0) is only what the client asks for; any identity that may put to the bucket could
# otherwise overwrite, delete or purge a bound name with a plain put, and a release PASSed for one bundle would then
# serve another. A second message on a key's subject is refused (discard new per subject at one message), and so
# are rollups, deletes and purges.
WRITE_ONCE = {"max_msgs_per_subject": 1, "discard": DiscardPolicy.NEW, "discard_new_per_subject": True,
              "allow_rollup_hdrs": False, "deny_delete": True, "deny_purge": True}


# The object stores: every release, pinned policy and eval case set is read from the artifact store by hash, and a
# cut dead letter's whole original from the other, so no writer may take the others' objects away. A purge is
# refused, and so is a rollup header, which nats-server honours on any subject of the stream its sender may publish
# to: `Nats-Rollup: all` on a chunk subject emptied the store as a purge does (probe p33 F4). lockgate's puts send
# neither (Bus.put_object); nats-py's put sends both, so it cannot write these stores.
UNPURGED = {"allow_rollup_hdrs": False, "deny_purge": True}


def topology(subjects: Subjects, replicas: int) -> list[tuple[StreamConfig, StreamSpec | None]]:
    """Every stream and bucket lockgate declares, as its configuration (with the StreamSpec of a stream)."""
    out: list[tuple[StreamConfig, StreamSpec | None]] = [
        (_stream_config(spec, replicas), spec) for spec in subjects.streams.values()]
    kv = [_kv_config(b, replicas, history=10) for b in (
        subjects.kv_gates, subjects.kv_routes, subjects.kv_keys, subjects.kv_drift, subjects.kv_eval_runs,
        subjects.kv_gitops, subjects.kv_vetoes)]
    kv.append(_kv_config(subjects.kv_releases, replicas, history=1).evolve(**WRITE_ONCE))
    # Cached upstream responses expire so a stale answer never outlives a model update for long.
    kv.append(_kv_config(subjects.kv_eval_cache, replicas, history=1, ttl=7 * 24 * 3600))
    # The audit chain's head; its history lets an operator see the last few heads.
    kv.append(_kv_config(subjects.kv_audit, replicas, history=10))
    # Budget counters: one value per budget and period, gone two months after its last write.
    kv.append(_kv_config(subjects.kv_budgets, replicas, history=1, ttl=62 * 24 * 3600))
    # The router's shared response cache: entries carry their own expiry; a day bounds any of them.
    kv.append(_kv_config(subjects.kv_response_cache, replicas, history=1, ttl=24 * 3600))
    # Who owns each Responses state: every key written by a create, or its owner's renewal, each carrying its own
    # expiry (Nats-TTL, settings.router_response_owner_ttl_s, as long as the provider keeps the state), so the bucket
    # sets none.
    kv.append(_kv_config(subjects.kv_response_owners, replicas, history=1))
    # The router's secret: its first value kept for good, as a release's binding is (a replica's create that loses
    # the race is refused), so no writer can swap the key that every rollout's split and user hash depend on.
    kv.append(_kv_config(subjects.kv_router_secret, replicas, history=1).evolve(**WRITE_ONCE))
    objects = [_object_config(subjects.object_store, replicas).evolve(**UNPURGED),
               # The whole originals of cut dead letters, for as long as the letters' own stream keeps letters (the
               # `dead_letters` table keeps them as long by default); a full bucket refuses new objects.
               _object_config(subjects.object_dead_letters, replicas, ttl=subjects.streams["dlq"].max_age_s,
                              max_bytes=DLQ_ORIGINALS_MAX_BYTES).evolve(**UNPURGED)]
    return out + [(cfg, None) for cfg in kv + objects]


# What nats-server stores for a setting a create leaves out: not a difference.
_SERVER_DEFAULTS: dict[str, Any] = {"retention": "limits", "storage": "file", "discard": "old", "num_replicas": 1,
                                    "duplicate_window": 120 * 10**9, "compression": "none"}


def config_differences(want: StreamConfig, have: StreamConfig) -> list[str]:
    """The settings of an existing stream (`have`, as nats-server reports it) that differ from lockgate's (`want`),
    by name: a setting lockgate leaves out counts only if the server holds something else than its default there
    (a `sources` someone added, say)."""
    w, h = want.as_dict(), have.as_dict()

    def value(d: dict[str, Any], key: str) -> Any:
        v = d.get(key)
        v = getattr(v, "value", v)  # enums as the server spells them
        v = _SERVER_DEFAULTS.get(key) if v in (None, False, 0, -1, "", [], {}) else v
        return None if v == _SERVER_DEFAULTS.get(key, ...) else v

    # metadata: nats-server writes its own (`_nats.*`) there.
    return sorted(k for k in w.keys() | h.keys() if k not in ("name", "metadata") and value(w, k) != value(h, k))


class Bus:
    """One process's connection to NATS: publishing, KV, objects, request/reply and pull consumers."""

    def __init__(self, url: str, subjects: Subjects | None = None, *, name: str = "lockgate",
                 auth: NatsAuth | None = None, manage_topology: bool = True, update_topology: bool = True,
                 replicas: int = 1, wait_for_server: bool = True) -> None:
        self.url = url
        # A service waits for its server however late it starts (distributed start order); a CLI command
        # is told at once that nothing answers.
        self.wait_for_server = wait_for_server
        self.subjects = subjects or Subjects()
        self.name = name
        self.auth = auth or NatsAuth()
        # Only an identity allowed to create streams and buckets declares them (admin, sink, an open server), and
        # only one allowed to change an existing one's configuration (admin, an open server) brings it to
        # lockgate's: the others leave it and name it in `topology_differs` (see `ensure_topology`).
        self.manage_topology = manage_topology
        self.update_topology = update_topology
        self.topology_differs: list[str] = []
        # Copies of every stream and bucket it declares: 1 on a single server, 3 on a JetStream cluster.
        self.replicas = replicas
        # Subjects the server refused this connection (permissions violations arrive asynchronously).
        self.denied: list[str] = []
        self._waiters: list[tuple[str, asyncio.Future[None]]] = []
        self.servers = [u.strip() for u in url.split(",") if u.strip()]  # a cluster: comma-separated URLs
        self._unreached = 0  # servers the first connect could not reach (see `_on_error`)
        self.nc: nats.NATS | None = None
        self.js: Any = None
        # Consumers registered on the bus itself (tools, tests); services bring theirs via include().
        self.consumers = Consumers()
        self._registries: list[Consumers] = [self.consumers]
        self._loops: dict[ConsumerSpec, _PullLoop] = {}
        self._state_changed = asyncio.Condition()
        self.reconnects = 0  # times the connection came back after a loss
        # When the connection was last known to work (unix seconds): made, made again, or a health probe answered.
        # Kept at each loss, by the reconnections before it (`lost_at`): what a core subscription missed is read back
        # from then on, not from when nats-py noticed (a silent partition is noticed minutes late, by its pings).
        self._known_good = time.time()
        self._lost: OrderedDict[int, float] = OrderedDict()
        # Why nats-py closed the connection for good, if it did (a protocol error: it never reconnects after one);
        # None while open or once closed by `close`.
        self.closed_error: BusClosed | None = None
        self._closing = False
        self._revive: asyncio.Future[None] | None = None  # a reconnection of a connection nats-py stopped reading
        # Letters this process could not store, by message id, with when it last tried: its message waits, and is
        # warned about once rather than at every redelivery (`letters_waiting`).
        self._unsent: dict[str, float] = {}
        # Scrubbed dead-letter payloads by the sha256 of their bytes (pending or done) and their sizes, oldest first,
        # and the one thread that scrubs them (`_scrubbed_payload`).
        self._scrubbed: OrderedDict[bytes, tuple[int, asyncio.Future[bytes]]] = OrderedDict()
        self._scrubbed_size = 0
        self._scrub_pool: ThreadPoolExecutor | None = None

    @property
    def max_payload(self) -> int:
        """The largest message the server accepts, as it said when this connection was made (NATS' default before)."""
        return self.nc.max_payload if self.nc is not None else 1 << 20

    async def connect(self) -> None:
        """Connect, then create streams, KV buckets and the object store (idempotent)."""
        nc = NatsClient()
        try:
            await nc.connect(
                self.servers, name=self.name, max_reconnect_attempts=-1, connect_timeout=CONNECT_TIMEOUT_S,
                allow_reconnect=True,
                error_cb=self._on_error, disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
                closed_cb=self._on_closed, **self.auth.options()
            )
        except NotAllowed:
            raise
        except nats.errors.Error as exc:
            raise (self._bad_credentials() if _is_auth_failure(exc) else
                   BusUnavailable(f"cannot reach NATS at {shown_url(self.url)}: {exc}")) from None
        except OSError as exc:
            raise BusUnavailable(f"cannot reach NATS at {shown_url(self.url)}: {exc}") from None
        self.nc = nc  # only now: `_on_error` tells the first connect's errors by its absence
        self._known_good = time.time()
        self._watch_reader()
        self.js = self.nc.jetstream()
        if self.manage_topology:
            await API_RETRY.call(self._declare, retry_on=(*_API_TRANSIENT, StoreNotCreated),
                                 what="declare streams and buckets")

    async def _declare(self) -> None:
        try:
            await self.ensure_topology()
        except nats.js.errors.ServerError as exc:
            if exc.err_code != _STORE_NOT_CREATED:
                raise
            raise StoreNotCreated(f"nats-server could not create a stream's store at {shown_url(self.url)} "
                                  f"({exc.description}): its log's 'Stream create failed' line says why") from None

    async def _on_state(self) -> None:
        async with self._state_changed:
            self._state_changed.notify_all()

    async def _on_closed(self) -> None:
        if self.nc is not None and not self._closing and self.closed_error is None:
            # Not by `close`: nats-py closed it after an -ERR from the server and will not reconnect. Nothing on this
            # connection works again (subscriptions, consumers, publishes), so it is said loudly, and the runtime
            # ends the process (`closed`) rather than serve on without it.
            cause = self.nc.last_error
            self.closed_error = BusClosed(
                f"NATS closed the connection of {self.name} for good ({cause or 'no reason given'}); nats-py does "
                "not reconnect after that, so its subscriptions and consumers are gone: the process stops for its "
                "supervisor to start it again")
            log.error("%s", self.closed_error.message)
        await self._on_state()

    async def closed(self) -> BusClosed:
        """Wait until nats-py closes the connection for good (never after `close`); returns why."""
        async with self._state_changed:
            await self._state_changed.wait_for(lambda: self.closed_error is not None)
        assert self.closed_error is not None
        return self.closed_error

    async def _on_disconnected(self) -> None:
        # Called again by each failed attempt to reconnect: the loss is the first call's.
        self._lost.setdefault(self.reconnects, self._known_good)
        while len(self._lost) > _LOSSES_KEPT:
            self._lost.popitem(last=False)
        await self._on_state()

    async def _on_reconnected(self) -> None:
        self._watch_reader()  # each connection has a read loop of its own
        self._known_good = time.time()
        self.reconnects += 1
        await self._on_state()

    def lost_at(self, after: int) -> float:
        """When the connection was last known to work (unix seconds) before its first loss once it had come back
        `after` times (`reconnects`); now if it was not lost since. What a core subscription missed is published
        from then on."""
        first = [at for n, at in self._lost.items() if n >= after]
        return first[0] if first else time.time()

    def _watch_reader(self) -> None:
        """Be told when nats-py's read loop of this connection ends (`_on_reader_ended`)."""
        reader = getattr(self.nc, "_reading_task", None)
        if reader is not None:
            reader.add_done_callback(self._on_reader_ended)

    def _reading(self) -> bool:
        """Whether nats-py reads what the server sends on this connection."""
        reader = getattr(self.nc, "_reading_task", None)
        return reader is None or not reader.done()

    def _on_reader_ended(self, reader: asyncio.Task[None]) -> None:
        # The read loop ends by itself when the connection is lost (nats-py reconnects) or closed; or when something
        # it called raised: nats-py 2.16 then logs "nats: encountered error" and stops reading, still "connected"
        # (a PONG for a flush its caller had cancelled: InvalidStateError). Nothing the server sent was read again,
        # requests, replies and acks alike, until nats-py's ping check called the connection stale 4 to 6 minutes
        # later (probe p39 F1). So it is reconnected here, as that check would have done; subscriptions come back
        # with the connection, and what they missed is read again after `reconnected`.
        nc = self.nc
        if nc is None or reader is not getattr(nc, "_reading_task", None) or self._closing or not nc.is_connected:
            return
        log.error("%s: nats-py stopped reading its NATS connection while connected (see 'nats: encountered error' "
                  "above): reconnecting", self.name)
        self._revive = asyncio.ensure_future(nc.force_reconnect())

    async def reconnected(self, after: int) -> int:
        """Wait until the connection has come back more than `after` times (`reconnects`); returns the new
        count. What core subscriptions missed meanwhile is lost to them: a caller reads it back from a stream."""
        async with self._state_changed:
            await self._state_changed.wait_for(lambda: self.reconnects > after)
        return self.reconnects

    async def lost(self, after: int) -> None:
        """Wait until the connection is lost (not connected), or has come back more than `after` times (a loss
        whose end came first)."""
        async with self._state_changed:
            await self._state_changed.wait_for(lambda: self.state != "connected" or self.reconnects > after)

    async def wait_state(self, state: str, timeout_s: float = 30.0) -> None:
        """Wait until the connection is in `state` (see `state`); woken by the client's callbacks."""
        async with self._state_changed:
            await asyncio.wait_for(self._state_changed.wait_for(lambda: self.state == state), timeout_s)

    async def _on_error(self, exc: Exception) -> None:
        text = str(exc)
        if self.nc is None and _is_auth_failure(exc):
            # Raised from the callback, it ends nats-py's first-connect loop, which would otherwise
            # retry wrong credentials forever (max_reconnect_attempts=-1).
            raise self._bad_credentials()
        if self.nc is None and not self.wait_for_server and isinstance(exc, OSError | TimeoutError):
            # Said once every URL of a cluster's failed: nats-py tries them in turn, one node down is no outage
            # (probe p30: the CLI gave up at the first node it picked). A stack that runs but whose bus restarts is
            # told apart by the CLI, which knows the home (cli/status.py).
            self._unreached += 1
            if self._unreached < len(self.servers):
                return
            why = _unreachable(exc)
            raise BusUnreachable(f"no lockgate stack answers at {shown_url(self.url)} ({why}); start one with "
                                 "`lockgate up` (or pass --nats URL / LOCKGATE_NATS_URL)", reason=why)
        if self.nc is None and isinstance(exc, TlsNotOffered):
            # A server (or whoever answers on the way) that does not offer TLS will not on the next attempt either.
            raise BusUnavailable(f"NATS at {shown_url(self.url)}: {exc}; check the URL (tls://) and LOCKGATE_TLS_CA")
        if self.nc is None and isinstance(exc, ssl.SSLError):
            # A certificate that does not verify will not verify on the next attempt either.
            raise BusUnavailable(f"TLS to NATS at {shown_url(self.url)} failed: {exc} (check LOCKGATE_TLS_CA)")
        if "permissions violation" in text.lower():
            # 'nats: Permissions Violation for Publish to "lg.gate.decided.x"': keep the subject
            subject = text.rpartition(" to ")[2].strip().strip('"')
            self.denied.append(subject)
            for waiting, fut in self._waiters:
                if waiting == subject.lower() and not fut.done():
                    fut.set_result(None)
            # A refused publish raises NotAllowed to its caller; a refused subscription has no caller to tell.
            log.log(logging.INFO if "for publish" in text.lower() else logging.WARNING, "%s: %s", self.name, text)
        else:
            log.debug("%s: NATS error %s", self.name, text)

    def _bad_credentials(self) -> NotAllowed:
        who = repr(self.auth.user) if self.auth.enabled else "a connection without credentials"
        return NotAllowed(f"NATS at {shown_url(self.url)} refused the credentials of {who} (check --home or LOCKGATE_HOME, "
                          "or LOCKGATE_NATS_USER and LOCKGATE_NATS_PASSWORD)")

    def refused(self, subject: str, action: str = "publish to") -> NotAllowed | None:
        """A NotAllowed error if the server refused `subject` to this connection, else None."""
        if subject.lower() in (d.lower() for d in self.denied):  # nats-py lowercases the server's message
            who = self.auth.user or "this connection"
            return NotAllowed(f"{who!r} may not {action} {subject} (NATS permissions violation); "
                              "from the CLI, a role that may: --role approver for reviews, operator for runs")
        return None

    def include(self, consumers: Consumers) -> None:
        """Run a service's consumers on this bus (from the next `start`)."""
        if all(c is not consumers for c in self._registries):
            self._registries.append(consumers)

    async def start(self) -> None:
        """Connect if needed, then start every registered consumer not yet running."""
        if self.nc is None:
            await self.connect()
        for registry in self._registries:
            for spec in registry:
                if spec not in self._loops:
                    loop = _PullLoop(self.js, spec)
                    await loop.start()
                    self._loops[spec] = loop

    async def stop_consumers(self) -> None:
        """Stop fetching, let in-flight handlers finish, unsubscribe; the connection stays open."""
        loops, self._loops = list(self._loops.values()), {}
        await asyncio.gather(*(loop.stop() for loop in loops))

    @property
    def state(self) -> str:
        """The connection as health checks report it: connected, reconnecting or closed."""
        if self.nc is None or self.nc.is_closed:
            return "closed"
        # Not reading while it says it is connected, it answers nothing: reconnected at once (`_on_reader_ended`).
        return "connected" if self.nc.is_connected and self._reading() else "reconnecting"

    async def close(self) -> None:
        """Stop consumers (finishing in-flight handlers), then drain the connection."""
        await self.stop_consumers()
        self._closing = True
        if self.nc is not None and not self.nc.is_closed:
            if self.nc.is_connected:
                await self.nc.drain()
            else:  # nats-py refuses to drain while reconnecting: a stop during an outage just closes
                await self.nc.close()
        if self._scrub_pool is not None:  # no handler is left to wait for a scrub
            self._scrub_pool.shutdown(wait=False, cancel_futures=True)
            self._scrub_pool = None
        self._scrubbed.clear()
        self._scrubbed_size = 0

    async def ensure_topology(self, update: bool | None = None) -> list[str]:
        """Declare every stream and bucket from subjects.py; safe to run any number of times. Returns the existing
        ones whose configuration differs from lockgate's, each with the settings that do: changed to lockgate's
        when `update` (default: the bus's `update_topology`), else left as they are and kept in `topology_differs`
        (log and health name them, and TOPOLOGY_APPLY). Only the admin identity may change an existing stream's
        configuration: whoever may do that can add a source that copies a subject it may publish into a bucket
        (a superseded PASS over a BLOCK in the gates bucket), lift the releases bucket's write-once rule, or age
        out decisions. A create is all a service needs, and nats-server refuses one that differs (10058).

        A kept stream (`Subjects.kept_streams`) is never changed, whatever `update`: no identity may (admin's update
        of one goes unanswered, permissions.kept). One that differs is left, logged and named in `topology_differs`
        with KEPT_BY_OPERATOR, and not returned."""
        update = self.update_topology if update is None else update
        kept = set(self.subjects.kept_streams)
        differs: list[str] = []
        left: list[str] = []  # kept streams that differ
        for cfg, spec in topology(self.subjects, self.replicas):
            fields = await self._declare_stream(cfg, update and cfg.name not in kept)
            if fields is not None:
                shown = f"{cfg.name} ({', '.join(fields) or 'settings nats-py does not show'})"
                (left if cfg.name in kept else differs).append(shown)
            # A stream left missing has no readers yet: admin's update makes both (an interest stream's, the ledger).
            if spec is not None and fields != [_OVERLAPPED]:
                await self._ensure_readers(spec)
        self.topology_differs = [f"{d}: {KEPT_BY_OPERATOR}" for d in left] + ([] if update else differs)
        if differs and not update:
            log.error("%s: %d of lockgate's streams and buckets differ from its configuration and are left as they "
                      "are (this identity may only create them): %s. After an upgrade, apply lockgate's with `%s`; "
                      "otherwise someone changed them: check each (`nats stream info NAME`) before applying",
                      self.name, len(differs), "; ".join(differs), TOPOLOGY_APPLY)
        if left:
            log.error("%s: %d of the streams that record who did what differ from lockgate's configuration and are "
                      "left as they are: %s. No lockgate identity may change them, admin included (nor delete or "
                      "purge them): only the server's operator does, with nats-server's own tools (docs/scale.md, "
                      "\"Changing a kept stream\"). Check each first (`nats stream info NAME`): unless an upgrade "
                      "or a home made before explains it, someone with the server's store or configuration changed it",
                      self.name, len(left), "; ".join(left))
        return differs

    async def _declare_stream(self, cfg: StreamConfig, update: bool) -> list[str] | None:
        """Create `cfg`'s stream if missing; None if it is there as `cfg` says, else the settings that differ (and,
        with `update`, it is changed to `cfg`)."""
        try:
            await self.js.add_stream(cfg)
            return None
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code == _SUBJECTS_OVERLAP and not update:
                # A service may not narrow the older stream: its subject keeps going there until admin applies
                # lockgate's configuration, and the new stream is named as differing (missing) meanwhile.
                return [_OVERLAPPED]
            if exc.err_code != _STREAM_EXISTS_OTHERWISE:
                raise
        fields = config_differences(cfg, (await self.js.stream_info(cfg.name)).config)
        if update:
            log.warning("stream %s differs from lockgate's configuration (%s): changing it", cfg.name,
                        ", ".join(fields) or "settings nats-py does not show")
            await self._update_stream(cfg)
        return fields

    async def _update_stream(self, cfg: StreamConfig) -> None:
        """Bring an existing stream to `cfg`. A home made before inference and dead letters kept their messages
        only while unconsumed has them under limits retention: nats-server (2.10 on) changes that in place, and
        the messages every consumer acknowledged already go. A server that refuses the change keeps the stream as
        it is, with a warning naming the way to migrate: it is not recreated here, since that would drop the
        events its consumers have not read yet."""
        try:
            await self.js.update_stream(cfg)
        except nats.js.errors.BadRequestError as exc:
            if cfg.retention != RetentionPolicy.INTEREST:
                raise
            log.warning("stream %s keeps its limits retention (%s): it fills with events already consumed and then "
                        "refuses every publish until they expire. To migrate, once its consumers show pending 0 "
                        "(`lockgate status`): stop the stack, `nats stream rm %s` and start it again (the stream is "
                        "recreated with interest retention)", cfg.name, exc.description or exc, cfg.name)
            await self.js.update_stream(cfg.evolve(retention=RetentionPolicy.LIMITS))

    async def _ensure_readers(self, spec: StreamSpec) -> None:
        """Declare the durable consumers an interest stream keeps its messages for (`StreamSpec.readers`), before
        any producer publishes: a message nobody has shown interest in yet would be dropped at once. Each service
        sets its own consumer's settings when it starts (the same name; a filter that may be narrower, as the
        evaluator's two, and then what no longer matches it is no longer kept for it); an existing one is left as
        it is, and one missing (a reader added since the home was made) is made, from the stream's first message
        still kept.

        Only admin (or an open server) declares another service's: a create of an existing consumer updates it
        whatever it changes, so no service may create one not its own (permissions `_manage_topology`). A service
        that declares the topology (the sink) makes its own and names the others missing: each is kept for from
        admin's declaration (`topology apply`, which compose, k8s and `lockgate dev cluster` run before the sink)
        or its own service's first start."""
        # None: every reader (admin, or a server without users, where anyone may)
        may_all = self.update_topology or not self.auth.enabled
        own = None if may_all else permissions.own_durables(self.subjects, self.auth.user)
        missing: list[str] = []
        for durable in spec.readers:
            try:
                await self.js.consumer_info(spec.name, durable)
            except nats.js.errors.NotFoundError:
                if own is not None and durable not in own:
                    missing.append(durable)
                    continue
                await self.js.add_consumer(spec.name, ConsumerConfig(
                    name=durable, durable_name=durable, filter_subject=spec.subjects[0], ack_policy=AckPolicy.EXPLICIT))
        if missing:
            log.warning("%s: stream %s keeps nothing yet for %s (not this identity's to declare): an event published "
                        "before its service first starts is not kept for it unless admin declares it first with `%s`",
                        self.name, spec.name, ", ".join(missing), TOPOLOGY_APPLY)

    async def health(self, deadline_s: float = HEALTH_DEADLINE_S) -> tuple[str, list[dict[str, Any]]]:
        """The bus as health checks report it, within `deadline_s` whatever nats-server does: its `state`, or
        "unresponsive" when connected but the server did not answer in time (hung, or too busy: every request to it
        then waits), and the streams that refuse publishes (`full_streams`; none known when not answered)."""
        state = self.state
        if state != "connected":
            return state, []
        began = time.time()
        try:
            async with asyncio.timeout(deadline_s):
                full = await self.full_streams()
        except TimeoutError:
            return "unresponsive", []
        self._known_good = max(self._known_good, began)  # answered: it worked when asked
        return state, full

    async def full_streams(self, every: bool = False) -> list[dict[str, Any]]:
        """The streams that refuse publishes now, each {stream, bytes, max_bytes}: discard new and less room left
        than one large message (a tenth of the stream, at most the server's largest message). The streams producers
        fill at traffic rates (interest retention: every service may read their state), or `every` stream (an
        identity that may read them all: the CLI's status), and the dead-letter originals bucket's stream (every
        service writes there), with `bucket`: full, a cut letter goes without its whole original
        (`dead_letter`). A stream whose state cannot be read is left out. All are asked at once: a health check
        waits for the slowest answer, not for their sum (`health`)."""
        specs = [spec for spec in self.subjects.streams.values()
                 if spec.discard == "new" and (every or spec.retention == "interest")]
        states, originals = await asyncio.gather(asyncio.gather(*(self._stream_state(spec.name) for spec in specs)),
                                                 self.originals_state())
        out = [{"stream": spec.name, "bytes": state.bytes, "max_bytes": spec.max_bytes}
               for spec, state in zip(specs, states, strict=True)
               if state is not None and stream_full(state.bytes, spec.max_bytes,
                                                    self.max_payload)]
        if originals is not None and originals["full"]:
            out.append({k: originals[k] for k in ("stream", "bytes", "max_bytes", "bucket")})
        return out

    async def _stream_state(self, stream: str) -> Any:
        """The state of `stream` (nats-py's StreamState), or None if it cannot be read."""
        try:
            return (await self._unless_refused(f"{_API}.STREAM.INFO.{stream}",
                                               lambda: self.js.stream_info(stream))).state
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, NotAllowed) as exc:
            log.debug("%s: no state of stream %s: %r", self.name, stream, exc)
            return None

    async def originals_state(self) -> dict[str, Any] | None:
        """The dead-letter originals bucket as `lockgate status` and health show it: {bucket, stream, messages,
        bytes, max_bytes, full}, its limit as the server has it; None if its state cannot be read. Full by a full
        stream's rule (`stream_full`): the next large original may be refused."""
        bucket = self.subjects.object_dead_letters
        stream = f"OBJ_{bucket}"
        try:
            info = await self._unless_refused(f"{_API}.STREAM.INFO.{stream}", lambda: self.js.stream_info(stream))
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, NotAllowed) as exc:
            log.debug("%s: no state of bucket %s: %r", self.name, bucket, exc)
            return None
        max_bytes = info.config.max_bytes or 0
        full = info.config.discard == DiscardPolicy.NEW and stream_full(
            info.state.bytes, max_bytes, self.max_payload)
        return {"bucket": bucket, "stream": stream, "messages": info.state.messages, "bytes": info.state.bytes,
                "max_bytes": max_bytes, "full": full}

    @property
    def letters_waiting(self) -> int:
        """Messages whose letter this process could not store lately (the DLQ full or down) and has not stored
        since: each waits for it, redelivered (see `consume`). Lately: within two of the longest redelivery delays,
        so a message settled another way (another replica's letter) stops counting."""
        if not self._unsent:
            return 0
        since = time.monotonic() - 2 * LETTER_BACKOFF.max_s
        return sum(1 for at in self._unsent.values() if at >= since)

    async def kv(self, bucket: str) -> Any:
        """A KV bucket handle (created at connect)."""
        return await self.js.key_value(bucket)

    async def kv_entries(self, bucket: str) -> dict[str, bytes]:
        """Every live key of a KV bucket with its value, as of the call.

        Listed from the bucket stream's subjects, then one get per key (`kvread`), rather than by nats-py's
        `keys()`: that needs a consumer, which readers may not create, and its watcher can send "that was all"
        before the messages already on their way were counted (nats-io/nats.py#842), so a full bucket sometimes
        read as empty. A deleted or purged key's get says so: it is left out."""
        kv = await self.kv(bucket)
        out = {}
        for key in await self.kv_listed(bucket):
            try:
                entry = await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                continue  # deleted, or gone between the listing and the get
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                raise BusUnavailable(f"cannot read key {key} of bucket {bucket}: {exc!r}") from None
            out[key] = entry.value or b""
        return out

    async def kv_listed(self, bucket: str, under: str = "") -> list[str]:
        """The keys of a KV bucket with a stored message (`kvread.kv_keys`; `under`, ending in ".": those beneath it),
        deleted ones' markers included, in one request whatever their number."""
        try:
            return await self._unless_refused(f"{_API}.STREAM.INFO.KV_{bucket}",
                                              lambda: kv_keys(self.js, bucket, under))
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot list the keys of bucket {bucket}: {exc!r}") from None

    async def put_object(self, bucket: str, name: str, data: bytes) -> None:
        """Store `data` under `name` in object bucket `bucket` as nats-py's `ObjectStore.put` (2.16) does, the same
        chunks and metadata (its readers and ours read it), without its purges: that put purges the chunks of an
        earlier object of the name, and its own if it fails midway, and nats-server cannot tell such a subject purge
        from the whole bucket's (one API subject), which no identity may send to the artifact store
        (permissions.kept). Such chunks stay, read by no one: an object's metadata names its own chunks only. Nor a
        rollup header, which that store refuses (`UNPURGED`): each put adds a metadata message, and a name's last
        one is its object (nats-py's `get_info` and `object_bytes` read that one)."""
        nuid = NUID().next().decode()
        chunk_subject = f"$O.{bucket}.C.{nuid}"
        size = OBJ_DEFAULT_CHUNK_SIZE
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        for chunk in chunks:
            await self.js.publish(chunk_subject, chunk)
        info = ObjectInfo(name=name, bucket=bucket, nuid=nuid, size=len(data), chunks=len(chunks),
                          mtime=datetime.now(UTC).isoformat(), digest=object_digest(data),
                          options=ObjectMetaOptions(max_chunk_size=size))
        meta_subject = f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
        await self.js.publish(meta_subject, json.dumps(info.as_dict()).encode())

    async def keep_original(self, name: str, data: bytes) -> str:
        """Store a dead letter's whole original (scrubbed) under `name` (`original_name`), unless the bucket holds
        those bytes under it already (another consumer, or an earlier delivery, stored it). Returns "" once the
        bucket holds them, else why it refuses them for good (full, or gone: only an operator changes that);
        BusUnavailable if it cannot be reached (down, or no answer), when a later try may succeed."""
        bucket = self.subjects.object_dead_letters
        try:
            await self.js.object_store(bucket)  # a bucket that is gone refuses it for good, not until a retry
            # A put over an object whose bytes differ (altered in the bucket) repairs it; the altered chunks stay
            # until they age out with the bucket's max_age (`put_object` never purges).
            await self.put_unless_held(bucket, name, data)
        except nats.js.errors.BucketNotFoundError:
            return f"bucket {bucket} does not exist"
        except nats.js.errors.APIError as exc:
            if exc.err_code in _STORE_REFUSED:
                return f"bucket {bucket} refused it: {exc.description or repr(exc)}"
            raise BusUnavailable(f"cannot keep the original of a dead letter as {name} in bucket {bucket}: "
                                 f"{exc!r}") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot keep the original of a dead letter as {name} in bucket {bucket}: "
                                 f"{exc!r}") from None
        return ""

    async def kept_original(self, name: str) -> bool:
        """Whether the dead-letter originals bucket holds an object under `name` with the bytes its name says
        (`holds`: the sink deletes a cut letter's message on this word, the one other copy of those bytes)."""
        return await self.holds(self.subjects.object_dead_letters, name, name.rpartition(".")[2])

    async def holds(self, bucket: str, name: str, sha256_hex: str) -> bool:
        """Whether object bucket `bucket` holds under `name` bytes whose sha256 is `sha256_hex`: the bytes read as
        every reader reads them (`object_bytes`), and hashed. BusUnavailable if it cannot be read.

        Never judged by the object's metadata: its `digest` is written by whoever may write the bucket, as any
        other field. Metadata pointing at other chunks while claiming the real content's digest (which the hash
        alone gives) passed for that content, so registering it again skipped its put and left every reader
        refusing the artifact for good (probe p82 F1). A read is as many message gets as the object has chunks
        (128 KiB each), what its put publishes."""
        try:
            data = await self.object_bytes(bucket, name, _Unreadable, f"object {name}")
        except _Unreadable:  # metadata no reader can follow: not held, and a put replaces it
            return False
        return data is not None and hashlib.sha256(data).hexdigest() == sha256_hex

    async def put_unless_held(self, bucket: str, name: str, data: bytes) -> None:
        """Put `data` under `name` (`put_object`) unless the bucket holds those very bytes there (`holds`): the same
        bytes again would only add chunks, and anything else under the name (altered in the bucket, or claimed before
        the content was first put) is repaired by the put, as the name's last metadata is the one read."""
        if not await self.holds(bucket, name, hashlib.sha256(data).hexdigest()):
            await self.put_object(bucket, name, data)

    async def original(self, name: str) -> bytes | None:
        """The whole original of a cut dead letter (`DeadLetter.original`), or None once it expired; OriginalAltered
        if the bucket holds other bytes than its name's sha256 says (every service may write there)."""
        bucket = self.subjects.object_dead_letters
        data = await self.object_bytes(bucket, name, OriginalAltered, f"dead-letter original {name}")
        if data is not None and hashlib.sha256(data).hexdigest() != name.rpartition(".")[2]:
            raise OriginalAltered(f"dead-letter original {name} is altered: the bucket holds {len(data):,} bytes "
                                  "under its name that are not the ones its sha256 names; they are not shown")
        return data

    async def object_bytes(self, bucket: str, name: str, altered: type[NotFound], what: str) -> bytes | None:
        """The bytes object bucket `bucket` holds under `name`, or None: no such object, deleted, or its first chunks
        expired already (written before the metadata). `altered(...)` naming `what` if its metadata is unreadable;
        the caller checks the bytes against what it expects.

        Read by message gets, as `stored_since` reads a stream: the CLI's roles may create no consumer (an object
        store's own `get` reads through one), and nothing is left on the server."""
        stream = f"OBJ_{bucket}"
        meta_subject = f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
        try:
            meta = await self._unless_refused(f"{_API}.STREAM.MSG.GET.{stream}",
                                              lambda: self.js.get_last_msg(stream, meta_subject))
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot read {what}: {exc!r}") from None
        try:
            info = json.loads(meta.data or b"{}")
            chunk_subject, chunks = f"$O.{bucket}.C.{info['nuid']}", int(info.get("chunks") or 0)
        except (ValueError, KeyError, TypeError):
            raise altered(f"{what} has unreadable metadata (altered in bucket {bucket})") from None
        if info.get("deleted"):
            return None
        data, seq = bytearray(), 1
        for _ in range(chunks):
            chunk = await self._next_stored(stream, chunk_subject, seq)
            if chunk is None:
                return None
            data += chunk.data or b""
            seq = chunk.seq + 1
        return bytes(data)

    async def stored(self, stream: str, seq: int) -> tuple[str, bytes] | None:
        """The subject and bytes of one stored message, or None if it is gone (deleted or expired)."""
        try:
            msg = await self._unless_refused(f"{_API}.STREAM.MSG.GET.{stream}", lambda: self.js.get_msg(stream, seq))
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot read message {seq} of stream {stream}: {exc!r}") from None
        return msg.subject or "", msg.data or b""

    async def stored_since(self, stream: str, subject: str, since: float) -> AsyncIterator[tuple[int, str, bytes]]:
        """The sequence, subject and bytes of each message on `subject` (wildcards allowed) stored at or after
        `since` (unix seconds), oldest first, up to the stream's last message when called.

        Read by message gets, not a consumer: an identity that may read the stream (`_read_stream`) needs no
        right to create consumers on it, and nothing is left on the server. The first message is found by a
        binary search on stored times (about log2 of the stream's length in gets; a get by start time would
        need nats-server 2.11, compose runs 2.10), then each next one on the subject is one get."""
        try:
            state = (await self._unless_refused(f"{_API}.STREAM.INFO.{stream}",
                                                lambda: self.js.stream_info(stream))).state
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot read the state of stream {stream}: {exc!r}") from None
        if not state.messages:
            return
        last = state.last_seq  # a bounded read: what is stored from now on is for a subscription to see
        lo, hi = state.first_seq, last + 1
        while lo < hi:  # the first sequence whose next message on `subject` is recent enough (or absent)
            mid = (lo + hi) // 2
            msg = await self._next_stored(stream, subject, mid)
            if msg is None or msg.seq > last or msg.time.timestamp() >= since:
                hi = mid
            else:
                lo = msg.seq + 1
        seq = lo
        while seq <= last and (msg := await self._next_stored(stream, subject, seq)) is not None and msg.seq <= last:
            yield msg.seq, msg.subject or "", msg.data or b""
            seq = msg.seq + 1

    async def last_seq(self, stream: str) -> int:
        """The sequence of the last message `stream` stored (0 if it never stored one)."""
        return int((await self._state(stream)).last_seq or 0)

    async def first_seq(self, stream: str) -> int:
        """The sequence of the oldest message `stream` still holds (past its last if it holds none): those before it
        are gone (its age or size limits, a purge)."""
        state = await self._state(stream)
        return int(state.first_seq or (state.last_seq or 0) + 1)

    async def _state(self, stream: str) -> Any:
        try:
            return (await self._unless_refused(f"{_API}.STREAM.INFO.{stream}",
                                               lambda: self.js.stream_info(stream))).state
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot read the state of stream {stream}: {exc!r}") from None

    async def last_stored(self, stream: str, subject: str) -> tuple[int, float] | None:
        """The sequence and stored time (unix seconds) of the last message stored on `subject` (no wildcards), or
        None if none is; one message get, as `stored_since` reads."""
        try:
            msg = await self._unless_refused(f"{_API}.STREAM.MSG.GET.{stream}",
                                             lambda: self.js.get_last_msg(stream, subject))
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot read the last message on {subject} of stream {stream}: {exc!r}") from None
        return int(msg.seq or 0), msg.time.timestamp() if msg.time else 0.0

    async def stored_after(self, stream: str, subject: str, seq: int) -> AsyncIterator[tuple[int, str, bytes]]:
        """The sequence, subject and bytes of each message on `subject` (wildcards allowed) stored after sequence
        `seq`, oldest first, up to the stream's last message when called; read by message gets, as `stored_since`."""
        last = await self.last_seq(stream)
        seq += 1
        while seq <= last and (msg := await self._next_stored(stream, subject, seq)) is not None and msg.seq <= last:
            yield msg.seq, msg.subject or "", msg.data or b""
            seq = msg.seq + 1

    async def _next_stored(self, stream: str, subject: str, seq: int) -> Any:
        """The first stored message on `subject` at or after `seq`, or None."""
        try:
            return await self._unless_refused(f"{_API}.STREAM.MSG.GET.{stream}",
                                              lambda: self.js.get_msg(stream, seq, subject, next=True))
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot read stream {stream} from message {seq}: {exc!r}") from None

    async def delete(self, stream: str, seq: int) -> None:
        """Delete one stored message (gone already is fine); only the sink's identity may (else NotAllowed)."""
        try:
            await self._unless_refused(f"{_API}.STREAM.MSG.DELETE.{stream}", lambda: self.js.delete_msg(stream, seq))
        except nats.js.errors.NotFoundError:
            return
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot delete message {seq} of stream {stream}: {exc!r}") from None

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
        propagation.inject(hdrs)
        try:
            return await self._unless_refused(subject, lambda: self.js.publish(subject, data, headers=hdrs, timeout=5))
        except nats.errors.MaxPayloadError:
            # Refused before the wire, headers counted (`NatsClient`). Not transient: retried, the same bytes are
            # refused again until the message is dead-lettered as "retries exhausted" (a cost ledger of 5,000
            # events was never billed that way).
            raise self._too_large(subject, data, wire_size(data, hdrs)) from None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise self.refused(subject) or BusUnavailable(
                f"JetStream did not acknowledge publish to {subject}: {exc!r}") from None

    def _too_large(self, subject: str, data: bytes, size: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"a message of {size:,} bytes ({len(data):,} of payload, {size - len(data):,} of "
                               f"headers) to {subject} is over the NATS server's max_payload "
                               f"({self.nc.max_payload:,} bytes)")

    async def request(self, subject: str, data: bytes, *, timeout_s: float) -> Msg:
        """A core NATS request; NotAllowed at once when the server refuses `subject` to this connection
        (nats-py's own errors otherwise: no responders, timeout, payload too large)."""
        return await self._unless_refused(subject, lambda: self.nc.request(subject, data, timeout=timeout_s))

    async def _unless_refused(self, subject: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Await `call()`, a publish or request on `subject`, or raise NotAllowed as soon as the server
        refuses that subject to this connection."""
        if refused := self.refused(subject):  # permissions do not change while connected
            raise refused
        pending = asyncio.ensure_future(call())
        try:
            if self.auth.enabled:
                # A refused publish gets no acknowledgement, only an -ERR: wait for whichever comes
                # first, so a permissions violation is reported at once instead of after the timeout.
                denied = asyncio.get_running_loop().create_future()
                self._waiters.append((subject.lower(), denied))
                try:
                    await asyncio.wait({pending, denied}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    self._waiters.remove((subject.lower(), denied))
                if denied.done():
                    raise self.refused(subject) or NotAllowed(f"NATS refused a publish to {subject}")
            return await pending
        finally:
            # Refused, or its caller gave up (a health check's deadline): no request is left waiting for an answer.
            pending.cancel()

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
        stream: str = "",
        stream_seq: int = 0,
        msg_id: str = "",
    ) -> None:
        """Send an unprocessable message to `<prefix>.dlq.<origin>` with the reason and its scrubbed bytes.

        A dead letter is kept for people to read: credential headers (Authorization, X-Api-Key,
        Cookie, ...) are masked whole, and keys, tokens and passwords in the payload, the other
        headers and the error are replaced by a marker, so parking a message never stores a secret.
        `stream` and `stream_seq` say where the original is stored: once the letter is stored, the
        sink deletes an unreadable original there (no other identity may delete a message).

        A payload over MAX_LETTER_PAYLOAD is cut in the letter and kept whole, scrubbed, in the dead-letter
        originals bucket first (`original`): streams keep a message only until its consumers acknowledge it, so
        the stream is no copy. If the bucket refuses it for good (full: `full_streams` names it), the letter is
        sent without it, its error saying the bytes past the cut were not kept and why; if the bucket cannot be
        reached, no letter is sent. BusUnavailable when no letter was stored (as when the DLQ refuses one): the
        caller leaves the message to be redelivered. Warned about once per message (`msg_id`)."""
        reason, error = scrub_secrets(reason), scrub_secrets(error[:2000])
        # Scrubbed whole, then cut: a secret across the cut is still recognised.
        size, cut_from, original, scrubbed = len(payload), 0, "", await self._scrubbed_payload(payload)
        try:
            if size > MAX_LETTER_PAYLOAD:
                cut_from, name = size, original_name(scrubbed, stream, stream_seq)
                # Full, the bucket stays full until its originals expire (30 days) or an operator makes room: a
                # message waiting for it would wait as long, and every message of its consumer behind the hundreds
                # an application can send. So the letter goes with the start and says what was lost.
                if refused := await self.keep_original(name, scrubbed):
                    error = (f"{error} [payload of {size} bytes cut to its first {MAX_LETTER_PAYLOAD}; its whole "
                             f"original was NOT kept ({refused}): the bytes past the cut are lost]")
                    if not msg_id or msg_id not in self._unsent:  # not a redelivery whose letter failed before
                        log.warning("dead letter from %s on %s: its whole original of %d bytes not kept (%s); the "
                                    "letter holds its first %d", origin, subject, size, refused, MAX_LETTER_PAYLOAD)
                else:
                    original = name
                    error = (f"{error} [payload of {size} bytes cut to its first {MAX_LETTER_PAYLOAD}; the whole "
                             f"original, scrubbed, is kept as {original}: `lockgate dlq --original {original}`]")
                scrubbed = scrubbed[:MAX_LETTER_PAYLOAD]
            letter = DeadLetter(
                origin=origin,
                subject=subject,
                reason=reason,
                error=error,
                payload=scrubbed,
                headers=scrub_mapping(headers or {}),
                deliveries=deliveries,
                stream=stream,
                stream_seq=stream_seq,
                cut_from=cut_from,
                original=original,
            )
            await self.publish(self.subjects.dlq(origin), letter, msg_id=msg_id or None)
        except BusUnavailable as exc:
            # The DLQ full or down: the caller leaves the message to be redelivered; this says it waits (once: a
            # redelivery of the same message is counted, not logged again).
            metrics.dead_letter_failed(origin)
            first = self._letter_failed(msg_id)
            log.log(logging.WARNING if first else logging.DEBUG, "dead letter from %s on %s not stored (%s: %s): its "
                    "message waits for redelivery%s", origin, subject, reason, exc.message,
                    " (logged once per message)" if msg_id else "")
            raise
        if msg_id:
            self._unsent.pop(msg_id, None)
        metrics.dead_letter(origin)
        log.warning("dead letter from %s on %s: %s", origin, subject, reason)

    async def _scrubbed_payload(self, payload: bytes) -> bytes:
        """`scrub_bytes(payload)`; a large payload's off the event loop, once while this bus remembers it."""
        if len(payload) < _SCRUB_OFF_LOOP:
            return scrub_bytes(payload)
        key = hashlib.sha256(payload).digest()
        if key in self._scrubbed:
            self._scrubbed.move_to_end(key)
            pending = self._scrubbed[key][1]
        else:
            if self._scrub_pool is None:
                # One thread: the scrub is pure Python holding the GIL, so more would only take the loop's share of
                # it; the loop still runs between the thread's switch intervals instead of waiting for the whole scrub.
                self._scrub_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlq-scrub")
            pending = asyncio.get_running_loop().run_in_executor(self._scrub_pool, scrub_bytes, payload)
            self._scrubbed[key] = (len(payload), pending)
            self._scrubbed_size += len(payload)
            while self._scrubbed_size > _SCRUBBED_MAX_BYTES and len(self._scrubbed) > 1:
                self._scrubbed_size -= self._scrubbed.popitem(last=False)[1][0]
        try:
            # Shielded: a caller that gives up (its consumer stopping) leaves the scrub to whoever else waits for it.
            return await asyncio.shield(pending)
        except Exception:
            if self._scrubbed.get(key, (0, None))[1] is pending:  # not remembered: the next delivery tries again
                self._scrubbed_size -= self._scrubbed.pop(key)[0]
            raise

    def _letter_failed(self, msg_id: str) -> bool:
        """Note a letter that was not stored (its message waits); False if this message's letter (`msg_id`)
        failed before and has not been stored since. A letter without a message id is always a first."""
        if not msg_id:
            return True
        first = self._unsent.pop(msg_id, None) is None
        self._unsent[msg_id] = time.monotonic()  # last: the oldest go first past _UNSENT_MAX
        while len(self._unsent) > _UNSENT_MAX:
            del self._unsent[next(iter(self._unsent))]
        return first


def original_name(data: bytes, stream: str = "", seq: int = 0) -> str:
    """The object name of a dead letter's whole original (`data`, scrubbed): the stream and sequence it was stored
    at, when known, and its sha256. Every consumer and redelivery lettering one message names one object (stored
    once), and a reader checks the bytes it gets against the name (any service may write to the bucket)."""
    digest = hashlib.sha256(data).hexdigest()
    return f"{stream}.{seq}.{digest}" if stream else digest


class _Unreadable(NotFound):
    """An object whose metadata no reader can follow (`Bus.holds`): the bytes the caller expects are not there."""


def object_digest(data: bytes) -> str:
    """The digest the object store records for `data` (`SHA-256=` and the URL-safe base64 of its sha256)."""
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


def _is_auth_failure(exc: BaseException) -> bool:
    return isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower()


def _unreachable(exc: BaseException) -> str:
    """Why a first connection failed, in words: a timeout says nothing of itself (nats-py raises a bare TimeoutError
    when a server accepts the connection but never greets, as a hung one does)."""
    if isinstance(exc, TimeoutError):
        return f"a server accepted the connection but sent nothing within {CONNECT_TIMEOUT_S} s: hung or overloaded?"
    return str(exc) or type(exc).__name__


class _PullLoop:
    """Fetches from one durable consumer on the bus's connection and runs the edge on every message."""

    def __init__(self, js: Any, spec: ConsumerSpec) -> None:
        self.spec = spec
        self._js = js
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Create (or update) the durable consumer, bind to it and start fetching."""
        s = self.spec
        try:
            try:
                # create-or-update: settings stay current
                await API_RETRY.call(lambda: self._js.add_consumer(s.stream, config=s.config), retry_on=_API_TRANSIENT,
                                     what=f"create consumer {s.durable}")
            except nats.js.errors.APIError as exc:
                # An existing consumer whose fixed settings differ (made by an older build) keeps
                # its position rather than stop the service; without one, the error stands.
                try:
                    await self._js.consumer_info(s.stream, s.durable)
                except nats.errors.Error:
                    raise exc from None
                log.warning("consumer %s kept as it is: %s", s.durable, exc.description)
            self._sub = await self._js.pull_subscribe_bind(durable=s.durable, stream=s.stream)
        except nats.errors.Error as exc:
            raise BusUnavailable(f"cannot create consumer {s.durable} on stream {s.stream}: {exc!r}") from None
        self._task = asyncio.create_task(self._run(), name=f"consume:{s.durable}")
        self._task.add_done_callback(self._exited)

    def _exited(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("consumer %s stopped fetching: %r", self.spec.durable, task.exception())

    async def _run(self) -> None:
        s = self.spec
        workers = 1 if s.ordered else s.max_workers
        # Fetch again once half the workers (or a whole batch) are free: fetches stay large, and
        # workers are not left idle until the slowest message of the last fetch is done.
        room = min(s.batch_size, max(1, workers // 2))
        stop = asyncio.ensure_future(self._stopping.wait())
        failures = 0
        try:
            while not self._stopping.is_set():
                if workers - len(self._in_flight) < room:
                    await asyncio.wait({*self._in_flight, stop}, return_when=asyncio.FIRST_COMPLETED)
                    continue
                # Ordered: one message at a time, so a slow handler never holds fetched messages
                # past their ack_wait; otherwise only as many as there are free workers.
                want = 1 if s.ordered else min(s.batch_size, workers - len(self._in_flight))
                fetch = asyncio.ensure_future(self._sub.fetch(want, timeout=FETCH_TIMEOUT_S))
                await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    # Stopping: whatever this fetch would have brought is redelivered after ack_wait.
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await fetch
                    return
                try:
                    msgs = fetch.result()
                except TimeoutError:  # nothing new within the fetch timeout
                    failures = 0
                    continue
                except nats.errors.ConnectionClosedError:
                    return
                except Exception as exc:  # reconnecting, or the consumer is gone: back off, keep going
                    failures += 1
                    log.warning("fetch from %s failed (%d in a row): %r", s.durable, failures, exc)
                    await asyncio.wait({stop}, timeout=FETCH_BACKOFF.delay(failures))
                    continue
                failures = 0
                for msg in msgs:
                    if s.ordered:
                        await self._handle(msg)
                    else:
                        task = asyncio.create_task(self._handle(msg))
                        self._in_flight.add(task)
                        task.add_done_callback(self._in_flight.discard)
        finally:
            stop.cancel()

    async def _handle(self, msg: Msg) -> None:
        try:
            await self.spec.on_message(msg)
        except Exception:  # an ack or nack that failed (connection lost): JetStream redelivers
            log.exception("consumer %s could not settle a message", self.spec.durable)

    async def stop(self) -> None:
        """Stop fetching, wait for in-flight handlers (at most GRACE_S), then unsubscribe."""
        self._stopping.set()
        clock = asyncio.get_running_loop()
        deadline = clock.time() + GRACE_S
        if self._task is not None:
            # The loop first: a fetch that ended together with the stop still starts its handlers.
            await asyncio.wait({self._task}, timeout=GRACE_S)
        running = {t for t in (self._task, *self._in_flight) if t is not None and not t.done()}
        if running:
            _, late = await asyncio.wait(running, timeout=max(0.0, deadline - clock.time()))
            for task in late:
                log.warning("consumer %s: handler still running after %.0fs; cancelled", self.spec.durable, GRACE_S)
                task.cancel()
            if late:
                await asyncio.wait(late)
        for hook in self.spec.on_stop:
            try:
                await hook()
            except Exception:
                log.exception("consumer %s: stop hook failed", self.spec.durable)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


def consume(
    bus: Bus,
    consumers: Consumers,
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
    max_ack_pending: int | None = None,
    limits: EventLimits | None = None,
    records_refusals: bool = True,
) -> ConsumerSpec:
    """Register a durable pull consumer whose handler gets decoded Structs.

    With `limits` (inference consumers), a message's events that break them, or that are not of the
    tenant and app its subject names, are dead-lettered with the reason and the handler gets the rest.
    Event times are judged against the time JetStream stored the message, so every consumer, and every
    redelivery, refuses the same events.

    `records_refusals=False` is for a consumer of a stream another consumer records (the sink records every
    inference message): what the edge refuses for the message's own sake (undecodable, over limits) is skipped
    without a letter, as the recorder's letter holds it. A bad message then costs this consumer a failed decode,
    not a scrubbed copy of its bytes, and garbage cannot hold it behind.

    With `ordered` (the default) the handler sees messages one by one in stream order, which
    stateful handlers (rollouts, drift windows, gate decisions) rely on; otherwise up to
    `max_workers` messages run concurrently, in no guaranteed order. `max_ack_pending=1` makes the
    order hold across replicas sharing the durable: the server hands out the next message only once
    the previous one is settled.

    The edge owns acknowledgement: undecodable -> DLQ + ack; Retryable -> nack with backoff
    (DLQ after max_deliver); any other failure -> DLQ + ack, so one bad message never stops
    the consumer. A message that cannot be dead-lettered is nacked, never lost: JetStream is given no
    max_deliver of its own (it would drop the message without a trace), the edge counts deliveries itself, and
    each redelivery comes later than the last (LETTER_BACKOFF, up to minutes). A large one whose whole original the
    originals bucket refuses (full) is not such a message: its letter goes without it (`Bus.dead_letter`).
    One letter per message and reason (a message id from the original's stream and sequence), however
    often the message is redelivered or however many consumers letter it.
    """
    if ordered and max_workers > 1:
        raise ValueError(f"consumer {durable}: ordered handling runs one message at a time; "
                         "pass ordered=False to use max_workers")
    codec: Codec[Any] = Codec(wire_type)
    # Inference events are scrubbed as they are decoded, so every consumer (the sink, cost, drift, the evaluator) gets
    # the same scrubbed events, whoever published them: the SDK and the router scrub before they publish, but an
    # application may publish its own events on its ingest subject, and the relay passes their bytes as they came.
    # Found by a probe (p10): an app's event with a key in its model, provider or error kept it in seven columns of
    # `inference_events`, in the cost ledger and rollups, the cost events and the drift snapshots.
    clean = scrub_events if _inference_only(wire_type) else None
    # An array whose whole decoding fails is decoded again event by event, so its bad events are refused alone.
    each = _EventByEvent(item_type) if clean is not None and (item_type := _item_type(wire_type)) is not None else None

    async def refuse(msg: Msg, headers: dict[str, str], deliveries: int, reason: str, error: str) -> None:
        if records_refusals:
            await _dead_letter_and_ack(bus, msg, origin, headers, deliveries, reason, error)
        else:
            log.debug("%s skipped message %d of %s (%s: %s); its recorder letters it", origin,
                      msg.metadata.sequence.stream, msg.metadata.stream, reason, error[:200])
            await msg.ack()

    async def on_message(msg: Msg) -> None:
        meta = msg.metadata
        deliveries = meta.num_delivered or 1
        headers = dict(msg.headers or {})
        body = msg.data
        refused: list[tuple[int, str]] = []  # (index, reason) of the message's events refused, for one letter
        undecoded: list[tuple[int, str]] = []  # those of an array that do not decode alone
        items: list[Any] | None = None  # that array's items: its events, and the msgspec.Raw of those
        try:
            # An id left out is derived from the message, the same for every consumer and redelivery.
            seed = (headers.get("Nats-Msg-Id") or f"{meta.stream}:{meta.sequence.stream}",
                    int(meta.timestamp.timestamp() * 1000))
            try:
                with derived_ids(*seed):
                    value = codec.decode(body)
            except InvalidEvent:
                if each is None or (split := each.decode(body, *seed)) is None:
                    raise  # not an array of events: the message is lettered whole
                items, undecoded = split
                value = [event for event in items if not isinstance(event, msgspec.Raw)]
            if clean is not None:
                value, refused = clean(value)
        except InvalidEvent as exc:
            await refuse(msg, headers, deliveries, "invalid event", exc.message)
            return
        except Exception as exc:  # whatever the decoder trips on is bad input: park it, never leave it unacked
            await refuse(msg, headers, deliveries, "invalid event", repr(exc))
            return
        # The message's own events, a lone one too (an object, not an array): a letter of the refused ones indexes them.
        events: list[Any] = value if isinstance(value, list) else [value]
        metrics.events_in(origin, len(events))
        over: list[tuple[int, str]] = []
        if limits is not None:
            sender = bus.subjects.sender(msg.subject)
            if sender is None:
                await refuse(msg, headers, deliveries, "over limits",
                             f"subject {msg.subject!r} names no tenant and app: events are "
                             f"published on {bus.subjects.prefix}.inference.<tenant>.<app>")
                return
            # Against the message's stored time, not this clock at read time: a consumer reading it later
            # (behind, or redelivered) must not refuse an edge event another one stored.
            _, over = limits.split(value, now=meta.timestamp, sender=sender)
        if items is not None:
            # Indexed as in the message, with the events that did not decode: the letter lists them all by `$[i]`.
            refused, over, events = _in_message(items, undecoded, value, refused, over)
        if refused or over:
            # An event the scrub refused (its id reads as a credential) is refused alone, as one over limits is: its
            # neighbours are handled (probe p16: the whole message was lettered). Its own reason is the one lettered.
            refused = sorted({**dict(over), **dict(refused)}.items())
            left_out = {i for i, _ in refused}
            kept = [] if -1 in left_out else [event for i, event in enumerate(events) if i not in left_out]
            if not kept:
                await refuse(msg, headers, deliveries, "over limits" if over else "invalid event",
                             "; ".join(r for _, r in refused[:20]))
                return
            value = kept
        if deliveries > max_deliver and not refused:
            # Delivered max_deliver times and never settled: its handler outlived ack_wait, its process died, or
            # its letter could not be stored. JetStream redelivers it for ever; the edge parks it here. (One with
            # refused events comes back until their letter is stored; its handler sees the valid ones again.)
            await _dead_letter_and_ack(bus, msg, origin, headers, deliveries, "retries exhausted",
                                       f"delivered {deliveries} times without being settled")
            return
        delivery = Delivery(
            subject=msg.subject,
            msg_id=headers.get("Nats-Msg-Id", ""),
            headers=headers,
            deliveries=deliveries,
            stream_seq=meta.sequence.stream,
            trace_context=propagation.extract(headers),
            in_progress=msg.in_progress,
        )
        try:
            await handler(value, delivery)
        except Retryable as exc:
            if deliveries >= max_deliver:
                await _dead_letter_and_ack(bus, msg, origin, headers, deliveries, "retries exhausted", exc.message)
            else:
                await msg.nak(delay=NACK_BACKOFF.delay(deliveries))
            return
        except LockgateError as exc:
            await _dead_letter_and_ack(bus, msg, origin, headers, deliveries, "rejected", exc.message)
            return
        except Exception as exc:  # a handler bug must not stop the consumer; keep the message
            log.exception("handler for %s failed", origin)
            await _dead_letter_and_ack(bus, msg, origin, headers, deliveries, "handler crashed", repr(exc))
            return
        # The refused events are lettered after the valid ones are handled: a letter the DLQ cannot take now holds
        # back only them (the redelivery finds the others handled: handlers keep one copy per event).
        if refused and records_refusals and not await _dead_letter_events(
                bus, msg, origin, headers, deliveries, events, refused, "over limits" if over else "invalid event"):
            return
        await msg.ack()

    spec = ConsumerSpec(
        subject=subject,
        stream=bus.subjects.streams[stream].name,
        durable=durable,
        origin=origin,
        config=ConsumerConfig(
            name=durable,
            durable_name=durable,
            filter_subject=subject,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            # Unlimited: past its max_deliver JetStream would drop a message unseen, one whose letter the DLQ
            # refused among them. The edge dead-letters after max_deliver deliveries itself (see above).
            max_deliver=-1,
            max_ack_pending=max_ack_pending,
        ),
        batch_size=max(1, batch_size),
        max_workers=max(1, max_workers),
        ordered=ordered,
        on_message=on_message,
    )
    consumers.add(spec)
    return spec


class _EventByEvent:
    """Decodes a message's JSON array one event at a time, when the decoding of the whole array failed: a bad
    event is then refused alone, as a scrub or the limits refuse one, and its neighbours are handled (probe p72 F1:
    one event's `input_tokens` of 2**32, a nested attribute or an unknown `type` lettered all its neighbours, which
    were never stored nor billed). Only a message that failed pays for this."""

    def __init__(self, item_type: Any) -> None:
        # The array is split by msgspec alone: the Codec checks the UTF-8 of the whole body, and one event's bad
        # bytes must be refused in that event. Each event is decoded by the Codec, as the whole message was.
        self._array = msgspec.json.Decoder(list[msgspec.Raw])
        self._event: Codec[Any] = Codec(item_type)

    def decode(self, body: bytes, seed: str, ms: int) -> tuple[list[Any], list[tuple[int, str]]] | None:
        """(the array's items in order: each event decoded, or the msgspec.Raw of one that does not decode, and
        [(index, reason)] of those), or None if `body` is no JSON array."""
        try:
            raws = self._array.decode(body)
        except UNDECODABLE:
            return None
        items: list[Any] = []
        failed: list[tuple[int, str]] = []
        # A fresh derivation, run in order as the whole decoding runs: every consumer derives the same ids.
        with derived_ids(seed, ms):
            for i, raw in enumerate(raws):
                try:
                    items.append(self._event.decode(bytes(raw)))
                except InvalidEvent as exc:
                    items.append(raw)
                    failed.append((i, _at_index(exc.message, i)))
        return items, failed


def _item_type(wire_type: Any) -> Any:
    """The item type of the list among `wire_type` (`list[X] | X` or `list[X]`), None if it takes no list."""
    members = typing.get_args(wire_type) if typing.get_origin(wire_type) in (typing.Union, types.UnionType) \
        else (wire_type,)
    return next((typing.get_args(t)[0] for t in members if typing.get_origin(t) is list), None)


def _at_index(reason: str, i: int) -> str:
    """An event's decoding error (its paths from `$`, the event) worded for the array it came in (`$[i]`)."""
    return reason.replace("`$", f"`$[{i}]") if "`$" in reason else f"{reason} - at `$[{i}]`"


def _in_message(items: list[Any], undecoded: list[tuple[int, str]], value: list[Any], refused: list[tuple[int, str]],
                over: list[tuple[int, str]]) -> tuple[list[tuple[int, str]], list[tuple[int, str]], list[Any]]:
    """The refusals of the decoded events (`value`, indexed among themselves) reindexed as in the message's `items`,
    with those of the `undecoded` ones, and the items with the decoded events as scrubbed."""
    at = [i for i, item in enumerate(items) if not isinstance(item, msgspec.Raw)]
    events = list(items)
    for j, event in enumerate(value):
        events[at[j]] = event

    def moved(pairs: list[tuple[int, str]]) -> list[tuple[int, str]]:
        # -1 (the whole message, too many events) stays; an event's path `$[j]` becomes its own in the message.
        return [(i, r) if i < 0 else (at[i], r.replace(f"`$[{i}]", f"`$[{at[i]}]")) for i, r in pairs]

    return undecoded + moved(refused), moved(over), events


def _inference_only(wire_type: Any) -> bool:
    """True when `wire_type` decodes to inference events only (one, or a list of them)."""
    info = mi.type_info(wire_type)
    tops = info.types if isinstance(info, mi.UnionType) else (info,)
    return all(isinstance(t := top.item_type if isinstance(top, mi.ListType) else top, mi.StructType)
               and t.cls is InferenceEvent for top in tops)


class _BatchEdge:
    """Feeds the messages of concurrent handlers into one Batcher, so a sink writes one insert for
    many messages while each message is still acked or dead-lettered on its own."""

    def __init__(self, flush: BatchHandler, *, max_items: int, max_age_s: float, name: str,
                 max_rows: int | None = None, rows: Callable[[Any], int] | None = None) -> None:
        self._flush = flush
        self._max_items = max_items
        self._max_age_s = max_age_s
        self._max_rows = max_rows if rows is not None else None
        self._rows = rows
        self._name = name
        self._batcher: Batcher[tuple[Any, Delivery]] | None = None

    async def submit(self, value: Any, delivery: Delivery) -> None:
        """Queue one decoded message and wait for the flush that stores it (raising what it raised)."""
        if self._batcher is None:  # made per start: a closed batcher cannot be reopened
            rows = self._rows
            self._batcher = Batcher(
                self._flush,
                max_items=self._max_items,
                max_age_s=self._max_age_s,
                # Sized by the rows its messages hold where the handler says how many: a message may
                # carry one event or hundreds.
                max_bytes=self._max_rows,
                size=(lambda item: rows(item[0])) if rows is not None else None,
                # A retryable failure (store down) nacks the whole batch; anything else is retried
                # item by item, so one poison message is dead-lettered alone.
                isolate=lambda exc: not isinstance(exc, Retryable),
                name=self._name,
            )
        await self._batcher.submit((value, delivery))

    async def close(self) -> None:
        """Stop the batcher (its items are already flushed once every handler returned)."""
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await batcher.close()


def consume_batch(
    bus: Bus,
    consumers: Consumers,
    *,
    handler: BatchHandler,
    batch_size: int = 32,
    max_wait_s: float = 0.005,
    max_rows: int | None = None,
    rows: Callable[[Any], int] | None = None,
    **options: Any,
) -> ConsumerSpec:
    """Like `consume`, but concurrently handled messages are gathered into one handler call, so a
    sink writes one large insert instead of one per message. Acknowledgement and dead-lettering
    stay per message, in the `consume` edge.

    A handler call gets at most `batch_size` messages, or fewer holding `max_rows` rows (`rows`
    counts a decoded message's), or those that came within `max_wait_s` of the first."""
    edge = _BatchEdge(handler, max_items=batch_size, max_age_s=max_wait_s, name=f"consumer:{options['durable']}",
                      max_rows=max_rows, rows=rows)
    # Twice the batch in flight: one batch is written while the next one fills.
    spec = consume(bus, consumers, handler=edge.submit, batch_size=batch_size, max_workers=2 * batch_size,
                   ordered=False, **options)
    spec.on_stop.append(edge.close)
    return spec


def _letter_id(msg: Msg, reason: str, origin: str = "") -> str:
    """The message id of the letter for one stored message and reason: JetStream keeps one within the DLQ's
    duplicate window, whichever consumer (or redelivery) sends it. `origin` for a reason of one consumer's own
    (its handler failed); none for one of the message's (undecodable, over limits), the same for every consumer."""
    meta = msg.metadata
    kind = reason.replace(" ", "-")
    return f"letter-{meta.stream}-{meta.sequence.stream}-{kind}" + (f"-{origin}" if origin else "")


# Reasons that belong to the message itself, whoever reads it.
_MESSAGE_REASONS = frozenset({"invalid event", "over limits"})


async def _dead_letter_events(bus: Bus, msg: Msg, origin: str, headers: dict[str, str], deliveries: int,
                              events: list[Any], refused: list[tuple[int, str]], reason: str) -> bool:
    """Dead-letter some events of a message (the message itself stays); False if the letter could not be
    sent, in which case the message was nacked for redelivery."""
    try:
        await bus.dead_letter(origin, subject=msg.subject, payload=encode([events[i] for i, _ in refused]),
                              reason=reason, error="; ".join(r for _, r in refused[:20]),
                              headers=headers, deliveries=deliveries, msg_id=_letter_id(msg, reason))
    except BusUnavailable:
        await msg.nak(delay=LETTER_BACKOFF.delay(deliveries))
        return False
    return True


async def _dead_letter_and_ack(
    bus: Bus,
    msg: Msg,
    origin: str,
    headers: dict[str, str],
    deliveries: int,
    reason: str,
    error: str,
) -> None:
    """Park a message in the DLQ (scrubbed) and ack it; nack it if the DLQ does not take the letter.

    The letter names the original's stream and sequence: an unreadable message is poison for every
    consumer of its stream and its raw bytes may carry secrets a well-behaved producer would have
    scrubbed, so the sink deletes it once the scrubbed copy is stored (only the sink may delete)."""
    meta = msg.metadata
    try:
        await bus.dead_letter(
            origin,
            subject=msg.subject,
            payload=msg.data,
            reason=reason,
            error=error,
            headers=headers,
            deliveries=deliveries,
            stream=meta.stream,
            stream_seq=meta.sequence.stream,
            msg_id=_letter_id(msg, reason, "" if reason in _MESSAGE_REASONS else origin),
        )
    except BusUnavailable:
        # Could not park it: leave it unacked so JetStream redelivers (without end: see `consume`) rather than lose it,
        # ever later, so the messages that cannot be settled yet do not take the consumer from those behind them.
        await msg.nak(delay=LETTER_BACKOFF.delay(deliveries))
        return
    await msg.ack()
