"""The audit log's hash chain, without I/O: sealing an entry into the next row, and walking rows to
find the first one that is missing or altered.

Each row's hash is sha256 over the previous row's hash and the canonical bytes of the row's own
content (every stored column but `hash` and `signature`), so changing, removing or reordering any
row changes every later link; the chainer signs each hash with the gatekeeper's key, so nobody without
that key can rebuild a consistent chain after a change. What the chain cannot see, a truncated tail,
is caught by comparing the last row with the chain head the chainer keeps in KV.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from lockgate.contracts import AuditEntry, AuditRecord
from lockgate.errors import SignatureError
from lockgate.ids import canonical_json
from lockgate.signing import Keyring, Signer

GENESIS = ""  # the prev_hash of seq 1
HEAD_KEY = "head"  # the chain head's key in KV `<prefix>_audit`: the last row, which only the chainer writes
# What the hash covers: every column of `audit_log` except the hash and the signature over it.
HASHED = ("id", "time", "tenant", "seq", "producer", "kind", "actor", "target", "action", "recorded_at", "reason",
          "details", "prev_hash", "key_id")


def _iso(t: datetime) -> str:
    # One text per instant, however the row travelled (ClickHouse may hand back a naive UTC datetime).
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def content(record: AuditRecord) -> bytes:
    """The canonical bytes of a row's hashed content (times in UTC to the microsecond, as stored)."""
    values: dict[str, Any] = {}
    for name in HASHED:
        value = getattr(record, name)
        values[name] = _iso(value) if isinstance(value, datetime) else value
    return canonical_json(values)


def chain_hash(record: AuditRecord) -> str:
    """sha256 over the previous row's hash and this row's content: `sha256:<hex>`."""
    digest = hashlib.sha256(record.prev_hash.encode() + b"\n" + content(record)).hexdigest()
    return f"sha256:{digest}"


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def seal(entry: AuditEntry, producer: str, head: AuditRecord | None, signer: Signer,
         recorded_at: datetime | None = None) -> AuditRecord:
    """The row after `head` (the first row when None) recording `entry` from `producer`, hashed and signed."""
    record = AuditRecord(
        id=entry.id, time=_utc(entry.time), tenant=entry.tenant, trace_id=entry.trace_id, source="gatekeeper",
        seq=(head.seq if head else 0) + 1, producer=producer, kind=entry.kind, actor=entry.actor,
        target=entry.target, action=entry.action, reason=entry.reason, details=dict(entry.details),
        recorded_at=_utc(recorded_at or datetime.now(UTC)), prev_hash=head.hash if head else GENESIS,
        key_id=signer.key_id,
    )
    digest = chain_hash(record)
    return msgspec.structs.replace(record, hash=digest, signature=signer.sign_bytes(digest.encode()))


def records(record: AuditRecord, entry: AuditEntry, producer: str) -> bool:
    """Whether `record` is the row of this entry from this producer (a redelivery), not merely a row under the
    same id: ids are chosen by producers, so another identity's entry may carry it."""
    return (record.id, record.producer, record.kind, record.actor, record.target, record.action, record.reason,
            record.details, record.tenant, record.trace_id, record.time) == (
        entry.id, producer, entry.kind, entry.actor, entry.target, entry.action, entry.reason, dict(entry.details),
        entry.tenant, entry.trace_id, _utc(entry.time))


def from_row(row: dict[str, Any]) -> AuditRecord:
    """A stored row (a dict from the query service or ClickHouse) as an AuditRecord; ValueError if unreadable."""
    try:
        return msgspec.convert(row, AuditRecord, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class Break:
    """The first row that is missing or altered, and how."""

    seq: int
    reason: str

    def __str__(self) -> str:
        return f"audit log broken at seq {self.seq}: {self.reason}"


@dataclass
class Report:
    """What a walk of the chain found: rows checked, the keys that signed them, and the first break."""

    rows: int = 0
    last_seq: int = 0
    last_hash: str = ""
    keys: set[str] = field(default_factory=set)
    broken: Break | None = None

    @property
    def ok(self) -> bool:
        return self.broken is None


def _link(row: AuditRecord, prev: AuditRecord | None, keyring: Keyring) -> Break | None:
    """Why `row` cannot follow `prev` (None: it does)."""
    expected = prev.seq + 1 if prev else 1
    if row.seq > expected:
        where = f"{prev.seq} is followed by {row.seq}" if prev else f"the log starts at seq {row.seq}"
        return Break(expected, f"row missing ({where})")
    if row.seq < expected:
        return Break(row.seq, f"row repeated or out of order (it follows seq {prev.seq if prev else 0})")
    if chain_hash(row) != row.hash:
        return Break(row.seq, "row altered (its content does not match its hash)")
    if row.key_id not in keyring.revoked:  # a revoked key's row waits for a trusted row linking over it (verify)
        try:
            # By seq: a key retired since still verifies the rows it chained before its retirement.
            keyring.verify_bytes(row.key_id, row.hash.encode(), row.signature, f"row {row.seq}", audit_seq=row.seq)
        except SignatureError as exc:
            return Break(row.seq, exc.message)
    if row.prev_hash != (prev.hash if prev else GENESIS):
        return Break(row.seq, f"row does not link to seq {expected - 1} (its prev_hash is not that row's hash)")
    return None


def _tail(last: AuditRecord | None, head: AuditRecord | None) -> Break | None:
    """Why the last stored row is not the chain head (None: it is)."""
    if head is None:
        return None if last is None else Break(last.seq, "the chain head is missing from KV, so the tail "
                                                          "cannot be checked")
    if last is None or head.seq > last.seq:
        after = last.seq if last else 0
        return Break(after + 1, f"row missing at the tail (the last stored row is seq {after}, the chain head "
                                f"is seq {head.seq}; if the log is being written right now, verify again)")
    if head.seq < last.seq:
        return Break(head.seq + 1, f"row beyond the chain head (seq {head.seq})")
    if head.hash != last.hash:
        return Break(last.seq, "row differs from the chain head")
    return None


def verify(rows: Iterable[AuditRecord | dict[str, Any]], keyring: Keyring, head: AuditRecord | None) -> Report:
    """Walk rows in seq order: contiguous from 1, each hash recomputed, signed by a trusted key, linked to
    the row before; the last row is the chain head. Stops at the first break. Rows may be stored dicts.

    A row a revoked key signed proves nothing by its signature (the key counts as leaked), but a later row a
    trusted key signed links over it: its prev_hash fixes the hash of every row before it, so those rows are
    as they were chained. Only rows no trusted row links over are a break. (Before, revoking the key that signed
    row 1, the documented answer to a leak, broke the log at seq 1 for good: a row deleted or altered later was
    reported exactly alike.)"""
    report = Report()
    prev: AuditRecord | None = None
    unvouched: AuditRecord | None = None  # the first row since the last trusted one that a revoked key signed
    for raw in rows:
        try:
            row = from_row(raw) if isinstance(raw, dict) else raw
        except ValueError as exc:
            seq = raw.get("seq") if isinstance(raw, dict) else None
            report.broken = Break(seq if isinstance(seq, int) else (prev.seq + 1 if prev else 1),
                                  f"row unreadable ({exc})")
            return report
        if (broken := _link(row, prev, keyring)) is not None:
            report.broken = broken
            return report
        if row.key_id in keyring.revoked:
            unvouched = unvouched or row
        else:
            unvouched = None
        report.rows += 1
        report.keys.add(row.key_id)
        prev = row
    report.last_seq, report.last_hash = (prev.seq, prev.hash) if prev else (0, GENESIS)
    if unvouched is not None:
        report.broken = Break(unvouched.seq, f"row {unvouched.seq} was signed by revoked key id {unvouched.key_id!r} "
                                             "and no row a trusted key signed links over it (revoked keys count as "
                                             "leaked: nothing they signed alone is believed)")
        return report
    if head is not None and (broken := _link_head(head, keyring)) is not None:
        report.broken = broken
        return report
    report.broken = _tail(prev, head)
    return report


def _link_head(head: AuditRecord, keyring: Keyring) -> Break | None:
    # The head lives on the bus: trust it only as far as its own hash and signature go.
    if chain_hash(head) != head.hash:
        return Break(head.seq, "the chain head in KV is altered (its content does not match its hash)")
    try:
        keyring.verify_bytes(head.key_id, head.hash.encode(), head.signature, f"the chain head (seq {head.seq})",
                             audit_seq=head.seq)
    except SignatureError as exc:
        return Break(head.seq, exc.message)
    return None
