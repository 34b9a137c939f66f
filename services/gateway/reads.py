"""Decision reads for applications' NATS users: `reads.<tenant>.<app>.decision.<key>` and `.decisions.<prefix>`.

JetStream answers any API request (STREAM.INFO, MSG.GET, DIRECT.GET, ...) on the reply subject the requester
names, unchecked by any permission: an identity that could read the gates bucket could have the answer stored as
the value of any KV key (a decision, a route, the audit head, a budget counter). So applications' users (each
per-application user, and the shared `app` user) make no JetStream API request: they ask here, and this
responder, as the gateway's identity, reads the gates bucket and answers only a reply subject in an inbox of an
application user who may ask: that tenant's and app's own user's (its own tenant's and app's releases only, by
the releases bucket's binding, as the gateway's gRPC reads do) or the shared `app` user's (every release, as it
could read before). The entries go as stored, the gatekeeper's signed bytes: the SDK verifies them itself, so a
gateway cannot forge a decision, only withhold one.

It also passes each `gate.decided` announcement on to `decided.<tenant>.<app>.<key>` of the release's binding,
empty: an application's own user may follow its own releases' announcements there, while `gate.decided` carries
every tenant's decisions whole (the shared `app` user follows that one). An announcement made while no gateway
passed them on (all stopped, or this one's connection lost) reaches no such watch, whose own connection may never
have dropped: so once subscribed, at start and after each reconnection, it says on `decided.relist` that every
watch read all its keys again (before, a BLOCK decided while the gateway was down went unseen by them until the
release was decided again).

Each request is served in a task of its own, at most `_SLOTS` at once and `_PER_READER` of them one reader's (the
shared user, or one tenant's and app's user): before, one callback answered them one after the other, and one
app's burst of decisions reads held every other tenant's read behind it (20 of them, 5 s). A decisions read is
answered a page at a time, each page under the connection's max_payload (`DecisionsPage`, `next_after`): before,
one answer held every decision (about 3 KB each), and past about 350 its publish failed and nobody was answered.
An answer that still cannot be sent is replaced by an error, never by silence; in a decisions read, a value no
message can carry is withheld and named in its page (as the SDK skips one that does not decode).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.codec import Codec, encode
from lockgate.contracts import DecisionsPage, DecisionsRead, StoredDecision
from lockgate.errors import BusUnavailable, ConfigError, InvalidEvent, NotFound, PayloadTooLarge
from lockgate.kvread import kv_keys
from lockgate.permissions import APP, app_reader
from lockgate.server.apikeys import bound_to
from lockgate.server.service import Progress
from lockgate.subjects import token, untoken

log = logging.getLogger("lockgate.gateway.reads")

_READ_FAILED = (nats.errors.Error, nats.js.errors.Error, TimeoutError)
_pages: Codec[DecisionsPage] = Codec(DecisionsPage)

_SLOTS = 16  # requests one gateway replica serves at once
_PER_READER = 4  # of those, one reader's: one application user cannot take every slot
_QUEUED_PER_READER = 64  # one reader's requests waiting or served; the next ones are refused at once (no read)
_ROOM = 4096  # bytes of max_payload kept for a page's envelope (error, message, next key) and any headers


@dataclass
class _Page:
    """What one answer carries: entries under the budget, the key to go on after ("" for the last page), and the
    keys whose value alone is over it."""

    entries: list[StoredDecision] = field(default_factory=list)
    next_after: str = ""
    withheld: list[str] = field(default_factory=list)


class _Reader:
    """One application user's requests in flight, and its share of the slots."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.slots = asyncio.Semaphore(_PER_READER)


class Reads:
    """Answers applications' users' decision reads and passes announcements on (one gateway replica each: a queue
    group)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.answered = Progress()
        self.refused = Progress()  # requests whose reply was no application user's inbox: never answered
        self.busy = Progress()  # requests answered "unavailable" unread: their reader had too many in flight
        self.passed_on = Progress()  # announcements passed on to a release's tenant's and app's subject
        self._subs: list[Subscription] = []
        self._relists: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(_SLOTS)
        self._readers: dict[str, _Reader] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Release key -> its binding's tenant and app. The releases bucket takes one value per key, never replaced,
        # deleted or purged (bus.WRITE_ONCE), so a binding read once holds for good and a scoped read
        # checks each key of the gates bucket once per process, not once per request. A key with no binding, or
        # one whose value is no bundle (refused by `release_of`, as for every reader), is not kept: it is read
        # again each time, as a name not bound yet may be bound later.
        self._bindings: dict[str, Mapping[str, Any]] = {}

    async def start(self) -> None:
        s, nc = self.bus.subjects, self.bus.nc
        self._subs = [await nc.subscribe(s.reads_all, queue=s.reads_group, cb=self.on_read),
                      await nc.subscribe(s.gate_decided_all, queue=s.reads_group, cb=self.on_decided)]
        seen = self.bus.reconnects
        await nc.flush()  # announcements are passed on from here: what came before is read again by every watch
        await self._relist()
        self._relists = asyncio.create_task(self._relist_after_reconnects(seen), name="gateway:relist")

    async def _relist(self) -> None:
        try:
            await self.bus.nc.publish(self.bus.subjects.app_relist, b"")
        except nats.errors.Error as exc:  # its watches miss only what was announced while it was away
            log.warning("reads: the notice to read every decision again not sent: %r", exc)

    async def _relist_after_reconnects(self, seen: int) -> None:
        while True:
            # The subscriptions are back with the connection (nats-py sends them before anything else it buffered).
            seen = await self.bus.reconnected(seen)
            await self._relist()

    async def stop(self) -> None:
        if self._relists is not None:
            self._relists.cancel()
            await asyncio.gather(self._relists, return_exceptions=True)
            self._relists = None
        # The reads in flight first: an unsubscribe raises on a connection nats-py closed for good.
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs = []

    async def on_read(self, msg: Msg) -> None:
        request = self.bus.subjects.read_request(msg.subject)
        # The server let only that tenant's and app's user and the shared `app` user publish here. The reply
        # subject says who reads the answer: the shared user's inbox, every release; the named tenant's and app's
        # user's, its own releases'; any other is someone aiming the answer elsewhere (a KV key): dropped.
        reader = None if request is None else app_reader(msg.reply, request[0], request[1])
        if request is None or reader is None or msg.reply is None:
            await self.refused.bump()
            log.warning("reads: dropped a request on %s whose reply %r is not an application user's inbox",
                        msg.subject, msg.reply)
            return
        # Served in a task of its own: this callback is the subscription's only one, and a read waited on here
        # would hold every other reader's behind it.
        state = self._readers.setdefault(reader, _Reader())
        if state.in_flight >= _QUEUED_PER_READER:
            await self.busy.bump()
            await self._send(msg.reply, DecisionsRead(
                error="unavailable", message=f"the lockgate gateway is serving {_QUEUED_PER_READER} reads of "
                                             f"this application user already: retry once they are answered"))
            return
        state.in_flight += 1
        task = asyncio.create_task(self._serve(msg.reply, msg.data, request, reader, state))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reply: str, data: bytes, request: tuple[str, str, str, str], reader: str,
                     state: _Reader) -> None:
        try:
            async with state.slots, self._slots:
                try:
                    answer = await self._answer(data, request, reader)
                except Exception as exc:  # a defect: said to the reader and logged, never left unanswered
                    log.exception("reads: request on %s failed", request)
                    answer = DecisionsRead(error="unavailable", message=f"the lockgate gateway failed: {exc!r}")
            await self._send(reply, answer)
        finally:
            state.in_flight -= 1
            if not state.in_flight:
                self._readers.pop(reader, None)

    async def _answer(self, data: bytes, request: tuple[str, str, str, str], reader: str) -> DecisionsRead:
        tenant, app, kind, name = request
        scope = None if reader == APP else (tenant, app)
        paged = bool(data)  # an SDK from before pages sends no body, and reads one answer
        try:
            after = _pages.decode(data).after if paged else ""
        except InvalidEvent as exc:
            return DecisionsRead(error="unavailable", message=f"the read request does not decode: {exc.message}")
        try:
            page = await self._read(kind, name, scope, after, self.bus.nc.max_payload - _ROOM)
        except NotFound as exc:
            return DecisionsRead(error="not_found", message=exc.message)
        except (BusUnavailable, PayloadTooLarge) as exc:
            return DecisionsRead(error="unavailable", message=exc.message)
        if page.next_after and not paged:
            return DecisionsRead(error="unavailable", message=(
                "the current gate decisions are more than one NATS message holds and this SDK reads them in one: "
                "upgrade lockgate (its SDK reads them page by page), or read them over gRPC"))
        # Keys withheld are named to the reader: a value no message can carry is no decision the gatekeeper
        # wrote, and, as the SDK does with one that does not decode, one such value ends no one's read.
        withheld = (f"withheld, each larger than one NATS message ({self.bus.nc.max_payload:,} bytes): "
                    + ", ".join(page.withheld)) if page.withheld else ""
        return DecisionsRead(entries=page.entries, next_after=page.next_after, message=withheld)

    async def _read(self, kind: str, name: str, scope: tuple[str, str] | None, after: str, budget: int) -> _Page:
        """One page: the entries `scope` may read of the keys after `after`, at most `budget` bytes encoded."""
        bucket = self.bus.subjects.kv_gates
        try:
            kv = await self.bus.kv(bucket)
            if kind == "decision":
                keys = [token(name)]
            else:
                prefix = token(name) if name else ""
                keys = [k for k in await kv_keys(self.bus.js, bucket) if k > after and k.startswith(prefix)]
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
            raise NotFound(f"gate bucket {bucket!r} does not exist: is the lockgate stack running with prefix "
                           f"{self.bus.subjects.prefix!r}?") from None
        except _READ_FAILED as exc:
            raise BusUnavailable(f"cannot read gate decisions from bucket {bucket}: {exc!r}") from None
        page = _Page()
        size = 0
        for i, key in enumerate(keys):
            # Before the value is read: another tenant's or app's decision is answered as none, as never decided.
            if scope is not None and not await self._owned(key, *scope):
                continue
            try:
                entry = await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                continue
            except _READ_FAILED as exc:
                raise BusUnavailable(f"cannot read key {key} of bucket {bucket}: {exc!r}") from None
            if not entry.value:
                continue
            stored = StoredDecision(key=key, revision=entry.revision, value=entry.value)
            length = len(encode(stored)) + 1  # and the comma between entries
            if length > budget:
                if kind == "decision":
                    raise PayloadTooLarge(f"gate decision {key} ({len(entry.value):,} bytes) does not fit in one "
                                          f"NATS message ({self.bus.nc.max_payload:,} bytes): not answered")
                log.warning("reads: gate decision %s (%d bytes) withheld: larger than one NATS message", key,
                            len(entry.value))
                page.withheld.append(key)
                continue
            if size + length > budget:  # the next page starts at this key (after every key examined before it)
                page.next_after = keys[i - 1]
                return page
            size += length
            page.entries.append(stored)
        return page

    async def _owned(self, key: str, tenant: str, app: str) -> bool:
        try:
            return bound_to(await self._binding(key), tenant, app)
        except (NotFound, ConfigError):  # never bound, or no release's key
            return False

    async def _binding(self, key: str) -> Mapping[str, Any]:
        """The tenant and app a release key is bound to (`release_of`'s errors if none)."""
        binding = self._bindings.get(key)
        if binding is None:
            bundle = await artifacts.release_of(self.bus, untoken(key))
            binding = self._bindings[key] = {"tenant": bundle.get("tenant"), "app": bundle.get("app")}
        return binding

    async def _send(self, reply: str, answer: DecisionsRead) -> None:
        data = encode(answer)
        try:
            try:
                await self.bus.nc.publish(reply, data)
            except nats.errors.MaxPayloadError:  # pages are cut under it: said rather than left unanswered
                await self.bus.nc.publish(reply, encode(DecisionsRead(
                    error="unavailable", message=f"the gateway's answer ({len(data):,} bytes) is larger than "
                                                 f"one NATS message ({self.bus.nc.max_payload:,} bytes)")))
        except nats.errors.Error as exc:
            log.warning("reads: answer on %s not sent: %r", reply, exc)
            return
        await self.answered.bump()

    async def on_decided(self, msg: Msg) -> None:
        s = self.bus.subjects
        key = msg.subject[len(s.gate_decided_all) - 1:]
        try:
            bundle = await self._binding(key)
        except (NotFound, ConfigError):
            return  # no tenant's or app's release: only the shared user (on `gate.decided`) may read it
        except BusUnavailable as exc:
            # Lost to that app's watches until they read every key again (after a reconnection).
            log.warning("reads: announcement %s not passed on: %s", msg.subject, exc.message)
            return
        tenant, app = bundle.get("tenant"), bundle.get("app")
        if isinstance(tenant, str) and isinstance(app, str):
            await self.bus.nc.publish(s.app_decided(app, tenant, untoken(key)), b"")
            await self.passed_on.bump()
