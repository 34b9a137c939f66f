"""Signed hash chains of provenance records (pure: no I/O, unit-tested).

A record is signed over its canonical JSON with an empty signature, and names the sha256 of the whole
record before it on the same subject. Reading a history checks both: the chain (sequence numbers,
previous digests, time never going back) and each signature (through a `verify` callback that asks the
trust file who holds the key).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import msgspec

from lockgate.contracts.provenance import AliasChanged, ArtifactLifecycle
from lockgate.errors import SignatureError
from lockgate.identity import Identity
from lockgate.ids import canonical_json, content_hash

Record = AliasChanged | ArtifactLifecycle
R = TypeVar("R", AliasChanged, ArtifactLifecycle)


class ChainBroken(SignatureError):
    """A provenance history does not check out: a record was altered, forged, removed or reordered."""


def signed_bytes(record: Record) -> bytes:
    """What the person signs: the record with an empty signature (key id and actor included)."""
    return canonical_json(msgspec.to_builtins(msgspec.structs.replace(record, signature="")))


def digest(record: Record) -> str:
    """The sha256 of the whole record, signature included: what the next record names as `prev_digest`."""
    return content_hash(canonical_json(msgspec.to_builtins(record)))


def seal(identity: Identity, record: R, previous: R | None) -> R:
    """The record chained after `previous` and signed by `identity` (its name as actor). Its time is never
    before the previous record's: a writer whose clock is behind must not make the history unreadable."""
    if previous is not None and record.time < previous.time:
        record = msgspec.structs.replace(record, time=previous.time)
    chained = msgspec.structs.replace(record, seq=(previous.seq + 1) if previous else 1,
                                      prev_digest=digest(previous) if previous else "", actor=identity.name,
                                      key_id=identity.key_id, signature="")
    return msgspec.structs.replace(chained, signature=identity.sign(signed_bytes(chained)))


def describe(record: Record) -> str:
    """How an error names a record."""
    if isinstance(record, AliasChanged):
        return f"alias {record.app}/{record.alias} change #{record.seq} ({record.release})"
    return f"lifecycle of {record.hash} record #{record.seq}"


def check(records: Sequence[R], verify: Callable[[R], str]) -> list[str]:
    """The signer of each record, in order; ChainBroken naming the first record that does not check out.

    `verify(record)` returns the person's name or raises SignatureError (unknown key, bad signature).
    """
    signers = []
    prev: R | None = None
    for record in records:
        what = describe(record)
        expected_seq = prev.seq + 1 if prev else 1
        if record.seq != expected_seq:
            raise ChainBroken(f"{what}: expected record #{expected_seq} here (a record was removed or inserted)")
        if record.prev_digest != (digest(prev) if prev else ""):
            raise ChainBroken(f"{what} does not follow the record before it (altered or reordered history)")
        if prev is not None and record.time < prev.time:
            raise ChainBroken(f"{what} is dated before the record it follows")
        try:
            name = verify(record)
        except SignatureError as exc:
            raise ChainBroken(f"{what}: {exc.message}") from None
        if record.actor != name:
            raise ChainBroken(f"{what} claims actor {record.actor!r} but is signed by {name}")
        signers.append(name)
        prev = record
    return signers


def at(records: Sequence[R], when: datetime | None) -> R | None:
    """The record in force at `when` (None: now): the last one dated at or before it, or None."""
    if when is None:
        return records[-1] if records else None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = None
    for record in records:  # in chain order, which `check` keeps in time order
        if record.time <= when:
            current = record
    return current
