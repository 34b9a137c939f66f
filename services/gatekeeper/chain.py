"""The audit chainer: appends every identity's audit entries to the hash-chained, signed audit log.

One durable consumer with one message in flight across all replicas (max_ack_pending=1), so entries
are chained in stream order. The chain's head (the last row) lives in KV and is written only with
compare-and-set on its revision, before the row is published for the sink: of two replicas extending
the same head only one wins, so the chain never forks. A redelivered entry that already won the head
only republishes that row (Nats-Msg-Id `audit-<seq>`, and the sink stores each seq once); an entry of
another producer, or another content, under the head's id is a row of its own (ids are the producers').
"""

from __future__ import annotations

import sys
from typing import Any

import msgspec
import nats.errors
import nats.js.errors

from lockgate import auditchain
from lockgate.bus import Delivery
from lockgate.codec import encode
from lockgate.contracts import AuditEntry, AuditRecord
from lockgate.errors import BusUnavailable, InvalidEvent, Retryable
from lockgate.retry import RetryPolicy
from lockgate.server.service import ServiceContext
from lockgate.services.gatekeeper.ownkey import OwnKey
from lockgate.subjects import untoken

HEAD = auditchain.HEAD_KEY
_head_decoder = msgspec.json.Decoder(AuditRecord)
_CAS_RETRY = RetryPolicy(attempts=5, initial_s=0.005, max_s=0.1)
# The chainer's consumer's max_deliver: no number of redeliveries makes an entry's retries "exhausted" (app.py).
CHAIN_WAITS = sys.maxsize


class HeadContended(Retryable):
    """Another replica kept extending the chain first (the entry is redelivered later)."""


class Chainer:
    """Turns AuditEntry messages into the next AuditRecord of the chain."""

    def __init__(self, ctx: ServiceContext, own: OwnKey) -> None:
        self.ctx = ctx
        # Chains only while the trust roots trust its key: a row signed by a revoked key, or by a retired one past
        # its retirement, would break `audit verify` for good.
        self.own = own
        self._published = ""  # hash of the last row this replica saw acknowledged by JetStream

    def producer(self, subject: str) -> str:
        """The identity that published an entry: the subject's last token (permissions tie it to the sender)."""
        prefix = f"{self.ctx.bus.subjects.prefix}.audit."
        if not subject.startswith(prefix) or "." in subject[len(prefix):]:
            raise InvalidEvent(f"audit entry on unexpected subject {subject!r}")
        return untoken(subject[len(prefix):])

    async def on_entry(self, entry: AuditEntry, delivery: Delivery) -> None:
        """Append one entry (or, if it was appended already, make sure its row is published)."""
        producer = self.producer(delivery.subject)
        kv = await self._kv()

        async def attempt() -> None:
            head, revision = await self._head(kv)
            if head is not None and auditchain.records(head, entry, producer):
                await self._publish(head)  # redelivered after its row won the head
                return
            if head is not None and head.hash != self._published:
                # The replica that won the head may have stopped before publishing its row: publish it
                # again (deduplicated), so the stored chain never has a gap before ours.
                await self._publish(head)
            record = auditchain.seal(entry, producer, head, await self.own.require())
            size = len(encode(record))
            if size > self.ctx.bus.nc.max_payload - 4096:  # the head and the row are one NATS message each
                # The contract bounds characters, not bytes (a probe's control characters, escaped six bytes
                # each, made 1 MB within every bound): refused at once, never retried into a stalled chain.
                raise InvalidEvent(f"audit entry {entry.id} of {producer} would make a row of {size:,} bytes, over "
                                   f"what one NATS message holds ({self.ctx.bus.nc.max_payload:,})")
            try:
                if revision:
                    await kv.update(HEAD, encode(record), last=revision)
                else:
                    await kv.create(HEAD, encode(record))
            except nats.js.errors.KeyWrongLastSequenceError:
                raise HeadContended(f"audit chain head moved while appending entry {entry.id}") from None
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                raise BusUnavailable(f"cannot write the audit chain head to KV: {exc!r}") from None
            await self._publish(record)

        await _CAS_RETRY.call(attempt, retry_on=HeadContended, what="audit chain compare-and-set")

    async def _kv(self) -> Any:
        try:
            return await self.ctx.bus.kv(self.ctx.bus.subjects.kv_audit)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot open KV {self.ctx.bus.subjects.kv_audit}: {exc!r}") from None

    async def _head(self, kv: Any) -> tuple[AuditRecord | None, int]:
        """The last row and its KV revision (None, 0 before the first row)."""
        try:
            entry = await kv.get(HEAD)
        except nats.js.errors.KeyNotFoundError:
            # A deleted head has a revision too; create() handles it, so 0 here.
            return None, 0
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot read the audit chain head from KV: {exc!r}") from None
        try:
            return _head_decoder.decode(entry.value), entry.revision
        except msgspec.DecodeError as exc:
            # Never chain onto (or over) a head we cannot read: stop and say so, the entry waits.
            raise BusUnavailable(f"the audit chain head in KV is unreadable ({exc}); repair it before "
                                 "more entries are appended") from None

    async def _publish(self, record: AuditRecord) -> None:
        await self.ctx.bus.publish(self.ctx.bus.subjects.audit_records, record, msg_id=f"audit-{record.seq}")
        self._published = record.hash
