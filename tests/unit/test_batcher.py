"""The one batcher: count, bytes and age limits, overflow policies, submit, flush and close."""

from __future__ import annotations

import asyncio

import pytest

from lockgate.batcher import Batcher


class Sink:
    def __init__(self, fail_on: set[int] | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on or set()
        self.gate: asyncio.Event | None = None

    async def __call__(self, items: list[int]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_on & set(items):
            raise ValueError(f"poison in {items}")
        self.batches.append(items)


async def test_flushes_by_count_and_keeps_order() -> None:
    sink = Sink()
    b: Batcher[int] = Batcher(sink, max_items=3, max_age_s=60)
    for i in range(7):
        assert b.add(i)
    await b.close()
    assert sink.batches[:2] == [[0, 1, 2], [3, 4, 5]]
    assert [i for batch in sink.batches for i in batch] == list(range(7))


async def test_flushes_by_age_without_a_flush_call() -> None:
    sink = Sink()
    b: Batcher[int] = Batcher(sink, max_items=1000, max_age_s=0.01)
    await b.submit(1)  # returns only once the age flush stored it
    assert sink.batches == [[1]]
    await b.close()


async def test_flushes_by_bytes() -> None:
    sink = Sink()
    b: Batcher[str] = Batcher(sink, max_items=1000, max_age_s=60, max_bytes=10, size=len)
    for word in ("aaaa", "bbbb", "cccc", "dd"):
        b.add(word)
    await b.close()
    assert sink.batches[0] == ["aaaa", "bbbb", "cccc"]


async def test_drop_newest_refuses_and_counts() -> None:
    sink = Sink()
    sink.gate = asyncio.Event()
    b: Batcher[int] = Batcher(sink, max_items=1, max_age_s=60, capacity=2, overflow="drop_newest")
    results = [b.add(i) for i in range(5)]
    assert results == [True, True, False, False, False]
    assert b.dropped == 3
    sink.gate.set()
    await b.close()
    assert [i for batch in sink.batches for i in batch] == [0, 1]


async def test_drop_oldest_evicts_and_flush_does_not_wait_for_the_evicted() -> None:
    sink = Sink()
    b: Batcher[int] = Batcher(sink, max_items=100, max_age_s=60, capacity=3, overflow="drop_oldest")
    for i in range(5):
        assert b.add(i)
    assert b.dropped == 2
    await asyncio.wait_for(b.close(), 5)
    assert [i for batch in sink.batches for i in batch] == [2, 3, 4]


async def test_submit_raises_what_its_flush_raised_and_isolates_poison() -> None:
    sink = Sink(fail_on={2})
    b: Batcher[int] = Batcher(sink, max_items=4, max_age_s=60, isolate=lambda exc: isinstance(exc, ValueError))
    results = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
    assert [isinstance(r, ValueError) for r in results] == [False, False, True, False]
    assert sorted(i for batch in sink.batches for i in batch) == [0, 1, 3]
    assert b.failed == 1 and b.flushed == 3
    await b.close()


async def test_close_really_flushes_everything_and_refuses_more() -> None:
    sink = Sink()
    b: Batcher[int] = Batcher(sink, max_items=10_000, max_age_s=3600)
    for i in range(25_000):
        b.add(i)
    await asyncio.wait_for(b.close(), 10)
    assert sum(map(len, sink.batches)) == 25_000
    with pytest.raises(RuntimeError):
        b.add(1)


async def test_flush_waits_for_in_flight_batches() -> None:
    sink = Sink()
    sink.gate = asyncio.Event()
    b: Batcher[int] = Batcher(sink, max_items=2, max_age_s=60, max_in_flight=4)
    for i in range(6):
        b.add(i)
    flushing = asyncio.create_task(b.flush())
    done, _ = await asyncio.wait({flushing}, timeout=0.1)
    assert not done  # the batches are held at the gate, so flush() must still be waiting
    sink.gate.set()
    await asyncio.wait_for(flushing, 5)
    assert sum(map(len, sink.batches)) == 6
    await b.close()


def test_without_autostart_add_buffers_outside_an_event_loop() -> None:
    b: Batcher[int] = Batcher(Sink(), autostart=False)
    assert b.add(1) and b.add(2)
    assert len(b) == 2 and not b.closed


async def test_abandon_drops_and_counts_what_a_never_started_batcher_holds() -> None:
    # A client closed without starting kept its events unseen: neither flushed nor counted anywhere.
    sink, losses = Sink(), []
    b: Batcher[int] = Batcher(sink, autostart=False, on_drop=lambda n, why: losses.append((n, why)))
    assert b.add(1) and b.add(2)
    waiting = b.submit(3)
    waiting.send(None)  # runs submit() up to its wait: the item is queued (no flush can run: never started)
    assert b.abandon("closed") == 3
    assert b.dropped == 3 and losses == [(3, "closed")] and len(b) == 0 and b.closed
    with pytest.raises(RuntimeError, match="closed before it was started"):
        waiting.send(None)  # resumed, submit() raises what its item's future was given
    with pytest.raises(RuntimeError):
        b.add(4)  # refused like any closed batcher's add
    assert sink.batches == []


async def test_without_autostart_nothing_flushes_until_start() -> None:
    sink = Sink()
    b: Batcher[int] = Batcher(sink, max_items=2, max_age_s=0.001, autostart=False)
    for i in range(5):
        b.add(i)  # full batches, and older than max_age_s: a started batcher would flush them
    assert asyncio.all_tasks() == {asyncio.current_task()}  # no flush task was started
    assert len(b) == 5
    b.start()
    await asyncio.wait_for(b.flush(), 5)
    assert [i for batch in sink.batches for i in batch] == list(range(5))
    await b.close()
    assert b.closed
