"""The Outbox's spool: records outlive the process, acknowledged ones are not re-enqueued, fully
acknowledged segments are deleted, a torn last record is skipped, the size bound refuses (counted),
and a directory is one live process's.

Each "restart" here is a new Spool on the same directory after the first was dropped without
`close()` (its files as a killed process leaves them); the kill -9 of a real router is
tests/integration/test_router_spool.py.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from lockgate.contracts import InferenceEvent
from lockgate.outbox import UNTIL_BACK, Encoded, Outbox, encode_event
from lockgate.spool import Spool, SpoolBusy, Spooled, claim
from lockgate.subjects import Subjects

from .test_outbox import FakeJetStream

pytestmark = pytest.mark.timeout(30)

SUBJECTS = Subjects("t")


def event(n: int, app: str = "a") -> Encoded:
    return encode_event(InferenceEvent(app=app, tenant="acme", trace_id=f"{n + 1:032x}", span_id=f"{n + 1:016x}",
                                       input_tokens=n))


def killed(spool: Spool) -> None:
    """Drop a spool as kill -9 does: no close(), only the lock released (the kernel's part)."""
    os.close(spool._lock_fd)
    spool._lock_fd = -1


def segments(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.suffix in (".seg", ".ack"))


def test_records_survive_and_come_back_whole_oldest_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    sent = [event(i) for i in range(5)]
    tickets = [spool.append(e) for e in sent]
    assert all(t.ticket >= 0 for t in tickets) and spool.pending == 5
    killed(spool)
    again = Spool(tmp_path)
    back = again.take_recovered()
    assert [(e.app, e.id, e.tenant, e.traceparent, e.data) for e in back] == [
        (e.app, e.id, e.tenant, e.traceparent, e.data) for e in sent]
    assert [e.ticket for e in back] == [t.ticket for t in tickets]  # their places: settled where they were written
    assert again.take_recovered() == []


def test_acknowledged_records_are_not_re_enqueued(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    written = [spool.append(event(i)) for i in range(6)]
    spool.settle([written[4], written[1]])  # acks come out of order (batches in flight)
    spool.settle([written[0]])
    killed(spool)
    again = Spool(tmp_path)
    assert [e.id for e in again.take_recovered()] == [written[i].id for i in (2, 3, 5)]
    assert again.pending == 3
    # Settled by the new process, the earlier segment is deleted; a clean close leaves nothing.
    again.settle(again.take_recovered() or [written[i] for i in (2, 3, 5)])
    assert again.pending == 0
    again.close()
    assert segments(tmp_path) == []


def test_a_fully_acknowledged_segment_is_deleted_once_the_spool_moved_past_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=1)  # every record starts a new segment
    first, second, third = (spool.append(event(i)) for i in range(3))
    assert len([n for n in segments(tmp_path) if n.endswith(".seg")]) == 3
    spool.settle([first])
    assert not (tmp_path / f"{first.ticket >> 32:016d}.seg").exists()
    spool.settle([third])  # the current segment: kept while it may still be appended to
    assert (tmp_path / f"{third.ticket >> 32:016d}.seg").exists()
    size = spool.size
    spool.settle([second])
    assert spool.size < size and spool.pending == 0
    spool.close()
    assert segments(tmp_path) == []


def test_a_torn_last_record_is_skipped_and_the_start_goes_on(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = [spool.append(event(i)) for i in range(3)]
    spool.append(event(3))
    killed(spool)
    seg = next(tmp_path.glob("*.seg"))
    data = seg.read_bytes()
    seg.write_bytes(data[:-7])  # killed mid-write: the last record is cut short
    again = Spool(tmp_path)
    assert [e.id for e in again.take_recovered()] == [e.id for e in kept]
    assert again.torn == 1
    killed(again)
    # Garbled rather than cut (a machine crash: zeros, or bytes whose checksum fails): skipped the same way.
    seg.write_bytes(data[:-7] + b"\0" * 64)
    assert [e.id for e in Spool(tmp_path).take_recovered()] == [e.id for e in kept]


def test_a_torn_ack_entry_only_means_that_record_is_published_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    written = [spool.append(event(i)) for i in range(3)]
    spool.settle(written[:2])
    killed(spool)
    ack = next(tmp_path.glob("*.ack"))
    ack.write_bytes(ack.read_bytes()[:-1])
    assert [e.id for e in Spool(tmp_path).take_recovered()] == [written[1].id, written[2].id]


def test_the_size_bound_refuses_and_counts_and_room_comes_back_as_segments_go(tmp_path: Path) -> None:
    one = len(event(0).data) + 200  # a record: the event's bytes, app, ids, framing
    spool = Spool(tmp_path, max_bytes=3 * one, segment_bytes=1)
    events = [event(i) for i in range(5)]
    written = [spool.append(e) for e in events]
    taken = [e for e in written if e.ticket >= 0]
    assert 2 <= len(taken) < 5 and spool.refused == 5 - len(taken)
    assert spool.size <= 3 * one
    # A refused event is still the event (it is buffered in memory only, as without a spool).
    assert all(isinstance(s, Spooled) and (s.id, s.data) == (e.id, e.data) for s, e in zip(written, events, strict=True))
    spool.settle(taken)  # all but the current segment deleted
    assert spool.append(event(9)).ticket >= 0


def test_one_directory_is_one_live_process_s_and_claim_takes_the_next(tmp_path: Path) -> None:
    base = tmp_path / "router-8080"
    a = claim(base)
    with pytest.raises(SpoolBusy, match="in use by process"):
        Spool(base)
    b = claim(base)
    assert (a.directory, b.directory) == (base, Path(f"{base}-2"))
    a.append(event(1))
    killed(a)
    c = claim(base)  # a's spool, left by a dead process, is taken over
    assert c.directory == base and len(c.take_recovered()) == 1
    assert oct(base.stat().st_mode & 0o777) == oct(0o700)


async def test_an_outbox_on_a_spool_publishes_what_a_killed_one_left_exactly_once(tmp_path: Path) -> None:
    js = FakeJetStream()
    js.hold = asyncio.Event()  # no ack comes back: the bus is away
    first = Outbox(SUBJECTS, retry=UNTIL_BACK, spool=Spool(tmp_path))
    first.start(js)
    for i in range(10):
        assert first.add(event(i))
    await asyncio.wait_for(js.arrived.wait(), 5)
    killed(first.spool)  # ... and the process dies with its buffer
    for task in list(first._batcher._in_flight) + [first._batcher._runner]:
        task.cancel()

    js2 = FakeJetStream()
    second = Outbox(SUBJECTS, retry=UNTIL_BACK, spool=Spool(tmp_path))
    assert second.recovered == 10
    second.start(js2)
    second.add(event(10))
    await second.close()
    assert [e.input_tokens for e in js2.events()] == list(range(11))  # the earlier ones first, each once
    assert (second.sent, second.failed, second.dropped) == (11, 0, 0)
    assert segments(tmp_path) == []  # all acknowledged: nothing left to re-publish

    third = Outbox(SUBJECTS, spool=Spool(tmp_path))
    assert third.recovered == 0
    await third.close()


async def test_what_the_buffer_evicts_is_not_kept_in_the_spool_either(tmp_path: Path) -> None:
    outbox = Outbox(SUBJECTS, capacity=3, overflow="drop_oldest", spool=Spool(tmp_path))
    events = [event(i) for i in range(5)]
    for e in events:
        outbox.add(e)
    assert outbox.dropped == 2 and outbox.spool is not None and outbox.spool.pending == 3
    killed(outbox.spool)
    assert [e.id for e in Spool(tmp_path).take_recovered()] == [e.id for e in events[2:]]


async def test_a_close_with_the_bus_still_away_leaves_the_events_for_the_next_start(tmp_path: Path) -> None:
    outbox = Outbox(SUBJECTS, retry=UNTIL_BACK, close_timeout_s=0.1, publish_timeout_s=0.05, spool=Spool(tmp_path))
    drops: list[tuple[int, str]] = []
    outbox._on_drop = lambda n, reason: drops.append((n, reason))
    outbox.start(_TimingOut())
    events = [event(i) for i in range(3)]
    for e in events:
        outbox.add(e)
    await outbox.close()
    # Every attempt timed out: sent, they may be stored (unconfirmed), and the spool keeps them all the same.
    assert (outbox.failed, outbox.unconfirmed) == (0, 3) and drops == [(3, "spooled")]
    assert [e.id for e in Spool(tmp_path).take_recovered()] == [e.id for e in events]


class _TimingOut:
    async def publish(self, *args: object, **kw: object) -> object:
        raise TimeoutError
