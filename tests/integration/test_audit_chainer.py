"""The audit chainer on a real nats-server: two gatekeeper replicas appending at once never fork the chain
(the KV head is compare-and-set), and a redelivered entry is not appended twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from lockgate import auditchain, auditlog
from lockgate.bus import Bus, Delivery
from lockgate.codec import Codec, encode
from lockgate.config import Settings
from lockgate.contracts import AuditEntry, AuditRecord, GateDecided
from lockgate.errors import InvalidEvent, LockgateError
from lockgate.server.service import ServiceContext
from lockgate.services.gatekeeper.chain import HEAD, Chainer, HeadContended
from lockgate.services.gatekeeper.ownkey import OwnKey
from lockgate.services.gatekeeper.records import Records
from lockgate.signing import Keyring, Signer, trust_file_path, trust_key

pytestmark = pytest.mark.timeout(60)
records: Codec[AuditRecord] = Codec(AuditRecord)
decisions: Codec[GateDecided] = Codec(GateDecided)
SIGNER = Signer.generate()


@pytest.fixture(autouse=True)
def trusted(settings: Settings) -> None:
    """SIGNER is a gatekeeper key the trust roots trust: the chainer chains with no other."""
    trust_key(trust_file_path(settings), SIGNER.public)


def chainer_of(context: ServiceContext) -> Chainer:
    return Chainer(context, OwnKey(context, SIGNER))


@pytest.fixture
async def published(bus: Bus) -> AsyncIterator[Any]:
    sub = await bus.nc.subscribe(bus.subjects.audit_records)
    yield sub
    await sub.unsubscribe()


def entry(i: int) -> AuditEntry:
    return AuditEntry(kind="rollout", actor="apikey:k", target="web", action=f"step-{i}")


def delivered(bus: Bus, identity: str) -> Delivery:
    return Delivery(subject=bus.subjects.audit(identity), msg_id="", headers={}, deliveries=1, stream_seq=0)


async def head(bus: Bus) -> AuditRecord:
    kv = await bus.kv(bus.subjects.kv_audit)
    return records.decode((await kv.get(HEAD)).value)


async def test_two_replicas_appending_at_once_extend_one_chain(context: ServiceContext, bus: Bus,
                                                               published: Any) -> None:
    entries = [entry(i) for i in range(12)]

    async def replica(mine: list[AuditEntry]) -> None:
        chainer = chainer_of(context)
        for e in mine:
            for _ in range(50):  # what the consumer edge does with HeadContended: nack, then redeliver
                try:
                    await chainer.on_entry(e, delivered(bus, "router"))
                    break
                except HeadContended:
                    continue

    # Two replicas append their entries at the same time (as if both were handed one), racing for the head.
    await asyncio.gather(replica(entries[0::2]), replica(entries[1::2]))
    rows: dict[int, AuditRecord] = {}
    while len(rows) < len(entries):
        r = records.decode((await published.next_msg(timeout=10)).data)
        rows.setdefault(r.seq, r)
    chain = [rows[s] for s in sorted(rows)]
    assert [r.seq for r in chain] == list(range(1, 13))
    assert {r.id for r in chain} == {e.id for e in entries}  # each entry once
    last = await head(bus)
    assert last.seq == 12
    assert auditchain.verify(chain, Keyring([SIGNER.public]), last).ok


async def test_a_redelivered_entry_is_recorded_once_and_its_row_republished(context: ServiceContext, bus: Bus,
                                                                             published: Any) -> None:
    chainer = chainer_of(context)
    first, second = entry(1), entry(2)
    await chainer.on_entry(first, delivered(bus, "gatekeeper"))
    await chainer.on_entry(first, delivered(bus, "gatekeeper"))  # redelivered: the ack was lost
    await chainer.on_entry(second, delivered(bus, "gatekeeper"))
    got = [records.decode((await published.next_msg(timeout=10)).data) for _ in range(3)]
    assert [(r.seq, r.id) for r in got] == [(1, first.id), (1, first.id), (2, second.id)]
    assert got[0] == got[1]  # the same row again, deduplicated by its Nats-Msg-Id and the sink's seq key
    assert (await head(bus)).seq == 2 and got[2].producer == "gatekeeper"


async def test_a_replica_that_died_before_publishing_leaves_no_gap(context: ServiceContext, bus: Bus,
                                                                   published: Any) -> None:
    # A replica won the head with seq 1 and stopped before publishing the row: the next append publishes it.
    orphan = auditchain.seal(entry(0), "router", None, SIGNER)
    kv = await bus.kv(bus.subjects.kv_audit)
    await kv.create(HEAD, encode(orphan))
    await chainer_of(context).on_entry(entry(1), delivered(bus, "router"))
    got = [records.decode((await published.next_msg(timeout=10)).data) for _ in range(2)]
    assert [r.seq for r in got] == [1, 2] and got[0] == orphan and got[1].prev_hash == orphan.hash


async def test_another_producers_entry_under_the_same_id_never_stands_for_ours(context: ServiceContext, bus: Bus,
                                                                               published: Any) -> None:
    # Found by a probe: the operator published, on its own audit subject, an entry under the id the gatekeeper
    # would give its decision's entry ("decision PASS", actor gatekeeper); the chainer then took the gatekeeper's
    # genuine entry for a redelivery of the head and dropped it, and `audit verify` said intact.
    chainer = chainer_of(context)
    genuine = AuditEntry(kind="decision", actor="gatekeeper", target="shop-v2", action="decided",
                         details={"decision": "BLOCK"})
    forged = AuditEntry(id=genuine.id, time=genuine.time, kind="decision", actor="gatekeeper", target="shop-v2",
                        action="decided", details={"decision": "PASS"})
    await chainer.on_entry(forged, delivered(bus, "operator"))
    await chainer.on_entry(genuine, delivered(bus, "gatekeeper"))
    await chainer.on_entry(genuine, delivered(bus, "gatekeeper"))  # a true redelivery is still recorded once
    rows: dict[int, AuditRecord] = {}
    while len(rows) < 2:
        r = records.decode((await published.next_msg(timeout=10)).data)
        rows[r.seq] = r
    assert [(rows[s].producer, rows[s].details["decision"]) for s in sorted(rows)] == [
        ("operator", "PASS"), ("gatekeeper", "BLOCK")]
    assert (await head(bus)).seq == 2


async def test_an_entry_is_cut_to_what_its_row_can_hold(bus: Bus) -> None:
    # Found by a probe: an apply of a directory a million characters long made an entry whose sealed row did not fit
    # in the chain head's one NATS message; the chainer retried it for seconds, blocking the chain, then
    # dead-lettered it, and the change it recorded had no row.
    sub = await bus.nc.subscribe(bus.subjects.audit("router"))
    sent = await auditlog.record(bus, "router", kind="rollout", actor="a" * 1000, target="t" * 1_000_000,
                                 action="x" * 500, reason="r" * 100_000,
                                 details={f"k{i}": "v" * 10_000 for i in range(100)})
    got = Codec(AuditEntry).decode((await sub.next_msg(timeout=10)).data)  # within the contract's bounds
    assert got.id == sent.id and got.target.endswith("[cut here]") and len(got.details) == 64
    record = auditchain.seal(got, "router", None, SIGNER)
    assert len(encode(record)) < bus.nc.max_payload // 2


async def test_an_entry_too_large_in_bytes_is_refused_at_once_and_the_chain_goes_on(
        context: ServiceContext, bus: Bus, published: Any) -> None:
    # Found by a probe: control characters (six bytes each once escaped) made a 1 MB entry within every character
    # bound; each such entry held the chain about 14 s of retries before its dead letter.
    chainer = chainer_of(context)
    huge = AuditEntry(kind="rollout", actor="a", target="t", action="x",
                      details={f"k{i}": "\x01" * 4096 for i in range(64)})
    with pytest.raises(InvalidEvent, match="over what one NATS message holds"):
        await chainer.on_entry(huge, delivered(bus, "operator"))
    await chainer.on_entry(entry(1), delivered(bus, "router"))
    assert records.decode((await published.next_msg(timeout=10)).data).seq == 1


async def test_a_decision_is_announced_while_its_audit_rows_are_refused(context: ServiceContext, bus: Bus) -> None:
    # Found by a probe: a producer's junk filled the audit queue, every audit entry was refused, and the gatekeeper,
    # which announced a decision only after its audit rows, announced none: a person's reject of a live release was
    # stored in KV, but routers and decision watches never heard of it. The decision is current in KV: announced
    # now, its audit rows failing the message (redelivered, they are retried).
    queue = bus.subjects.streams["audit"].name
    info = await bus.js.stream_info(queue)
    await bus.js.update_stream(info.config.evolve(max_bytes=4096))  # no chainer reads it here: it stays full
    with pytest.raises(LockgateError):  # filled to the last few bytes: no audit entry fits
        for i in range(4096):
            await bus.publish(bus.subjects.audit("operator"), b"junk", msg_id=f"junk-{i}")
    reject = SIGNER.sign(GateDecided(release="shop-v2", rules=[], decision="BLOCK", reason="rejected by dana"))
    heard = await bus.nc.subscribe(bus.subjects.gate_decided("shop-v2"))
    with pytest.raises(LockgateError):  # the audit rows: the message is redelivered and they are written then
        await Records(context, SIGNER.id_salt).finish(reject, action="rejected", actor="person:dana", key="review-1")
    announced = decisions.decode((await heard.next_msg(timeout=5)).data)
    assert (announced.id, announced.decision) == (reject.id, "BLOCK")
