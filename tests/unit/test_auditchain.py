"""The audit log's hash chain without I/O: an intact chain verifies, and each kind of tampering is named
at the first row it touches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from lockgate import auditchain
from lockgate.codec import to_json
from lockgate.contracts import AuditEntry, AuditRecord
from lockgate.signing import Keyring, RetiredKey, Signer
from lockgate.store.tables import AUDIT_LOG

SIGNER = Signer.generate()
T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def chain(n: int, signer: Signer = SIGNER) -> list[AuditRecord]:
    rows: list[AuditRecord] = []
    for i in range(n):
        entry = AuditEntry(kind="rollout", actor=f"apikey:k{i}", target="web", action="promote", reason=f"step {i}",
                           details={"weight": str(i * 10), "canary": "shop-v2"}, time=T0 + timedelta(seconds=i))
        rows.append(auditchain.seal(entry, "router", rows[-1] if rows else None, signer,
                                    recorded_at=T0 + timedelta(seconds=i, microseconds=5)))
    return rows


def ring(*signers: Signer) -> Keyring:
    return Keyring([s.public for s in signers or (SIGNER,)])


def stored(rows: list[AuditRecord]) -> list[dict[str, Any]]:
    """The rows as the query service returns them: stored columns only, through JSON, times as text."""
    return [{k: v for k, v in msgspec.json.decode(to_json(r)).items() if k in AUDIT_LOG.columns} for r in rows]


def test_the_hash_covers_every_stored_column_but_itself_and_its_signature() -> None:
    assert set(auditchain.HASHED) == set(AUDIT_LOG.columns) - {"hash", "signature"}


def test_an_intact_chain_verifies_from_stored_rows_up_to_the_head() -> None:
    rows = chain(5)
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_hash == auditchain.GENESIS and rows[3].prev_hash == rows[2].hash
    report = auditchain.verify(stored(rows), ring(), rows[-1])
    assert report.ok, report.broken
    assert (report.rows, report.last_seq, report.keys) == (5, 5, {SIGNER.key_id})


def test_naive_utc_times_read_back_from_the_store_hash_alike() -> None:
    rows = chain(2)
    naive = [{**r, "time": T0.replace(tzinfo=None) + timedelta(seconds=i)} for i, r in enumerate(stored(rows))]
    assert auditchain.verify(naive, ring(), rows[-1]).ok


def test_an_empty_log_with_no_head_is_intact() -> None:
    assert auditchain.verify([], ring(), None).ok


@pytest.mark.parametrize(("tamper", "seq", "reason"), [
    (lambda rows: rows[:2] + rows[3:], 3, "row missing (2 is followed by 4)"),
    (lambda rows: rows[1:], 1, "row missing (the log starts at seq 2)"),
    (lambda rows: [rows[0], {**rows[1], "reason": "nothing to see"}, *rows[2:]], 2, "row altered"),
    (lambda rows: [rows[0], {**rows[1], "details": {}}, *rows[2:]], 2, "row altered"),
    (lambda rows: [rows[0], rows[1], rows[1], *rows[2:]], 2, "row repeated or out of order"),
    # two rows swapped, their seq numbers edited to keep the order: the content no longer hashes
    (lambda rows: [rows[0], {**rows[2], "seq": 2}, {**rows[1], "seq": 3}, *rows[3:]], 2, "row altered"),
    (lambda rows: [rows[0], {**rows[1], "seq": "two"}, *rows[2:]], 2, "row unreadable"),
], ids=["deleted middle row", "deleted first row", "altered reason", "altered details", "duplicated row",
        "reordered rows", "unreadable row"])
def test_tampering_is_named_at_the_first_row_it_touches(tamper: Any, seq: int, reason: str) -> None:
    rows = chain(5)
    report = auditchain.verify(tamper(stored(rows)), ring(), rows[-1])
    assert not report.ok and report.broken is not None
    assert report.broken.seq == seq and report.broken.reason.startswith(reason), report.broken
    assert str(report.broken).startswith(f"audit log broken at seq {seq}: ")


def test_a_row_rehashed_without_the_key_fails_its_signature() -> None:
    rows = chain(3)
    forged = msgspec.structs.replace(rows[1], reason="approved after all")
    forged = msgspec.structs.replace(forged, hash=auditchain.chain_hash(forged))
    report = auditchain.verify([rows[0], forged, rows[2]], ring(), rows[-1])
    assert report.broken is not None and report.broken.seq == 2
    assert "does not match its signature" in report.broken.reason


def test_a_chain_resealed_with_another_key_is_refused_by_the_trust_roots() -> None:
    intruder = Signer.generate()
    rows = chain(3, signer=intruder)
    report = auditchain.verify(rows, ring(), rows[-1])
    assert report.broken is not None and report.broken.seq == 1 and "unknown key id" in report.broken.reason


def test_a_revoked_key_fails_every_row_no_trusted_row_links_over() -> None:
    rows = chain(2)
    revoked = Keyring([SIGNER.public], revoked=[SIGNER.key_id])
    report = auditchain.verify(rows, revoked, rows[-1])
    assert report.broken is not None and report.broken.seq == 1
    assert report.broken.reason == f"row 1 was signed by revoked key id {SIGNER.key_id!r} and no row a trusted key " \
                                   "signed links over it (revoked keys count as leaked: nothing they signed alone " \
                                   "is believed)"


def test_rows_a_revoked_key_signed_are_vouched_for_by_a_trusted_row_linking_over_them() -> None:
    # Found by a probe: after the key that signed row 1 was revoked (a leak), `audit verify` said "broken at seq 1"
    # for good, and a row deleted or altered later read exactly alike. A trusted row's prev_hash fixes every row
    # before it, so the walk goes on and tampering after the revoked rows is still named.
    successor = Signer.generate()
    rows = chain(3)
    for i in range(3):
        rows.append(auditchain.seal(AuditEntry(kind="key", actor="admin", target="web", action=f"a{i}"), "admin",
                                    rows[-1], successor))
    leaked = Keyring([successor.public], revoked=[SIGNER.key_id])
    report = auditchain.verify(rows, leaked, rows[-1])
    assert report.ok and report.rows == 6, report.broken
    missing = auditchain.verify([*rows[:4], rows[5]], leaked, rows[-1])
    assert missing.broken is not None and (missing.broken.seq, missing.broken.reason) == (5, "row missing (4 is "
                                                                                             "followed by 6)")
    altered = auditchain.verify([*rows[:4], msgspec.structs.replace(rows[4], reason="edited"), rows[5]], leaked,
                                rows[-1])
    assert altered.broken is not None and altered.broken.seq == 5
    assert auditchain.verify(rows[:5], leaked, rows[-1]).broken is not None  # a cut tail: the head says so
    # A row the leaked key signed after the last trusted one (a forgery appended with it) is not vouched for.
    forged = auditchain.seal(AuditEntry(kind="key", actor="admin", target="web", action="forged"), "admin",
                             rows[-1], SIGNER)
    report = auditchain.verify([*rows, forged], leaked, forged)
    assert report.broken is not None and report.broken.seq == 7


def test_a_retired_key_verifies_the_rows_it_chained_before_its_retirement_only() -> None:
    # A rotation is not a leak: the old key's rows up to its retirement still verify, with the new key's after them.
    successor = Signer.generate()
    rows = chain(2)
    more = auditchain.seal(AuditEntry(kind="key", actor="admin", target="signing-key:x", action="retire"), "admin",
                           rows[-1], successor)
    rotated = Keyring([successor.public], retired={SIGNER.key_id: RetiredKey(SIGNER.public, T0, 2)})
    report = auditchain.verify([*rows, more], rotated, more)
    assert report.ok and report.keys == {SIGNER.key_id, successor.key_id}
    # A row it chained past its retirement (a gatekeeper still holding it) is named as such, not as altered.
    late = auditchain.seal(AuditEntry(kind="key", actor="admin", target="x", action="y"), "admin", rows[-1], SIGNER)
    report = auditchain.verify([*rows, late], rotated, late)
    assert report.broken is not None and report.broken.seq == 3
    assert report.broken.reason == f"row 3 was signed by retired key id {SIGNER.key_id!r} after its retirement at " \
                                   "2026-01-02 03:04:05Z (it signed the audit log up to seq 2)"


def test_a_truncated_tail_is_caught_by_the_head() -> None:
    rows = chain(4)
    report = auditchain.verify(rows[:2], ring(), rows[-1])
    assert report.broken is not None and report.broken.seq == 3
    assert report.broken.reason.startswith("row missing at the tail (the last stored row is seq 2, the chain head "
                                           "is seq 4")
    everything = auditchain.verify([], ring(), rows[-1])
    assert everything.broken is not None and everything.broken.seq == 1


def test_the_head_itself_is_checked_and_must_be_present() -> None:
    rows = chain(3)
    no_head = auditchain.verify(rows, ring(), None)
    assert no_head.broken is not None and "chain head is missing" in no_head.broken.reason
    rolled_back = auditchain.verify(rows, ring(), rows[1])
    assert rolled_back.broken is not None and rolled_back.broken.seq == 3
    assert "beyond the chain head" in rolled_back.broken.reason
    forged_head = msgspec.structs.replace(rows[-1], actor="someone else")
    bad = auditchain.verify(rows, ring(), forged_head)
    assert bad.broken is not None and "chain head in KV is altered" in bad.broken.reason
    other = chain(3, signer=SIGNER)[-1]  # a genuine head of another chain (other recorded_at)
    other = msgspec.structs.replace(other, recorded_at=other.recorded_at + timedelta(seconds=1))
    other = msgspec.structs.replace(other, hash=auditchain.chain_hash(other))
    other = msgspec.structs.replace(other, signature=SIGNER.sign_bytes(other.hash.encode()))
    differs = auditchain.verify(rows, ring(), other)
    assert differs.broken is not None and differs.broken.reason == "row differs from the chain head"


def test_sealing_is_a_pure_function_of_entry_producer_head_and_time() -> None:
    entry = AuditEntry(kind="key", actor="admin", target="apikey:k1", action="create", time=T0)
    a = auditchain.seal(entry, "admin", None, SIGNER, recorded_at=T0)
    b = auditchain.seal(entry, "admin", None, SIGNER, recorded_at=T0)
    assert a == b  # Ed25519 signatures are deterministic
    assert a.producer == "admin" and a.id == entry.id and a.source == "gatekeeper"
