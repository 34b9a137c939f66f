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
every tenant's decisions whole (the shared `app` user follows that one).
"""

from __future__ import annotations

import logging

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.codec import encode
from lockgate.contracts import DecisionsRead, StoredDecision
from lockgate.errors import BusUnavailable, ConfigError, NotFound
from lockgate.kvread import kv_keys
from lockgate.permissions import APP, app_reader
from lockgate.server.apikeys import bound_to
from lockgate.server.service import Progress
from lockgate.subjects import token, untoken

log = logging.getLogger("lockgate.gateway.reads")

_READ_FAILED = (nats.errors.Error, nats.js.errors.Error, TimeoutError)


class Reads:
    """Answers applications' users' decision reads and passes announcements on (one gateway replica each: a queue
    group)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.answered = Progress()
        self.refused = Progress()  # requests whose reply was no application user's inbox: never answered
        self.passed_on = Progress()  # announcements passed on to a release's tenant's and app's subject
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        s, nc = self.bus.subjects, self.bus.nc
        self._subs = [await nc.subscribe(s.reads_all, queue=s.reads_group, cb=self.on_read),
                      await nc.subscribe(s.gate_decided_all, queue=s.reads_group, cb=self.on_decided)]

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs = []

    async def on_read(self, msg: Msg) -> None:
        request = self.bus.subjects.read_request(msg.subject)
        # The server let only that tenant's and app's user and the shared `app` user publish here. The reply
        # subject says who reads the answer: the shared user's inbox, every release; the named tenant's and app's
        # user's, its own releases'; any other is someone aiming the answer elsewhere (a KV key): dropped.
        reader = None if request is None else app_reader(msg.reply, request[0], request[1])
        if request is None or reader is None:
            await self.refused.bump()
            log.warning("reads: dropped a request on %s whose reply %r is not an application user's inbox",
                        msg.subject, msg.reply)
            return
        tenant, app, kind, name = request
        scope = None if reader == APP else (tenant, app)
        try:
            entries = await self._read(kind, name, scope)
        except NotFound as exc:
            answer = DecisionsRead(error="not_found", message=exc.message)
        except BusUnavailable as exc:
            answer = DecisionsRead(error="unavailable", message=exc.message)
        else:
            answer = DecisionsRead(entries=entries)
        await self.bus.nc.publish(msg.reply, encode(answer))
        await self.answered.bump()

    async def _read(self, kind: str, name: str, scope: tuple[str, str] | None) -> list[StoredDecision]:
        bucket = self.bus.subjects.kv_gates
        try:
            kv = await self.bus.kv(bucket)
            if kind == "decision":
                keys = [token(name)]
            else:
                keys = [k for k in await kv_keys(self.bus.js, bucket) if not name or k.startswith(token(name))]
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
            raise NotFound(f"gate bucket {bucket!r} does not exist: is the lockgate stack running with prefix "
                           f"{self.bus.subjects.prefix!r}?") from None
        except _READ_FAILED as exc:
            raise BusUnavailable(f"cannot read gate decisions from bucket {bucket}: {exc!r}") from None
        entries = []
        for key in keys:
            # Before the value is read: another tenant's or app's decision is answered as none, as never decided.
            if scope is not None and not await self._owned(key, *scope):
                continue
            try:
                entry = await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                continue
            except _READ_FAILED as exc:
                raise BusUnavailable(f"cannot read key {key} of bucket {bucket}: {exc!r}") from None
            if entry.value:
                entries.append(StoredDecision(key=key, revision=entry.revision, value=entry.value))
        return entries

    async def _owned(self, key: str, tenant: str, app: str) -> bool:
        try:
            return bound_to(await artifacts.release_of(self.bus, untoken(key)), tenant, app)
        except (NotFound, ConfigError):  # never bound, or no release's key
            return False

    async def on_decided(self, msg: Msg) -> None:
        s = self.bus.subjects
        key = msg.subject[len(s.gate_decided_all) - 1:]
        try:
            bundle = await artifacts.release_of(self.bus, untoken(key))
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
