"""The router's upstream slots (h1.Slots), pure: per tenant shares, the bounded wait, and a slot let go going to the
first waiting call that may take it (tests/integration/test_router_upstream_slots.py runs them through the router)."""

from __future__ import annotations

import asyncio

import pytest
from yarl import URL

from lockgate.services.router.h1 import H1Pool, NoSlot, Slots


async def _in_line(slots: Slots, waiting: int) -> None:
    """Return once the calls just started have each run to their wait in line (`waiting` of them): the loop runs
    ready callbacks in order, so a future set by one queued after their first steps is done after them."""
    loop = asyncio.get_running_loop()
    turn = loop.create_future()
    loop.call_soon(turn.set_result, None)
    await turn
    assert sum(map(len, slots._lines.values())) == waiting


async def test_a_tenant_at_its_share_waits_and_is_refused_while_another_tenant_is_served() -> None:
    slots = Slots(limit=4, share=2)
    acme = [await slots.take("acme", 0) for _ in range(2)]
    with pytest.raises(NoSlot) as caught:
        await slots.take("acme", 0.01)
    assert (caught.value.in_use, caught.value.limit, caught.value.mine, caught.value.share) == (2, 4, 2, 2)
    bravo = [await slots.take("bravo", 0) for _ in range(2)]
    assert len(acme + bravo) == 4


async def test_a_slot_let_go_goes_to_the_first_waiter_below_its_share() -> None:
    slots = Slots(limit=2, share=1)
    acme = await slots.take("acme", 0)
    bravo = await slots.take("bravo", 0)
    # acme waits first, but is at its share: the slot bravo lets go is carol's, who waits behind it.
    acme_waits = asyncio.ensure_future(slots.take("acme", None))
    carol_waits = asyncio.ensure_future(slots.take("carol", None))
    await _in_line(slots, 2)
    bravo.free()
    carol = await carol_waits
    assert not acme_waits.done()
    acme.free()  # acme's own slot let go: its waiting call has it
    (await acme_waits).free()
    carol.free()
    assert [await slots.take(t, 0) for t in ("x", "y")]  # all free again


async def test_a_waiter_that_gives_up_leaves_the_line_and_one_handed_a_slot_as_it_gives_up_hands_it_on() -> None:
    slots = Slots(limit=1, share=1)
    held = await slots.take("acme", 0)
    gone = asyncio.ensure_future(slots.take("bravo", None))
    after = asyncio.ensure_future(slots.take("carol", None))
    await _in_line(slots, 2)
    held.free()  # handed to bravo's call ...
    gone.cancel()  # ... which is cancelled before it ran: carol's call has the slot
    carol = await after
    assert gone.cancelled()
    with pytest.raises(NoSlot):
        await slots.take("dave", 0.01)
    carol.free()
    (await slots.take("dave", 0)).free()


def test_a_pools_slots_are_per_endpoint_and_its_share_at_least_one() -> None:
    pool = H1Pool(limit=3, share=0.1)
    assert pool.slots("a") is pool.slots("a") and pool.slots("a") is not pool.slots("b")
    assert (pool.slots("a").limit, pool.slots("a").share) == (3, 1)


async def test_a_call_that_fails_before_it_starts_lets_go_of_its_slot() -> None:
    pool = H1Pool(limit=1)
    slot = await pool.slot("a", "acme", 0)
    with pytest.raises(ValueError, match="line break"):  # refused as it is written: no connection, no call
        await pool.open(URL("http://127.0.0.1:1/v1/chat/completions"), b"{}", {"x-a": "1\r\nHost: evil"}, 1.0,
                        slot=slot)
    (await pool.slot("a", "bravo", 0)).free()  # the one slot is free again


async def test_a_waiter_cancelled_before_its_task_ran_is_passed_over() -> None:
    slots = Slots(limit=1, share=1)
    held = await slots.take("acme", 0)
    gone = asyncio.ensure_future(slots.take("bravo", None))
    after = asyncio.ensure_future(slots.take("carol", None))
    await _in_line(slots, 2)
    gone.cancel()  # cancelled first, its task not run yet as the slot frees: carol's call has it
    held.free()
    (await after).free()
    assert gone.cancelled()
    (await slots.take("dave", 0)).free()
