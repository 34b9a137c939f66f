"""The one NATS client every lockgate connection uses (the services' Bus, the SDK, the CLI's short connections):
nats-py's, refusing what nats-py lets through.

- A message larger than the server takes is refused before it reaches the wire. nats-py compares only the payload
  with max_payload; the server counts the headers too, answers a larger message with -ERR 'Maximum Payload
  Violation', and nats-py then closes the connection for good: every subscription and consumer of the process on it
  gone (an application's message lengthened by the gateway's relay did that to the gateway). Every publish nats-py
  makes (a request, a respond, JetStream, KV, objects) goes through `publish`, which raises MaxPayloadError instead.
- A connection asked to be TLS (a `tls://` URL, or a CA or client certificate given) is TLS or nothing. nats-py
  upgrades only when the server's INFO says `tls_required`, so anyone answering on the path with an INFO that does
  not (a plain server, a man in the middle) was sent the user's password in clear (probe p10).
- `flush()` confirms every command sent before it: nats-py's PING overtook the SUBs and publishes still queued.
- A connection attempt never outlives the task's cancellation. On Python 3.11, `asyncio.wait_for` (nats-py's connect
  timeout) answers a cancellation that comes just after the attempt failed with the attempt's own error, and nats-py's
  retry loop takes that for one more refused attempt: the cancellation was lost and the loop retried for ever
  (probe p11: `lockgate serve` whose NATS never answered ignored SIGINT and SIGTERM).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import nats.aio.client
import nats.errors


def wire_size(payload: bytes, headers: Mapping[str, str] | None) -> int:
    """The bytes nats-server counts against max_payload for one message: its payload and, with headers, the header
    block nats-py writes before it (`NATS/1.0`, a `Key: value` line per header, a blank line)."""
    if headers is None:
        return len(payload)
    size = len(b"NATS/1.0\r\n\r\n")
    for key, value in headers.items():
        if key.strip():  # nats-py skips an empty key; a value's CR and LF become spaces, one byte each
            size += len(key.strip().encode()) + len(value.strip().encode()) + len(b": \r\n")
    return size + len(payload)


class TlsNotOffered(nats.errors.Error):
    """The server did not offer TLS to a connection that asked for it: nothing, credentials included, was sent."""


class NatsClient(nats.aio.client.Client):
    """nats-py's client with the refusals and the ordered flush above."""

    _tls_demanded = False

    async def connect(self, servers: str | list[str] = "nats://localhost:4222", **options: Any) -> None:
        urls = [servers] if isinstance(servers, str) else list(servers)
        self._tls_demanded = options.get("tls") is not None or any(u.strip().startswith("tls://") for u in urls)
        await super().connect(servers, **options)

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        # Called with the server's first INFO before anything is written back (CONNECT carries the credentials).
        if initial_connection and self._tls_demanded and not info.get("tls_required"):
            raise TlsNotOffered("the NATS server did not offer TLS, which this connection requires (a tls:// URL, "
                                "or a CA or certificate given): nothing was sent, credentials included")
        await super()._process_info(info, initial_connection)

    async def _connect_to_server(self, s: Any) -> None:
        # Every attempt of nats-py's connect and reconnect loops passes here: a cancellation one of its waits lost
        # ends the loop at the next attempt, and one lost in this attempt ends it at once.
        raise_if_cancelled()
        try:
            await super()._connect_to_server(s)
        except Exception:
            raise_if_cancelled()
            raise

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "",
                      headers: dict[str, str] | None = None) -> None:
        if headers is not None and wire_size(payload, headers) > self.max_payload:
            raise nats.errors.MaxPayloadError
        await super().publish(subject, payload, reply, headers)

    async def _process_pong(self) -> None:
        # The PONG of a flush whose caller gave up (a gRPC client's cancel, a wait_for): nats-py 2.16 set a result on
        # its cancelled future, and the InvalidStateError ended its read loop for good while the connection still said
        # connected: nothing the server sent was read again, for every user of the connection, until nats-py called it
        # stale minutes later (probe p39 F1: an app key cancelling WatchDecisions calls cut the gateway off for 6 min).
        if self._pongs and self._pongs[0].done():
            self._pongs.pop(0)
            self._pongs_received += 1
            self._pings_outstanding = 0
            return
        await super()._process_pong()

    async def _close(self, status: int, do_cbs: bool = True) -> None:
        # nats-py writes what is still pending and waits for it to drain before it closes; on a connection lost (a
        # reconnect under way) that wait raised ConnectionResetError and the close stopped half-way, subscriptions and
        # socket left open and the caller's stop failing (ci-local: a test's teardown during a reconnect). Nothing
        # pending reaches a lost connection, and no reconnect follows a close to replay it: it is dropped.
        if not self.is_connected:
            self._pending, self._pending_data_size = [], 0
        await super()._close(status, do_cbs)

    async def _send_ping(self, future: asyncio.Future[Any] | None = None) -> None:
        # nats-py writes a PING straight to the socket, ahead of the commands its flusher task has not written yet (a
        # SUB just made): `flush()` returned on a PONG that confirmed none of them, and a request another connection
        # sent right after found no responders (CI: an apply right after the lineage recorder's start). The queued
        # commands go first, so a PONG says the server has read everything this connection sent before.
        if self.is_connected and self._pending:
            self._transport.writelines(self._pending)
            self._pending, self._pending_data_size = [], 0
        await super()._send_ping(future)


def raise_if_cancelled() -> bool:
    """True, or CancelledError if the running task was asked to cancel and has not taken it back (`Task.uncancel`).
    On Python 3.11 a `wait_for` whose answer came the instant its task was cancelled (each of nats-py's requests)
    returns the answer and drops the cancellation: a loop that waits again looks here first."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    return True


async def connect(servers: str | list[str], **options: Any) -> NatsClient:
    """A connected NatsClient (as `nats.connect` gives nats-py's own)."""
    nc = NatsClient()
    await nc.connect(servers, **options)
    return nc
