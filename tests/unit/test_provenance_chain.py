"""Signed hash chains of provenance records: sealing, checking, and the record in force at a time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

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


def _history(n: int = 3) -> list[AliasChanged]:
    out: list[AliasChanged] = []
    for i in range(n):
        record = AliasChanged(app="shop", alias="production", release=f"v{i}", seq=0,
                              time=T0 + timedelta(minutes=10 * i))
        out.append(chain.seal(ANN, record, out[-1] if out else None))
    return out


def test_a_sealed_history_checks_out_and_answers_at_any_time() -> None:
    records = _history()
    assert [r.seq for r in records] == [1, 2, 3] and chain.check(records, _verify) == ["ann"] * 3
    assert chain.at(records, T0 - timedelta(seconds=1)) is None
    assert chain.at(records, T0 + timedelta(minutes=10)).release == "v1"  # type: ignore[union-attr]
    assert chain.at(records, T0 + timedelta(minutes=15)).release == "v1"  # type: ignore[union-attr]
    assert chain.at(records, None).release == "v2"  # type: ignore[union-attr]


@pytest.mark.parametrize("tamper, says", [
    (lambda rs: [rs[0], msgspec.structs.replace(rs[1], release="evil"), rs[2]], "does not match its signature"),
    (lambda rs: [rs[0], rs[2]], "expected record #2"),
    (lambda rs: [rs[1], rs[0], rs[2]], "expected record #1"),
    (lambda rs: [rs[0], msgspec.structs.replace(rs[1], prev_digest="sha256:x"), rs[2]], "does not follow"),
])
def test_an_altered_removed_or_reordered_record_is_named(tamper, says) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(chain.ChainBroken, match=says):
        chain.check(tamper(_history()), _verify)


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


def test_dsse_pre_authentication_encoding_matches_the_spec() -> None:
    from lockgate.provenance import attest

    assert attest.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world")


def test_a_writer_whose_clock_is_behind_still_chains_a_readable_history() -> None:
    first = chain.seal(ANN, AliasChanged(app="shop", alias="production", release="v0", seq=0, time=T0), None)
    late = chain.seal(ANN, AliasChanged(app="shop", alias="production", release="v1", seq=0,
                                        time=T0 - timedelta(minutes=5)), first)
    assert late.time == T0 and chain.check([first, late], _verify) == ["ann", "ann"]
