"""The relay of applications' events: `ingest.<tenant>.<app>` onto `inference.<tenant>.<app>`.

A publish on a stream's subject is acknowledged by JetStream on the reply subject the publisher named, whatever
it is and unchecked by any permission: an application that could publish on `inference` could have that
acknowledgement stored as the value of any KV key (a budget's counter reset, a gate decision or a route erased).
So applications' users (each per-application user, and the shared `app` user) publish where no stream listens,
and this relay, as the gateway's identity, publishes the bytes as they came (its headers too: the message id
keeps JetStream's duplicate check) on the inference subject of the same tenant and app, and passes JetStream's
acknowledgement back only to a reply subject in an inbox of an application user who may publish there: that
tenant's and app's own user's, or the shared `app` user's (which may publish any tenant's and app's events).
Consumers check the events against the subject as for any other sender.

A message the server took from its sender can be too large once relayed: its message id is scoped (longer), and
the server counts headers in max_payload. Published anyway, the server would answer the gateway with -ERR, on
which nats-py closes the gateway's connection for good (relay, reads and the gRPC API gone for every tenant). Such
a message is refused alone: its sender is answered as JetStream answers a message over a stream's size limit, a
permanent error, not retried.

Each message is relayed in a task of its own, at most `SLOTS` at once and `PER_SENDER` of them one sender's (one
tenant's and app's subject), and a sender has at most `QUEUED_PER_SENDER` messages and `QUEUED_BYTES_PER_SENDER`
bytes waiting or in flight (every sender together `QUEUED` and `QUEUED_BYTES`): one past that is answered at once as
JetStream answers a message it cannot take now (a 503, which the SDK retries after its backoff), not kept. Before,
one callback relayed every tenant's messages one after the other, each awaiting JetStream's acknowledgement: one
application publishing 900 KB messages held another tenant's events 17 s (p50), and a 225 MB burst timed every other
tenant's publishes out. The subscription's pending limits are explicit (`PENDING_MSGS`, `PENDING_BYTES`; nats-py
takes a message in only until then): a message nats-py drops past them is answered the same way, counted and logged
(at most once every `LOG_EVERY_S`, with each sender's count), where before it vanished with nothing said. A message
JetStream does not acknowledge in time is answered so too: it may be stored, and a re-send with its message id is
dropped as a duplicate. A sender's messages in flight together may be stored in another order than sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from lockgate.bus import Bus
from lockgate.natsclient import wire_size
from lockgate.permissions import app_reader
from lockgate.server.service import Progress
from lockgate.subjects import token

log = logging.getLogger("lockgate.gateway.relay")

_ACK_TIMEOUT_S = 5.0  # JetStream's acknowledgement; the sender's own publish times out and retries after it
# JetStream's own error for a message over a stream's size limit (JSStreamMessageExceedsMaximumErr): a client
# takes it as it would from the stream, a bad request not worth retrying.
_TOO_LARGE = {"code": 400, "err_code": 10054}
# As JetStream answers a publish it cannot take now (a full stream, no stream leader): nats-py raises
# ServiceUnavailableError, which the SDK (lockgate.outbox.TRANSIENT) retries after its backoff.
_RETRY = {"code": 503}

SLOTS = 32  # relays one gateway replica has awaiting JetStream at once
PER_SENDER = 4  # of those, one sender's: one tenant's and app's flood cannot take every slot
QUEUED_PER_SENDER = 256  # one sender's messages waiting or in flight; the next ones are answered "retry" at once
QUEUED_BYTES_PER_SENDER = 8 * 1024 * 1024  # and their bytes (the SDK's 8 batches in flight of up to 900 KB fit)
QUEUED = 4096  # every sender's messages waiting or in flight (the shared `app` user may name any tenant and app)
QUEUED_BYTES = 64 * 1024 * 1024  # and their bytes
# What nats-py keeps for the subscription's callback, which only admits (it awaits no relay): a burst larger than
# this, arriving faster than the callback runs, is dropped by nats-py, and each message so dropped answered here.
PENDING_MSGS = 65_536
PENDING_BYTES = 64 * 1024 * 1024
LOG_EVERY_S = 60.0  # messages refused or dropped are logged at most once in this long, each sender's counted


class _Sender:
    """One sender's messages waiting or in flight, and its share of the slots."""

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.slots = asyncio.Semaphore(PER_SENDER)


class _Tally:
    """Messages not relayed, by reason and sender: logged at WARNING at most once every LOG_EVERY_S with the counts
    since (one line per message would let a sender flood the log), and whatever is left when the relay stops."""

    def __init__(self) -> None:
        self._unlogged: Counter[tuple[str, str]] = Counter()  # (reason, "tenant/app") -> messages
        self._next = 0.0  # monotonic time from which the next line may be written

    def note(self, reason: str, tenant: str, app: str) -> None:
        self._unlogged[reason, f"{tenant}/{app}"] += 1
        if time.monotonic() >= self._next:
            self.flush()

    def flush(self) -> None:
        if not self._unlogged:
            return
        self._next = time.monotonic() + LOG_EVERY_S
        reasons = {
            "busy": "refused at once, their sender over its share of the relay (or the relay over its total)",
            "dropped": f"dropped by the NATS client past the relay subscription's pending limits ({PENDING_MSGS:,} "
                       f"messages or {PENDING_BYTES:,} bytes waiting; one whose reply was no sender's inbox is not "
                       "answered)",
            "unacknowledged": f"not acknowledged by JetStream within {_ACK_TIMEOUT_S:g} s (or the request failed)",
        }
        for reason in sorted({r for r, _ in self._unlogged}):
            counts = sorted(((n, who) for (r, who), n in self._unlogged.items() if r == reason), reverse=True)
            shown = ", ".join(f"{who}: {n}" for n, who in counts[:20])
            more = f" and {len(counts) - 20} more senders" if len(counts) > 20 else ""
            log.warning("relay: %d message(s) %s, each answered with a retryable error (503); by sender: %s%s "
                        "(logged at most once every %g s)", sum(n for n, _ in counts), reasons[reason], shown, more,
                        LOG_EVERY_S)
        self._unlogged.clear()


class Relay:
    """Relays every application user's events (one of the gateway replicas each: a queue group)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.relayed = Progress()
        self.refused = Progress()  # messages whose reply was no application user's inbox: never relayed
        self.oversized = Progress()  # messages over max_payload once relayed: refused, their sender answered
        self.busy = Progress()  # answered "retry" unrelayed: their sender had its share waiting or in flight
        self.dropped = Progress()  # dropped by nats-py past the pending limits: answered "retry" where possible
        self.unacknowledged = Progress()  # JetStream did not acknowledge in time: answered "retry"
        self._sub: Subscription | None = None
        self._slots = asyncio.Semaphore(SLOTS)
        self._senders: dict[tuple[str, str], _Sender] = {}
        self._messages = 0
        self._bytes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._tally = _Tally()

    async def start(self) -> None:
        s = self.bus.subjects
        self._sub = await self.bus.subscribe(s.ingest_all, self.on_message, queue=s.ingest_group,
                                             pending_msgs=PENDING_MSGS, pending_bytes=PENDING_BYTES,
                                             on_dropped=self.on_dropped)

    async def stop(self) -> None:
        # The relays in flight first: an unsubscribe raises on a connection nats-py closed for good. Their senders
        # are not answered; their publishes time out and are sent again (to another replica, or after a restart).
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tally.flush()
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def _sender(self, subject: str, reply: str | None) -> tuple[str, str] | None:
        """The tenant and app of a message on `subject`, if `reply` is an inbox of an application user who may
        publish there (that tenant's and app's own user, or the shared `app` user); None otherwise."""
        sender = self.bus.subjects.ingest_sender(subject)
        return sender if sender is not None and app_reader(reply, *sender) is not None else None

    async def on_message(self, msg: Msg) -> None:
        s = self.bus.subjects
        # The server let only that tenant's and app's user and the shared `app` user publish here; their replies go
        # to their own inboxes. Any other reply subject is someone aiming the acknowledgement elsewhere: the
        # message is dropped whole.
        sender = self._sender(msg.subject, msg.reply)
        if sender is None:
            await self.refused.bump()
            log.warning("relay: dropped a message on %s whose reply %r is not an application user's inbox",
                        msg.subject, msg.reply)
            return
        tenant, app = sender
        subject, headers = s.inference(app, tenant), _headers(msg.headers, tenant, app)
        if (size := wire_size(msg.data, headers)) > (limit := self.bus.nc.max_payload):
            await self.oversized.bump()
            log.warning("relay: refused a message of %s/%s: %d bytes relayed, over max_payload (%d)",
                        tenant, app, size, limit)
            await self._answer(msg.reply, {**_TOO_LARGE, "description": (
                f"message size exceeds maximum allowed: relayed to {subject} (its message id scoped to its tenant and "
                f"app), it is {size:,} bytes with its headers, over the NATS server's max_payload ({limit:,} bytes); "
                "send smaller messages")})
            return
        # Relayed in a task of its own: this callback is the subscription's only one, and a relay awaited here
        # would hold every other sender's messages behind it.
        state = self._senders.setdefault(sender, _Sender())
        # A message alone is always taken (max_payload may be configured over a byte cap).
        own = state.messages >= QUEUED_PER_SENDER or (state.messages and state.bytes + size > QUEUED_BYTES_PER_SENDER)
        if own or self._messages >= QUEUED or (self._messages and self._bytes + size > QUEUED_BYTES):
            if not state.messages:
                del self._senders[sender]
            await self.busy.bump()
            self._tally.note("busy", tenant, app)
            held = (f"{state.messages} messages ({state.bytes:,} bytes) of {tenant}/{app}, at most "
                    f"{QUEUED_PER_SENDER} or {QUEUED_BYTES_PER_SENDER:,} bytes per tenant and app" if own else
                    f"as many messages as it holds for every sender together ({QUEUED} or {QUEUED_BYTES:,} bytes)")
            await self._answer(msg.reply, {**_RETRY, "description": (
                f"the lockgate gateway is relaying {held}, already: not relayed; retry once they are acknowledged")})
            return
        state.messages += 1
        state.bytes += size
        self._messages += 1
        self._bytes += size
        task = asyncio.create_task(self._relay(msg, subject, headers, sender, state, size))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, msg: Msg, subject: str, headers: dict[str, str] | None, sender: tuple[str, str],
                     state: _Sender, size: int) -> None:
        tenant, app = sender
        try:
            async with state.slots, self._slots:
                try:
                    ack = await self.bus.nc.request(subject, msg.data, timeout=_ACK_TIMEOUT_S, headers=headers)
                except (nats.errors.Error, TimeoutError) as exc:
                    # Said to the sender at once rather than left to its own timeout: it may be stored, and a re-send
                    # with its message id is dropped by JetStream as a duplicate.
                    await self.unacknowledged.bump()
                    self._tally.note("unacknowledged", tenant, app)
                    await self._answer(msg.reply, {**_RETRY, "description": (
                        f"relayed to {subject} but not acknowledged by JetStream ({exc!r}): it may be stored; "
                        "retry (a re-send with the same Nats-Msg-Id is dropped as a duplicate)")})
                    return
            await self._answer(msg.reply, ack.data, ack.headers)
            await self.relayed.bump()
        finally:
            state.messages -= 1
            state.bytes -= size
            self._messages -= 1
            self._bytes -= size
            if not state.messages:
                self._senders.pop(sender, None)

    async def on_dropped(self, exc: nats.errors.SlowConsumerError) -> None:
        """A message nats-py dropped past the subscription's pending limits: its sender is answered as for one over
        its share (on its inbox only), and it is counted and logged."""
        await self.dropped.bump()
        sender = self._sender(exc.subject, exc.reply)
        if sender is None:  # nobody to answer; counted and logged as its sender's subject says
            tenant, app = self.bus.subjects.ingest_sender(exc.subject) or ("?", "?")
            self._tally.note("dropped", tenant, app)
            return
        self._tally.note("dropped", *sender)
        await self._answer(exc.reply, {**_RETRY, "description": (
            f"dropped by the lockgate gateway: it had {PENDING_MSGS:,} messages or {PENDING_BYTES:,} bytes waiting "
            "to be relayed; not relayed, retry")})

    async def _answer(self, reply: str, answer: dict[str, object] | bytes, headers: dict[str, str] | None = None
                      ) -> None:
        data = answer if isinstance(answer, bytes) else msgspec.json.encode({"error": answer})
        try:
            await self.bus.nc.publish(reply, data, headers=headers)
        except nats.errors.Error as exc:  # the connection is going: the sender's publish times out and is retried
            log.warning("relay: answer on %s not sent: %r", reply, exc)


def _headers(headers: dict[str, str] | None, tenant: str, app: str) -> dict[str, str] | None:
    """The sender's headers as relayed: its message id within its own tenant's and app's (JetStream's duplicate
    check spans the stream, so an id another sender can compute, of events whose ids are predictable, would have its
    publish taken for theirs and dropped as a duplicate), and no other JetStream control header (`Nats-Expected-*`,
    `Nats-Rollup`, `Nats-TTL`, ...), which are JetStream's instructions to whoever publishes: here, the gateway."""
    if not headers:
        return headers
    out = {k: v for k, v in headers.items() if not k.lower().startswith("nats-")}
    msg_id = next((v for k, v in headers.items() if k.lower() == "nats-msg-id"), None)
    if msg_id:
        out["Nats-Msg-Id"] = f"{token(tenant)}.{token(app)}.{msg_id}"
    return out
