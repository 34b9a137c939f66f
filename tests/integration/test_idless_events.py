"""An inference event an application publishes as JSON without an `id` (it is optional on the wire) gets one id,
derived from its message: the sink and the cost service, each decoding the message, store and bill it under the
same id, and a message decoded again (a redelivery) gives its events the same ids. Real NATS and chDB."""

from __future__ import annotations

import pytest

from lockgate.bus import Bus
from lockgate.store import Store

pytestmark = pytest.mark.timeout(120)


async def test_events_without_an_id_are_stored_and_billed_under_one_id(run_services, bus: Bus, store: Store) -> None:
    # Before (probe p4): every consumer made up its own id, so no ledger entry named the event it billed, and after
    # a crash 23 of 242 such events were stored twice (the redelivered message decoded to new ids).
    svcs = await run_services("sink", "cost")
    event = (b'{"type": "lockgate.inference", "app": "shop", "model": "gpt-4o-mini", "input_tokens": 1000, '
             b'"output_tokens": 500, "session_id": "%d"}')
    for n in range(3):  # one event alone, then a message of two
        body = event % n if n == 0 else b"[" + event % n + b"," + event % (n + 10) + b"]"
        await bus.publish(bus.subjects.inference("shop"), body, msg_id=f"idless-{n}")
    await svcs["sink"].handlers.events.wait_for(5)
    await svcs["cost"].handlers.events.wait_for(5)
    await svcs["sink"].handlers.progress("cost_ledger").wait_for(3)  # a ledger fact per message priced

    stored = {r["id"] for r in store.rows("SELECT id FROM inference_events")}
    billed = {r["event_id"] for r in store.rows("SELECT event_id FROM cost_ledger")}
    assert len(stored) == 5 and billed == stored
