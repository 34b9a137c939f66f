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
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from lockgate.bus import Bus
from lockgate.clock import TIME_HEADER
from lockgate.natsclient import wire_size
from lockgate.permissions import app_reader
from lockgate.server.service import Progress
from lockgate.subjects import token

log = logging.getLogger("lockgate.gateway.relay")

_ACK_TIMEOUT_S = 5.0  # JetStream's acknowledgement; the sender's own publish times out and retries after it
# JetStream's own error for a message over a stream's size limit (JSStreamMessageExceedsMaximumErr): a client
# takes it as it would from the stream, a bad request not worth retrying.
_TOO_LARGE = {"code": 400, "err_code": 10054}


class Relay:
    """Relays every application user's events (one of the gateway replicas each: a queue group)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.relayed = Progress()
        self.refused = Progress()  # messages whose reply was no application user's inbox: never relayed
        self.oversized = Progress()  # messages over max_payload once relayed: refused, their sender answered
        self._sub: Subscription | None = None

    async def start(self) -> None:
        s = self.bus.subjects
        self._sub = await self.bus.nc.subscribe(s.ingest_all, queue=s.ingest_group, cb=self.on_message)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def on_message(self, msg: Msg) -> None:
        s = self.bus.subjects
        sender = s.ingest_sender(msg.subject)
        # The server let only that tenant's and app's user and the shared `app` user publish here; their replies go
        # to their own inboxes. Any other reply subject is someone aiming the acknowledgement elsewhere: the
        # message is dropped whole.
        if sender is None or app_reader(msg.reply, *sender) is None:
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
            error = {**_TOO_LARGE, "description": (
                f"message size exceeds maximum allowed: relayed to {subject} (its message id scoped to its tenant and "
                f"app), it is {size:,} bytes with its headers, over the NATS server's max_payload ({limit:,} bytes); "
                "send smaller messages")}
            await self.bus.nc.publish(msg.reply, msgspec.json.encode({"error": error}))
            return
        try:
            ack = await self.bus.nc.request(subject, msg.data, timeout=_ACK_TIMEOUT_S, headers=headers)
        except (nats.errors.Error, TimeoutError) as exc:
            # No answer: the sender's publish times out too and is retried, as if it had published itself.
            log.warning("relay: events of %s/%s not acknowledged by JetStream: %r", tenant, app, exc)
            return
        # With this gateway's time (lockgate.clock): the application's user may ask JetStream nothing, and an SDK whose
        # host clock ran ahead had every event dead-lettered, counted sent, told nothing (probe p80 F4).
        headers = {**(ack.headers or {}), TIME_HEADER: datetime.now(UTC).isoformat()}
        await self.bus.nc.publish(msg.reply, ack.data, headers=headers)
        await self.relayed.bump()


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
