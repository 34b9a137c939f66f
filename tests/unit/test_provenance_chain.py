"""Signed hash chains of provenance records: sealing, checking, the record in force at a time, and what a
reader skips (messages no trusted person signed, copies, another history's) without breaking the chain."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from lockgate.codec import encode
from lockgate.contracts import AliasChanged, ArtifactLifecycle
from lockgate.identity import Identity
from lockgate.provenance import chain, lifecycle
from lockgate.signing import Keyring, Signer

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
ANN = Identity("ann", Signer.generate())


def _verify(record: chain.Record) -> str:
    ring = Keyring([ANN.signer.public])
    ring.verify_bytes(record.key_id, chain.signed_bytes(record), record.signature, chain.describe(record))
    return "ann"


def _read(records: list, *, raw: dict[int, bytes] | None = None) -> chain.History:  # type: ignore[type-arg]
    """Read `records` as a subject's messages (stream sequences 1, 2 ...), with `raw` messages put before the
    record at each given position."""
    messages: list[tuple[int, bytes]] = []
    for i, record in enumerate(records):
        if raw and i in raw:
            messages.append((len(messages) + 1, raw[i]))
        messages.append((len(messages) + 1, encode(record)))
    if raw and len(records) in raw:
        messages.append((len(messages) + 1, raw[len(records)]))
    return chain.read("lg.provenance.alias.shop.production", messages, AliasChanged, "shop/production", _verify)


def _history(n: int = 3) -> list[AliasChanged]:
    out: list[AliasChanged] = []
    for i in range(n):
        record = AliasChanged(app="shop", alias="production", release=f"v{i}", seq=0,
                              time=T0 + timedelta(minutes=10 * i))
        out.append(chain.seal(ANN, record, out[-1] if out else None))
    return out


def test_a_sealed_history_checks_out_and_answers_at_any_time() -> None:
    records = _history()
    read = _read(records)
    assert [r.seq for r in records] == [1, 2, 3] and read.signers == ["ann"] * 3 and read.records == records
    assert read.skipped == [] and read.last_seq == 3
    assert chain.at(records, T0 - timedelta(seconds=1)) is None
    assert chain.at(records, T0 + timedelta(minutes=10)).release == "v1"  # type: ignore[union-attr]
    assert chain.at(records, T0 + timedelta(minutes=15)).release == "v1"  # type: ignore[union-attr]
    assert chain.at(records, None).release == "v2"  # type: ignore[union-attr]


@pytest.mark.parametrize("tamper, says", [
    # Altered in the store: its successor follows nothing read, so the history breaks there.
    (lambda rs: [rs[0], msgspec.structs.replace(rs[1], release="evil"), rs[2]],
     "expected record #2 here.*1 record skipped: not signed by a trusted person so far"),
    (lambda rs: [rs[0], rs[2]], "expected record #2"),
    (lambda rs: [rs[1], rs[0], rs[2]], "expected record #1"),
    (lambda rs: [rs[0], msgspec.structs.replace(rs[1], prev_digest="sha256:x"), rs[2]], "expected record #2"),
    # A trusted person's fork: a second record #2 chained after #1.
    (lambda rs: [*rs, chain.seal(ANN, msgspec.structs.replace(rs[1], release="fork"), rs[0])], "expected record #4"),
])
def test_an_altered_removed_or_reordered_record_is_named(tamper, says) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(chain.ChainBroken, match=says):
        _read(tamper(_history()))


def test_messages_nobody_trusted_signed_are_skipped_and_the_chain_runs_past_them() -> None:
    rs = _history()
    stranger = Identity("ann", Signer.generate())  # ann's name, a key the trust file does not hold
    forged = chain.seal(stranger, msgspec.structs.replace(rs[1], release="evil"), rs[0])
    altered = msgspec.structs.replace(rs[1], id="x", release="evil")  # ann's signature over other content
    other = chain.seal(ANN, AliasChanged(app="shop", alias="staging", release="v9", seq=0, time=T0), None)
    # The same signed record with a bit its signature's base64 leaves free set otherwise: the same signature.
    sig, b64 = rs[0].signature, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    flipped = msgspec.structs.replace(rs[0], signature=sig[:-3] + b64[b64.index(sig[-3]) ^ 1] + sig[-2:])
    read = _read(rs, raw={0: b'{"junk": true}', 1: encode(forged), 2: encode(altered),
                          3: encode(rs[0])})
    assert read.records == rs and read.signers == ["ann"] * 3 and read.last_seq == 7
    assert [(s.stream_seq, s.kind) for s in read.skipped] == [
        (1, "undecodable"), (3, "unverified"), (5, "unverified"), (7, "copy")]
    assert chain.summary(read.skipped) == ("4 records skipped: 1 a copy of an earlier record, 1 not a readable "
                                           "record, 2 not signed by a trusted person")
    assert chain.summary(read.skipped[1:2]) == "1 record skipped: not signed by a trusted person"
    assert "unknown key id" in read.skipped[1].detail and "change #2 (evil)" in read.skipped[2].detail
    # A record of another alias, replayed here, and a copy under another encoding of the signature.
    tail = _read(rs, raw={3: encode(other)})
    assert tail.records == rs and [s.kind for s in tail.skipped] == ["foreign"]
    assert "belongs to the history of shop/staging" in tail.skipped[0].detail
    again = _read(rs, raw={3: encode(flipped)})
    assert chain.digest(flipped) != chain.digest(rs[0]) and again.records == rs
    assert [s.kind for s in again.skipped] == ["copy"] and "repeats record #1" in again.skipped[0].detail
    # Only junk: nothing in force, nothing broken, and an append must follow the junk's sequence.
    empty = chain.read("s", [(5, b"{}"), (9, b"[1]")], AliasChanged, "shop/production", _verify)
    assert empty.records == [] and len(empty.skipped) == 2 and empty.last_seq == 9


def test_a_record_appended_after_junk_follows_the_last_verified_one() -> None:
    rs = _history(1)
    nxt = chain.seal(ANN, AliasChanged(app="shop", alias="production", release="v1", seq=0,
                                       time=T0 + timedelta(minutes=1)), rs[-1])
    read = _read([*rs, nxt], raw={1: b'{"junk": true}'})
    assert [r.release for r in read.records] == ["v0", "v1"] and read.records[1].seq == 2


def test_sunset_refuses_and_deprecation_warns() -> None:
    now = T0
    old = ArtifactLifecycle(hash="sha256:a", successor="sha256:b", sunset=now - timedelta(days=1), seq=1)
    soon = ArtifactLifecycle(hash="sha256:c", sunset=now + timedelta(days=1), seq=1)
    findings = lifecycle.assess({"prompt/p": "sha256:a", "model_config/m": "sha256:c", "tool/t": "sha256:d"},
                                {"sha256:a": old, "sha256:c": soon}, now)
    assert [(f.key, f.sunset_passed) for f in findings] == [("model_config/m", False), ("prompt/p", True)]
    refused = lifecycle.refusal(findings, "r1")
    assert refused is not None and "use its successor sha256:b" in refused.message
    assert lifecycle.refusal(findings[:1], "r1") is None


def test_a_lifecycle_message_says_the_sunset_time_in_utc_not_the_date_alone() -> None:
    # Probe p29 F4: "is deprecated (sunset 2026-12-06)" read as past for a sunset later that day.
    later = datetime(2026, 12, 6, 23, 30, tzinfo=timezone(timedelta(hours=1)))
    record = ArtifactLifecycle(hash="sha256:a", successor="sha256:b", sunset=later, seq=1)
    (soon,) = lifecycle.assess({"prompt/p": "sha256:a"}, {"sha256:a": record}, datetime(2026, 12, 6, 12, tzinfo=UTC))
    assert soon.message() == "prompt/p sha256:a is deprecated (sunset 2026-12-06T22:30:00Z); use its successor sha256:b"
    (past,) = lifecycle.assess({"prompt/p": "sha256:a"}, {"sha256:a": record}, datetime(2026, 12, 7, tzinfo=UTC))
    assert past.message() == "prompt/p sha256:a was sunset on 2026-12-06T22:30:00Z; use its successor sha256:b"


def test_dsse_pre_authentication_encoding_matches_the_spec() -> None:
    from lockgate.provenance import attest

    assert attest.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world")


def test_a_writer_whose_clock_is_behind_still_chains_a_readable_history() -> None:
    first = chain.seal(ANN, AliasChanged(app="shop", alias="production", release="v0", seq=0, time=T0), None)
    late = chain.seal(ANN, AliasChanged(app="shop", alias="production", release="v1", seq=0,
                                        time=T0 - timedelta(minutes=5)), first)
    assert late.time == T0 and _read([first, late]).signers == ["ann", "ann"]
