"""The tamper-evident audit log: entries producers ask to record, and the hash-chained, signed rows."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from msgspec import Meta

from lockgate.contracts.envelope import Event

AuditKind = Literal["decision", "review", "override", "refusal", "rollout", "break_glass", "key", "alias", "lifecycle",
                    "apply"]


# Bounds of an entry's texts: its sealed row (with the chain's hashes and signature) always fits in the one
# NATS message the chain head is; `auditlog.record` cuts a longer text to them, the chainer refuses an entry
# beyond them (dead-lettered with the reason, never retried).
ACTOR_MAX, TARGET_MAX, ACTION_MAX, TEXT_MAX, DETAILS_MAX = 256, 1024, 128, 4096, 64


class AuditEntry(Event, frozen=True, kw_only=True, tag="lockgate.audit.entry"):
    """What a producer asks to record on `<prefix>.audit.<identity>`.

    `id` is the entry's idempotency key. Who sent it is the subject's last token (which NATS
    permissions tie to the publishing identity), never the envelope's `source`.
    """

    kind: AuditKind
    actor: Annotated[str, Meta(max_length=ACTOR_MAX)]
    target: Annotated[str, Meta(max_length=TARGET_MAX)]
    action: Annotated[str, Meta(max_length=ACTION_MAX)]
    reason: Annotated[str, Meta(max_length=TEXT_MAX)] = ""
    details: Annotated[dict[Annotated[str, Meta(max_length=ACTION_MAX)], Annotated[str, Meta(max_length=TEXT_MAX)]],
                       Meta(max_length=DETAILS_MAX)] = {}


class AuditRecord(Event, frozen=True, kw_only=True, tag="lockgate.audit.record"):
    """One row of the audit log: an entry with its place in the chain, the hash over it and the previous
    row's hash, and the chainer's signature of that hash.

    `id`, `time` and `tenant` are the entry's; `producer` is the identity that published it.
    """

    seq: int
    producer: str
    kind: AuditKind
    actor: str
    target: str
    action: str
    recorded_at: datetime  # the chainer's clock when it appended the row
    reason: str = ""
    details: dict[str, str] = {}
    prev_hash: str = ""
    hash: str = ""
    key_id: str = ""
    signature: str = ""
