"""How an OffLoop shares its slots and threads between owners (offloop.py): the counting alone, then the waiting for
a thread, with work that blocks until the test lets it go (no network, no sleeps)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lockgate.server.offloop import Busy, OffLoop, Shares


def test_an_owner_takes_its_share_and_the_rest_stays_for_the_others() -> None:
    shares = Shares(total=4, per_owner=2)
    shares.take("acme")
    shares.take("acme")
    assert shares.owner_full("acme") and not shares.owner_full("bravo") and not shares.full()
    shares.take("bravo")
    shares.take("globex")
    assert shares.full()
    for owner in ("acme", "acme", "bravo", "globex"):
        shares.give(owner)
    assert not shares.held and not shares.full()


@pytest.mark.parametrize(("total", "per_owner", "share"), [(64, 32, 32), (1, 1, 1), (2, 5, 2), (3, 0, 1)])
def test_a_share_is_at_least_one_and_at_most_all(total: int, per_owner: int, share: int) -> None:
    assert Shares(total, per_owner).per_owner == share


def test_the_next_free_one_goes_to_the_waiting_owner_holding_fewest_then_the_first_come() -> None:
    shares = Shares(total=4, per_owner=2)
    assert shares.pick([]) is None
    shares.take("acme")
    # acme came first but holds one; bravo and globex hold none: bravo, the first of those
    assert shares.pick(["acme", "acme", "bravo", "globex"]) == 2
    shares.take("acme")
    assert shares.pick(["acme", "acme"]) is None  # at its share: it waits, though two are free
    assert shares.pick(["acme", "globex"]) == 1
    shares.take("bravo")
    shares.take("globex")
    assert shares.pick(["initech"]) is None  # every one held


def test_an_offloop_divides_its_slots_and_threads_by_its_share() -> None:
    work = OffLoop("t", slots=64, threads=4, share=0.5)
    assert (work.slots.total, work.slots.per_owner, work.threads.total, work.threads.per_owner) == (64, 32, 4, 2)
    # One thread only would be one owner's whole share: two at least when shared.
    assert (OffLoop("t", threads=1, share=0.5).threads.total, OffLoop("t", threads=1).threads.total) == (2, 1)
    unshared = OffLoop("t", slots=8, threads=3)  # the first to come take them all
    assert (unshared.slots.per_owner, unshared.threads.per_owner) == (8, 3)


async def test_past_its_share_of_the_slots_an_owner_is_refused_at_once_and_the_others_are_not() -> None:
    work = OffLoop("t", slots=4, threads=2, share=0.5, busy="all taken", over_share="{owner} has {share} of {total}")
    async with work.slot("acme"), work.slot("acme"):
        with pytest.raises(Busy, match="^acme has 2 of 4$"):
            async with work.slot("acme"):
                pytest.fail("acme took a third slot")
        async with work.slot("bravo"), work.slot("globex"):
            with pytest.raises(Busy, match="^all taken$"):
                async with work.slot("initech"):
                    pytest.fail("a fifth slot")
    assert not work.slots.held


async def test_an_owner_past_its_share_of_the_threads_waits_behind_its_own_work_only() -> None:
    work = OffLoop("t", threads=2, share=0.5)
    release, started = threading.Event(), threading.Semaphore(0)

    def held() -> str:
        started.release()
        release.wait(timeout=30)
        return "acme"

    try:
        first = asyncio.create_task(work.run(held, "acme"))
        assert await asyncio.to_thread(started.acquire, timeout=10)
        second = asyncio.create_task(work.run(held, "acme"))  # acme holds its share: this one waits
        # bravo's work runs while both of acme's are held (before, it queued behind them in the pool)
        assert await asyncio.wait_for(work.run(lambda: "bravo", "bravo"), 10) == "bravo"
        assert work.threads.held == {"acme": 1} and not second.done()
        release.set()
        assert await asyncio.wait_for(asyncio.gather(first, second), 10) == ["acme", "acme"]
        assert not work.threads.held
    finally:
        release.set()
        work.close()


async def test_a_thread_is_given_back_when_its_work_ends_not_when_its_caller_stops_waiting() -> None:
    work = OffLoop("t", threads=2, share=0.5)
    release, started = threading.Event(), threading.Semaphore(0)

    def held() -> None:
        started.release()
        release.wait(timeout=30)

    try:
        gone = asyncio.create_task(work.run(held, "acme"))
        assert await asyncio.to_thread(started.acquire, timeout=10)
        waiting = asyncio.create_task(work.run(held, "acme"))
        # bravo's work done (the loop has turned meanwhile): acme's second is in its line
        assert await asyncio.wait_for(work.run(lambda: "bravo", "bravo"), 10) == "bravo"
        assert [owner for owner, _ in work._waiting.values()] == ["acme"]
        gone.cancel()  # its client left: the work runs on in its thread
        waiting.cancel()  # left its line before it had a thread
        await asyncio.gather(gone, waiting, return_exceptions=True)
        assert work.threads.held == {"acme": 1} and not work._waiting
        release.set()
        # The thread let go as the work ended: acme may run again.
        assert await asyncio.wait_for(work.run(lambda: "again", "acme"), 10) == "again"
        assert not work.threads.held
    finally:
        release.set()
        work.close()
