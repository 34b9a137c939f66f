"""Signed hash chains of provenance records (pure: no I/O, unit-tested).

A record is signed over its canonical JSON with an empty signature, and names the sha256 of the whole
record before it on the same subject. Reading a history checks both: each signature (through a `verify`
callback that asks the trust file who holds the key) and the chain (sequence numbers, previous digests,
time never going back).

The chain runs through the records a trusted person signed, and only those. Whoever may publish on the
stream without a personal key (the operator NATS credential, a JetStream acknowledgement aimed there) can put
messages on a subject that no trusted person signed, and the stream can never drop them: such a message is
skipped, and said, never taken as a break of the history (that made the history unreadable for good). So is
a replay of a signed record (a copy of one already in the chain, or one of another subject's history). A
record a trusted person signed that does not follow the chain still breaks it: that takes a trusted key (a
fork), or a record removed or altered in the store (its successor then follows nothing read).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, Literal, TypeVar

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


SkipKind = Literal["undecodable", "foreign", "unverified", "copy"]
_SKIP_SAYS: dict[str, str] = {
    "undecodable": "not a readable record",
    "foreign": "a record of another history",
    "unverified": "not signed by a trusted person",
    "copy": "a copy of an earlier record",
}


@dataclass(frozen=True)
class Skipped:
    """A message on a history's subject that is not part of the history, and why."""

    subject: str
    stream_seq: int
    kind: SkipKind
    detail: str

    def message(self) -> str:
        """One line naming the message and why it was skipped."""
        return f"record at stream sequence {self.stream_seq} on {self.subject} skipped ({_SKIP_SAYS[self.kind]}): " \
               f"{self.detail}"


def summary(skipped: Sequence[Skipped], what: str = "record") -> str:
    """`1 record skipped: not signed by a trusted person`, `3 records skipped: 2 ..., 1 ...`; "" for none."""
    if not skipped:
        return ""
    by_kind = Counter(s.kind for s in skipped)
    n = len(skipped)
    head = f"{n} {what}{'' if n == 1 else 's'} skipped"
    if len(by_kind) == 1:
        return f"{head}: {_SKIP_SAYS[next(iter(by_kind))]}"
    return f"{head}: " + ", ".join(f"{count} {_SKIP_SAYS[kind]}" for kind, count in sorted(by_kind.items()))


@dataclass(frozen=True)
class History(Generic[R]):
    """A subject's verified records in chain order, their signers, the messages skipped, and the stream
    sequence of the subject's last message (skipped or not): what the next append must follow."""

    records: list[R]
    signers: list[str]
    skipped: list[Skipped]
    last_seq: int


def owner(record: Record) -> str:
    """Whose history a record belongs to: `app/alias`, or the artifact hash."""
    return f"{record.app}/{record.alias}" if isinstance(record, AliasChanged) else record.hash


def read(subject: str, messages: Sequence[tuple[int, bytes]], kind: type[R], expected_owner: str,
         verify: Callable[[R], str]) -> History[R]:
    """The history of `expected_owner` from the messages on its subject (stream sequence, bytes; oldest first).

    A message that does not decode as `kind`, is of another owner, is not signed by a trusted person
    (`verify(record)` returns the person's name or raises SignatureError) or repeats a record already read is
    skipped. A verified record that does not follow the chain raises ChainBroken naming it.
    """
    records: list[R] = []
    signers: list[str] = []
    skipped: list[Skipped] = []
    seen: dict[str, int] = {}  # the sha256 of a chained record's signed content -> its seq
    for stream_seq, data in messages:
        try:
            record = msgspec.json.decode(data, type=kind)
        except msgspec.DecodeError as exc:
            skipped.append(Skipped(subject, stream_seq, "undecodable", f"not a {kind.__name__}: {exc}"))
            continue
        what = describe(record)
        if owner(record) != expected_owner:
            skipped.append(Skipped(subject, stream_seq, "foreign",
                                       f"{what} belongs to the history of {owner(record)}"))
            continue
        try:
            name = verify(record)
        except SignatureError as exc:
            skipped.append(Skipped(subject, stream_seq, "unverified", exc.message))
            continue
        # Compared by what was signed, not by the digest: the same signed content under another encoding of
        # its signature (base64 leaves a few bits free) is still a copy.
        signed = content_hash(signed_bytes(record))
        if signed in seen:
            skipped.append(Skipped(subject, stream_seq, "copy", f"{what} repeats record #{seen[signed]}"))
            continue
        prev = records[-1] if records else None
        since = f" ({summary(skipped)} so far)" if skipped else ""
        expected_seq = prev.seq + 1 if prev else 1
        if record.seq != expected_seq:
            raise ChainBroken(f"{what}: expected record #{expected_seq} here (a record was removed or inserted)"
                              f"{since}")
        if record.prev_digest != (digest(prev) if prev else ""):
            raise ChainBroken(f"{what} does not follow the record before it (altered or reordered history){since}")
        if prev is not None and record.time < prev.time:
            raise ChainBroken(f"{what} is dated before the record it follows")
        if record.actor != name:
            raise ChainBroken(f"{what} claims actor {record.actor!r} but is signed by {name}")
        records.append(record)
        signers.append(name)
        seen[signed] = record.seq
    return History(records, signers, skipped, messages[-1][0] if messages else 0)


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
