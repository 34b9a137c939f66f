"""Following gate decisions without a JetStream consumer (the SDK's `decisions()`, gRPC `WatchDecisions`).

A KV watch is an ordered push consumer, which the identities that read decisions may not create (`kvread` says
why). A watch is instead a core subscription to the gatekeeper's announcements (`gate.decided.<release>`, which
it publishes after the decision is in KV), made before the bucket's current values are read. An announcement only
says which key to read again: what is yielded is what KV holds for that key, read by message get, so a forged or
stale announcement yields nothing KV does not hold, and the watch never disagrees with `decision()`.

Newest per release by KV revision (the key's stream sequence): a value is yielded only if its revision is above
the last one read for its key, so the overlap of the current values with announcements already queued yields
nothing twice, and an announcement of a decision KV has since replaced (a redelivered one) yields nothing.
Decision times are not used: they come from the gatekeepers' clocks and can tie, while KV's order is the one
`decision()` answers by. A decision written and never announced (the gatekeeper stopped in between) is announced
when its redelivered event is decided again.

An application's NATS user (the shared `app`, or one application's own) makes no JetStream API request: it reads
through the gateway (`GatewaySource`), which answers with the entries as stored, and follows `gate.decided` (the
shared user) or the gateway's per-tenant-and-app copies of it (`Subjects.app_decided`, one application's user),
reading every key again when a gateway (re)starts passing those on (`Subjects.app_relist`: what was announced
while none did was passed on to nobody).

A read that fails (`BusUnavailable`: no gateway answers, the bucket's stream has no leader) does not end a watch.
When a whole stack restarts, NATS is back before the gateway: the relist that follows the reconnection found no
responder, and the watch ended, so a decision made after the restart reached nobody who had not watched again.
Now, once the watch has read every key, it keeps what it read (`seen`) and reads every key again on the next wake
(a gateway's relist, a reconnection, an announcement) or when `_BACK` says, without end; only a closed
connection, or a decision that no longer verifies (`verified`), ends it. Its first read still fails at once, as
`decision()` does: no gateway at all (a wrong prefix) is said to the caller, not waited for.

Whoever answers a gateway read chooses the entry's revision, and a process holding the gateway's credential
answered with a superseded decision the gatekeeper genuinely signed (probe p20 F11). So a client that verifies also
refuses a decision older than the newest one it read for the release (`Newest`, by the `seq` the gatekeeper signed
into each: the one order no one passing the entry on can change): `decision()` raises StaleDecision, a watch skips
it and goes on. Not by the signed time: that is the signing replica's clock, and a reject made by a replica whose
clock ran behind was older than the PASS it replaced, so every subscriber skipped the BLOCK.

A decision can stop admitting anything with no new one written: its key revoked or retired, or an approval it
rests on withdrawn, in the trust file. `verified` checks what a watch yields, and verifies what it yielded again
whenever the trust roots change (each second it looks): one that no longer verifies ends the watch with
DecisionWithdrawn naming it, so a subscriber never keeps acting on a PASS that `decision()` now refuses.

A release's newer value that is no decision of it (it does not decode, or names another release) replaces what was
yielded for it as much as a newer decision does: `decision()` refuses it, and nothing allows the release any more.
The watch passes it on as `Unreadable` (never to its caller), and `verified` ends with DecisionWithdrawn if it yielded
a decision of that release. Before (probe p68 F1), it was skipped, and a subscriber kept acting on the PASS before it.

A connection that answers nothing (a one-sided partition, a hung server: the socket stays open) brings no
announcement and no error, and nats-py calls it stale only once two of its pings, two minutes apart, went unanswered.
So while a watch waits it asks the server itself (`Liveness`: a PING each second, answered by a PONG), the router's
probe (`Rollouts.run_unanswered`) under the router's bound: unanswered for longer than `router_cut_off_s`, the watch
ends with CutOff (a BusUnavailable), and its caller stops acting on what it yielded and watches again, which reads
every current decision once the bus answers. Before (probe p80 F2), a subscriber behind a partition kept acting on
its last PASS for as long as it lasted (425 s), with no error and no warning, while a direct one got the BLOCK.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import nats.errors
import nats.js.errors

from lockgate.codec import Codec, encode
from lockgate.config import from_env
from lockgate.contracts import DecisionsPage, DecisionsRead, GateDecided, StoredDecision
from lockgate.errors import (
    BusUnavailable,
    ClientClosed,
    ConfigError,
    CutOff,
    InvalidEvent,
    NotFound,
    SignatureError,
)
from lockgate.kvread import kv_keys
from lockgate.natsclient import raise_if_cancelled
from lockgate.retry import RetryPolicy
from lockgate.signing import TRUST_CHECK_S, Verifier
from lockgate.subjects import Subjects, untoken
from lockgate.ticks import Idle, ticking

log = logging.getLogger("lockgate.decisions")

_decisions: Codec[GateDecided] = Codec(GateDecided)
_reads: Codec[DecisionsRead] = Codec(DecisionsRead)
_REQUEST_TIMEOUT_S = 5.0  # one gateway answer (a page: the keys of the bucket listed, and a message of them read)
# A read the store does not answer (a leader election, a short outage) is retried before the watch gives up.
_READ_RETRY = RetryPolicy(attempts=6, initial_s=0.2, max_s=3.0)
_READ_FAILED = (nats.errors.Error, nats.js.errors.Error, TimeoutError)
# A watch whose reads still fail (each one retried by _READ_RETRY) reads again after this, or at the next wake.
_BACK = RetryPolicy(attempts=None, initial_s=1.0, max_s=15.0)
_PROBE_DEADLINE_S = 0.8  # one PONG: as the health check's probe (bus.HEALTH_DEADLINE_S), answered at once by a live server


def cut_off_s() -> float:
    """The router's bound (`router_cut_off_s`, LOCKGATE_ROUTER_CUT_OFF_S) that a watch's silent connection is given,
    read alone: another LOCKGATE_* variable an application's process carries is no business of its watches."""
    raw = os.environ.get("LOCKGATE_ROUTER_CUT_OFF_S")
    return from_env({} if raw is None else {"LOCKGATE_ROUTER_CUT_OFF_S": raw}).router_cut_off_s


class Liveness:
    """Whether a NATS connection answers, asked while its watches wait (nothing else would tell: see the module's
    docstring): a PING every `every` s at most (min(1 s, half the bound)); CutOff once probes went unanswered for
    `bound` s, two of them at least (one slow answer on a loaded machine is no partition), as the router's. One per
    connection and bound (`liveness`): the gateway's watches share its connection, and each asking on its own was one
    PING a second per watch."""

    def __init__(self, nc: Any, bound_s: float) -> None:
        self.nc, self.bound_s = nc, bound_s
        self.every_s = max(0.05, min(1.0, bound_s / 2))
        self._since: float | None = None  # when probes began to go unanswered
        self._unanswered = 0
        self._answered_at = 0.0  # monotonic time of the last PONG
        self._asking: asyncio.Future[None] | None = None  # the probe under way, which every watch waits on

    async def next_wake(self, wake: asyncio.Queue[str | None], timeout_s: float | None = None) -> str | None:
        """The next item of `wake`, probing the connection while none comes; TimeoutError after `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = self.every_s if deadline is None else min(self.every_s, deadline - time.monotonic())
            if left <= 0:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):  # a wake, or the probe's cadence: not synchronisation
                return await asyncio.wait_for(wake.get(), left)
            await self.probe()

    async def probe(self) -> None:
        """Ask the server for a PONG, unless one came within the cadence (another watch asked) or a probe is under
        way (then its answer is this one's); CutOff if none has come for longer than the bound."""
        if time.monotonic() - self._answered_at < self.every_s:
            return
        if self._asking is None:
            self._asking = asyncio.ensure_future(self._ask())
            self._asking.add_done_callback(self._asked)
        await asyncio.shield(self._asking)  # one watch cancelled leaves the probe to the others

    def _asked(self, done: asyncio.Future[None]) -> None:
        self._asking = None
        if not done.cancelled():
            done.exception()  # retrieved here too: a CutOff no watch awaited is not "never retrieved"

    async def _ask(self) -> None:
        began = time.monotonic()
        try:
            await self.nc.flush(timeout=_PROBE_DEADLINE_S)
        except Exception:  # unanswered however it fails: timed out, reconnecting, written to no socket
            raise_if_cancelled()
            if self.nc.is_closed:  # ended by its client: the watch's wake says ClientClosed
                return
            self._since, self._unanswered = (began if self._since is None else self._since), self._unanswered + 1
            silent = time.monotonic() - self._since
            if self._unanswered >= 2 and silent >= self.bound_s:
                raise CutOff(f"the NATS connection of this decisions watch has answered nothing for {silent:.0f} s "
                             f"(more than router_cut_off_s, {self.bound_s:g} s): a decision made meanwhile cannot "
                             "reach it. Stop acting on the decisions it yielded (fail closed) and watch again: a new "
                             "watch reads every current decision once the bus answers") from None
            return
        self._since, self._unanswered, self._answered_at = None, 0, time.monotonic()


_LIVENESS: weakref.WeakKeyDictionary[Any, dict[float, Liveness]] = weakref.WeakKeyDictionary()


def liveness(nc: Any, bound_s: float) -> Liveness:
    """The connection's probe under `bound_s`, shared by its watches."""
    bounds = _LIVENESS.setdefault(nc, {})
    if bound_s not in bounds:
        bounds[bound_s] = Liveness(nc, bound_s)
    return bounds[bound_s]


class DecisionWithdrawn(SignatureError):
    """Decisions a watch yielded that no longer verify by the trust roots as they are now (a key revoked or retired,
    an approval withdrawn), or whose release's newer value does not, or is no decision of it (`Unreadable`): they admit
    nothing; the watch ends with it."""

    def __init__(self, withdrawn: list[tuple[GateDecided, str]]) -> None:
        #: (release, decision id, why) of each
        self.withdrawn = [(d.release, d.id, why) for d, why in withdrawn]
        self.release = self.withdrawn[0][0]
        each = "; ".join(f"release {release!r}: decision {did} is withdrawn ({why})"
                         for release, did, why in self.withdrawn)
        super().__init__(f"{each}. This watch yielded it earlier: stop acting on it, read the release's decision "
                         "again (decision(), gRPC GetDecision) and watch again")


class Unreadable(NamedTuple):
    """A release's current value in the gates bucket that is no decision of it (`why`): what a watch (`_follow`)
    passes on in its place, for `verified` to take back what it yielded for the release; never yielded to a caller."""

    release: str
    why: str


class StaleDecision(SignatureError):
    """A decision older than one this client already read for its release: a superseded decision handed back as
    the current one (probe p20 F11: a process holding the gateway's credential answered reads with an old PASS)."""

    def __init__(self, stale: GateDecided, newer: GateDecided) -> None:
        self.release, self.id, self.newer = stale.release, stale.id, newer.id
        super().__init__(f"release {stale.release!r}: decision {stale.id} ({stale.decision}, {_place(stale)}) is "
                         f"older than decision {newer.id} ({newer.decision}, {_place(newer)}) this client read "
                         "before: a superseded decision, not the current one (is another process answering reads "
                         "with the gateway's credential?); read it again")


def _place(decision: GateDecided) -> str:
    """Where a decision stands in its release's order, as StaleDecision says it."""
    if decision.seq:
        return f"seq {decision.seq}"
    return f"no seq, signed {decision.time.isoformat()}"


def order(decision: GateDecided) -> tuple[int, int, datetime]:
    """A decision's place among its release's decisions: by the `seq` the gatekeeper signed into it (each one above
    the decision it was stored over, and one made over a gates bucket made anew above those made before, by the
    gatekeeper's clock: its microseconds, Stored.next_seq), never by the signed time. One without a seq (signed
    before decisions carried one) is older than every one with a seq: once a client read a decision with one, no
    decision made before can pass for newer, whatever time it carries. Only between two without one does the signed
    time decide, as it did then."""
    return (1, decision.seq, _NO_TIME) if decision.seq else (0, 0, decision.time)


_NO_TIME = datetime.min.replace(tzinfo=UTC)  # what a decision with a seq is ordered by after it: nothing


class Newest:
    """The newest verified decision one client read for each release, by `order`: a client never goes back to an
    older one. An answer's KV revision is not used here: whoever passes the entry on writes it, while the seq is
    under the gatekeeper's signature."""

    def __init__(self) -> None:
        self._by_release: dict[str, GateDecided] = {}

    def check(self, decision: GateDecided) -> None:
        """StaleDecision if a newer decision was read for its release."""
        newer = self._by_release.get(decision.release)
        if newer is not None and order(decision) < order(newer):
            raise StaleDecision(decision, newer)

    def saw(self, decision: GateDecided) -> None:
        """Record a decision that verified (only those: an unverified one with a seq to come would refuse every
        genuine one after it)."""
        newer = self._by_release.get(decision.release)
        if newer is None or order(decision) >= order(newer):
            self._by_release[decision.release] = decision


class Reconnects(Protocol):
    """A connection's reconnection count, and a wait for the next (`Bus` is one)."""

    reconnects: int

    async def reconnected(self, after: int) -> int: ...


class ReconnectCounter:
    """Counts a nats-py connection's reconnections (pass `bump` as its `reconnected_cb`)."""

    def __init__(self) -> None:
        self.reconnects = 0
        self.closed = False
        self._changed = asyncio.Condition()

    async def bump(self) -> None:
        """Count one reconnection and wake who waits for it."""
        async with self._changed:
            self.reconnects += 1
            self._changed.notify_all()

    async def close(self) -> None:
        """The connection is closed for good (its client closed): who waits is told (ClientClosed)."""
        async with self._changed:
            self.closed = True
            self._changed.notify_all()

    async def reconnected(self, after: int) -> int:
        """Wait until the connection came back more than `after` times; returns the new count. ClientClosed once
        it is closed: a watch waiting for its next wake ends then, not never."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.reconnects > after or self.closed)
        if self.closed:
            raise ClientClosed("this lockgate client is closed: its decisions() watch ends with it")
        return self.reconnects


class Source(Protocol):
    """Where a watch reads decisions: each entry (`key`, `revision`, `value`) of one key, or of every key (None)."""

    async def read(self, key: str | None) -> list[Any]: ...


class KvSource:
    """The gates bucket itself, by message get (an identity that may read it: services, your own NATS user)."""

    def __init__(self, kv: Any, js: Any, bucket: str) -> None:
        self.kv, self.js, self.bucket = kv, js, bucket

    async def read(self, key: str | None) -> list[Any]:
        keys = [key] if key is not None else await _read(lambda: kv_keys(self.js, self.bucket), self.bucket)
        entries = [await _read(lambda k=k: _latest(self.kv, k), self.bucket) for k in keys]
        return [e for e in entries if e is not None]


class GatewaySource:
    """The gateway's answers to an application user (`Subjects.reads`, services/gateway/reads.py), which makes no
    JetStream API request: the entries as stored, so their signatures are checked here as if read from KV. Every
    key is read a page at a time (`DecisionsPage`), each page one message under the server's max_payload."""

    def __init__(self, nc: Any, subjects: Subjects, tenant: str, app: str, release_prefix: str = "") -> None:
        self.nc, self.subjects = nc, subjects
        self.tenant, self.app, self.release_prefix = tenant, app, release_prefix

    async def read(self, key: str | None) -> list[StoredDecision]:
        s = self.subjects
        try:
            subject = (s.read_decisions(self.app, self.tenant, self.release_prefix) if key is None
                       else s.read_decision(self.app, self.tenant, untoken(key)))
        except ConfigError:  # no release's key (an announcement's subject of several tokens): nothing to ask for
            return []
        if key is not None:
            return (await self._ask(subject, b"")).entries
        entries: list[StoredDecision] = []
        after = ""
        while True:
            answer = await self._ask(subject, encode(DecisionsPage(after=after)))
            entries += answer.entries
            if not answer.next_after:  # the last page (a gateway from before pages answers in one)
                return entries
            if answer.next_after <= after:  # would ask for the same page again, for ever
                raise BusUnavailable(f"the gateway's answer on {subject} asks to go on after {answer.next_after!r}, "
                                     f"not past {after!r}")
            after = answer.next_after

    async def _ask(self, subject: str, body: bytes) -> DecisionsRead:
        try:
            msg = await _READ_RETRY.call(lambda: self.nc.request(subject, body, timeout=_REQUEST_TIMEOUT_S),
                                         retry_on=_READ_FAILED, what=f"read gate decisions on {subject}")
        except _READ_FAILED as exc:
            raise BusUnavailable(f"cannot read gate decisions through the lockgate gateway ({subject}): {exc!r}; "
                                 "is the gateway service running with this prefix?") from None
        try:
            answer = _reads.decode(msg.data)
        except InvalidEvent as exc:
            raise BusUnavailable(f"the gateway's answer on {subject} does not decode: {exc.message}") from None
        if answer.error == "not_found":
            raise NotFound(answer.message)
        if answer.error:
            raise BusUnavailable(answer.message)
        if answer.message:  # keys withheld (a value no message carries): skipped, as an undecodable one is
            log.warning("gate decisions read on %s: %s", subject, answer.message)
        return answer


async def watch_decisions(kv: Any, release_prefix: str = "", *, nc: Any, subjects: Subjects,
                          reconnects: Reconnects | None = None, cut_off: float | None = None) -> Watch:
    """Start a watch on the gates bucket `kv`; returns an iterator of current decisions, then every new one.

    Once this returns the watch is subscribed, so any decision announced afterwards is seen. Announcements made
    while the connection is down are lost to a subscription: after each reconnection (`reconnects`) every key is
    read again. The iterator raises BusUnavailable if the bucket cannot be read at first, or once the connection is
    closed; a read that fails later is tried again (the module's docstring); CutOff once the connection has answered
    nothing for `cut_off` s (default: `router_cut_off_s`)."""
    return await follow_decisions(KvSource(kv, nc.jetstream(), subjects.kv_gates), release_prefix, nc=nc,
                                  announcements=subjects.gate_decided_all, reconnects=reconnects, cut_off=cut_off)


async def follow_decisions(source: Source, release_prefix: str = "", *, nc: Any, announcements: str,
                           reconnects: Reconnects | None = None, relists: str = "",
                           cut_off: float | None = None) -> Watch:
    """`watch_decisions` reading `source`, woken by the announcements on `announcements` (a subject ending in a
    wildcard whose token is the release's KV key: `gate.decided.>`, or the gateway's `decided.<tenant>.<app>.*`),
    and reading every key again on any message on `relists` (the gateway's `decided.relist`), if given."""
    wake: asyncio.Queue[str | None] = asyncio.Queue()  # a key to read again; None: every key
    head = announcements[:-1]

    async def on_announced(msg: Any) -> None:
        wake.put_nowait(msg.subject[len(head):])  # `gate.decided.<token(release)>`: the release's key

    async def on_relist(msg: Any) -> None:
        wake.put_nowait(None)

    subs: list[Any] = []
    try:
        subs.append(await nc.subscribe(announcements, cb=on_announced))
        if relists:
            subs.append(await nc.subscribe(relists, cb=on_relist))
        await nc.flush()  # the server has the subscriptions: what is announced from now on reaches them
    except BaseException:
        # A caller that gave up while the watch started (a gRPC client's cancel, a wait_for) left them subscribed,
        # each queueing every tenant's announcements for no one (probe p39 F1: 4 left per 400 watches cancelled).
        await _unsubscribe(subs)
        raise
    live = liveness(nc, cut_off_s() if cut_off is None else cut_off)
    return Watch(_follow(source, subs, wake, release_prefix, reconnects, live, closed=lambda: nc.is_closed), subs)


async def _unsubscribe(subs: list[Any]) -> None:
    """Unsubscribe each of `subs` (once: the list is emptied); a connection closed or lost takes them anyway."""
    taken, subs[:] = list(subs), []
    for sub in taken:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


class Watch(AsyncIterator["GateDecided | Unreadable"]):
    """A watch's decisions (`follow_decisions`), and `aclose()` that unsubscribes whether or not they were read: an
    async generator closed before its first step runs no `finally`, and a gRPC watch cancelled before it streamed
    anything (while it sent its initial metadata) kept its subscriptions."""

    def __init__(self, decisions: AsyncGenerator[GateDecided | Unreadable, None], subs: list[Any]) -> None:
        self._decisions, self._subs = decisions, subs

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> GateDecided | Unreadable:
        return await self._decisions.__anext__()

    async def aclose(self) -> None:
        """End the watch: its reads, its wait for reconnections, its subscriptions."""
        try:
            await self._decisions.aclose()
        finally:
            await _unsubscribe(self._subs)


async def _follow(source: Source, subs: list[Any], wake: asyncio.Queue[str | None], release_prefix: str,
                  reconnects: Reconnects | None, live: Liveness, *, closed: Callable[[], bool]
                  ) -> AsyncGenerator[GateDecided | Unreadable, None]:
    relist = asyncio.ensure_future(_relist_after_reconnects(reconnects, wake)) if reconnects else None
    seen: dict[str, int] = {}  # key -> the revision last read
    listed = False  # every key read once
    failed = 0  # reads in a row that failed since
    try:
        key: str | None = None
        while True:
            try:
                entries = await source.read(key)
            except BusUnavailable as exc:
                if not listed or closed():  # a first read that fails says so at once, as decision() does
                    raise
                failed += 1
                if failed == 1:
                    log.warning("gate decisions watch: %s. It goes on: it reads every decision again when the "
                                "gateway says it is back, the connection comes back, or in at most %.0f s",
                                exc.message, _BACK.max_s)
                raise_if_cancelled()
                with contextlib.suppress(TimeoutError):  # a wake, or the backoff's end: not synchronisation
                    _woken(await live.next_wake(wake, _BACK.delay(failed)))
                key = None  # whatever was to be read: every key is read next, one announced meanwhile with the rest
                continue
            if failed:
                log.info("gate decisions watch: read again after %d failed read(s)", failed)
                failed = 0
            listed = True
            fresh = []
            for entry in entries:
                # Another revision than last read, not only a higher one: a bucket made anew (a lost store, declared
                # again by a restarted stack) numbers from 1, and its BLOCK was never yielded over the old PASS.
                if entry.revision != seen.get(entry.key):
                    seen[entry.key] = entry.revision
                    fresh.append(entry)
            for entry in sorted(fresh, key=lambda e: e.revision):  # in the order KV stored them
                decision = _decision(entry)
                if decision is not None and decision.release.startswith(release_prefix):
                    yield decision
            raise_if_cancelled()  # its reads may have lost a cancellation: it would wait here for good
            key = _woken(await live.next_wake(wake))
    finally:
        if relist is not None:
            relist.cancel()
        await _unsubscribe(subs)


async def verified(decisions: AsyncIterator[GateDecided | Unreadable], verifier: Verifier, *,
                   refused: Callable[[SignatureError], None], newest: Newest | None = None,
                   every_s: float = TRUST_CHECK_S) -> AsyncIterator[GateDecided]:
    """The decisions of a watch that verify (`refused` is told of each other one, which is skipped), and, with
    `newest`, that are not older than one read for their release before (StaleDecision, skipped alike). What it
    yielded is verified again whenever the trust roots change (looked at every `every_s` seconds, and at each
    decision): if any no longer verifies, or a release's newer decision does not, it raises DecisionWithdrawn naming
    them; and so it does when a release's newer value is no decision of it (`Unreadable`)."""
    yielded: dict[str, GateDecided] = {}  # release -> the decision last yielded for it
    roots = verifier.roots()
    async with contextlib.aclosing(ticking(decisions, every_s)) as ticks:
        async for decision in ticks:
            if (now := verifier.roots()) is not roots:
                roots = now
                await _still_verified(yielded, verifier)
            if isinstance(decision, Idle):
                continue
            if isinstance(decision, Unreadable):
                if decision.release in yielded:  # nothing allows the release now: what was yielded for it is gone
                    raise DecisionWithdrawn([(yielded[decision.release], "its release's newer value in the gates "
                                                                         f"bucket is no decision of it: {decision.why}")])
                continue  # logged by the watch (`_decision`)
            if newest is not None:
                try:
                    newest.check(decision)
                except StaleDecision as exc:
                    # Skipped, and the watch goes on: what it yielded for the release is newer, and still stands.
                    refused(exc)
                    continue
            try:
                await verifier.verify(decision)
            except SignatureError as exc:
                if decision.release in yielded:  # what was yielded for it is no longer its current decision
                    raise DecisionWithdrawn([(yielded[decision.release], f"its release's newer decision {decision.id} "
                                                                         f"is refused: {exc.message}")]) from None
                refused(exc)
                continue
            # A change `verify` read left a new keyring: what was yielded before is verified against it next round.
            yielded[decision.release] = decision
            if newest is not None:
                newest.saw(decision)
            yield decision


async def _still_verified(yielded: dict[str, GateDecided], verifier: Verifier) -> None:
    """DecisionWithdrawn naming each of `yielded` that no longer verifies."""
    withdrawn = []
    for decision in yielded.values():
        try:
            await verifier.verify(decision)
        except SignatureError as exc:
            withdrawn.append((decision, exc.message))
    if withdrawn:
        raise DecisionWithdrawn(withdrawn)


# What a watch's wake queue is given when its connection is closed (no key is this: names have no NUL).
_CLOSED = "\x00closed"


async def _relist_after_reconnects(reconnects: Reconnects, wake: asyncio.Queue[str | None]) -> None:
    seen = reconnects.reconnects
    try:
        while True:
            seen = await reconnects.reconnected(seen)
            wake.put_nowait(None)
    except ClientClosed:
        wake.put_nowait(_CLOSED)


def _woken(key: str | None) -> str | None:
    """A wake's key, or ClientClosed when it says the connection is closed."""
    if key == _CLOSED:
        raise ClientClosed("this lockgate client is closed: its decisions() watch ends with it")
    return key


async def _latest(kv: Any, key: str) -> Any:
    """The key's latest entry, or None if it has none (never written, deleted, purged, not a key)."""
    try:
        return await kv.get(key)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.InvalidKeyError):
        return None


async def _read(call: Any, bucket: str) -> Any:
    try:
        return await _READ_RETRY.call(call, retry_on=_READ_FAILED, what=f"read bucket {bucket}")
    except _READ_FAILED as exc:
        raise BusUnavailable(f"cannot read gate decisions from bucket {bucket}: {exc!r}") from None


def _decision(entry: Any) -> GateDecided | Unreadable | None:
    """The decision an entry holds; Unreadable (logged) for a value that is no decision of the release its key names;
    None for an empty value or a key that names none."""
    if not entry.value:
        return None
    try:
        release = untoken(entry.key)
    except ConfigError:
        return None
    try:
        decision = _decisions.decode(entry.value)
    except InvalidEvent as exc:
        # One bad value in the bucket must not end every watcher: only those that acted on the release (`verified`).
        log.warning("undecodable gate decision %s: %s", entry.key, exc.message)
        return Unreadable(release, f"it does not decode ({exc.message})")
    if decision.release != release:
        # A decision copied under another release's key must not answer for that release.
        log.warning("gate decision %s for %r stored under key %s", decision.id, decision.release, entry.key)
        return Unreadable(release, f"it is decision {decision.id} of {decision.release!r}")
    return decision


async def decisions_only(decisions: AsyncIterator[GateDecided | Unreadable]) -> AsyncGenerator[GateDecided, None]:
    """A watch's decisions, unverified: a value that is no decision is skipped (logged by the watch)."""
    async for decision in decisions:
        if not isinstance(decision, Unreadable):
            yield decision
