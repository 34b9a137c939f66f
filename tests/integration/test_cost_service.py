"""Cost accountant on real NATS and chDB: exact ledger costs, cost records, rollups, idempotency."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from lockgate.bus import Bus, Delivery
from lockgate.codec import Codec
from lockgate.contracts import CostRecord, InferenceEvent
from lockgate.pricebook import load_price_book
from lockgate.server.service import ServiceContext
from lockgate.services.cost.handlers import CostHandlers
from lockgate.services.query.cost import UnknownDimension, cost_rollup
from lockgate.store import Store
from tests.helpers import sink_stored

pytestmark = pytest.mark.timeout(60)

# Recent (consumers refuse event times far from now), at noon so that an hour later is the same day.
T0 = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0) - timedelta(days=2)
DAY0, DAY1 = str(T0.date()), str((T0 + timedelta(days=1)).date())


def _batch() -> list[InferenceEvent]:
    # Shipped price book: sim-good 0.50 in / 0.25 cached / 1.50 out; sim-canary 0.40 / 0.20 / 1.20 per Mtok.
    return [
        InferenceEvent(app="shop", deployment="web", model="sim-good", input_tokens=1000, cached_tokens=200,
                       output_tokens=500, time=T0),
        InferenceEvent(app="shop", deployment="web", model="sim-good", input_tokens=2000, output_tokens=100,
                       time=T0 + timedelta(hours=1)),
        InferenceEvent(app="shop", deployment="web", model="sim-canary", input_tokens=1_000_000,
                       output_tokens=1_000_000, time=T0 + timedelta(days=1)),
        InferenceEvent(app="shop", deployment="web", model="homegrown", input_tokens=10, output_tokens=10,
                       time=T0, tenant="acme"),
    ]


EXPECTED = [
    (800 * 0.50 + 200 * 0.25 + 500 * 1.50) / 1e6,
    (2000 * 0.50 + 100 * 1.50) / 1e6,
    0.40 + 1.20,
    0.0,
]


async def test_ledger_records_and_rollup(run_services, bus: Bus, store: Store) -> None:
    records = await bus.nc.subscribe(bus.subjects.cost_all)
    svcs = await run_services("sink", "cost")
    events = _batch()
    await bus.publish(bus.subjects.inference("shop"), events[:3])
    await bus.publish(bus.subjects.inference("shop", "acme"), events[3])  # each tenant's on its own subject

    got = [Codec(CostRecord).decode((await records.next_msg(timeout=15)).data) for _ in range(3)]
    by_model = {r.model: r for r in got}
    assert by_model["sim-good"].calls == 2 and by_model["sim-good"].cost_usd == pytest.approx(sum(EXPECTED[:2]))
    assert by_model["homegrown"].tenant == "acme" and by_model["homegrown"].unpriced_calls == 1
    book = svcs["cost"].price_book
    assert {r.price_book for r in got} == {book.hash}

    # a ledger fact per message (two), each before its CostRecords; the sink stores both
    await sink_stored(svcs["sink"].handlers, cost_ledger=2)
    rows = store.rows("SELECT event_id, cost_usd, priced, price_book FROM cost_ledger")
    assert len(rows) == 4
    cost = {r["event_id"]: r["cost_usd"] for r in rows}
    assert [cost[e.id] for e in events] == pytest.approx(EXPECTED, rel=1e-12)
    assert [r["priced"] for r in sorted(rows, key=lambda r: [e.id for e in events].index(r["event_id"]))] == [
        True, True, True, False]

    daily = await asyncio.to_thread(cost_rollup, store, ["tenant", "day"])
    assert [(r["tenant"], str(r["day"]), r["calls"]) for r in daily] == [
        ("default", DAY1, 1), ("default", DAY0, 2), ("acme", DAY0, 1)]
    assert daily[1]["cost_usd"] == pytest.approx(sum(EXPECTED[:2]))
    assert daily[1]["tokens"] == 3600 and daily[2]["unpriced_calls"] == 1

    later = await asyncio.to_thread(cost_rollup, store, ["model"], T0 + timedelta(hours=2), "default")
    assert [(r["model"], r["calls"]) for r in later] == [("sim-canary", 1)]
    with pytest.raises(UnknownDimension):
        cost_rollup(store, ["tenant; DROP TABLE cost_ledger"])


async def test_same_delivery_twice_gives_one_row_per_event(
    context: ServiceContext, store: Store, run_services
) -> None:
    handlers = CostHandlers(context, load_price_book(""))
    events = _batch()
    delivery = Delivery(subject="x", msg_id="b-same", headers={}, deliveries=1, stream_seq=7)
    await handlers.on_inference(events, delivery)
    await handlers.on_inference(events, Delivery(subject="x", msg_id="b-same", headers={}, deliveries=2,
                                                 stream_seq=7))
    # The republished ledger fact and cost records carry the same Nats-Msg-Ids, so JetStream kept one of each.
    info = await context.bus.js.stream_info(context.bus.subjects.streams["cost"].name)
    assert info.state.messages == 3
    facts = await context.bus.js.stream_info(context.bus.subjects.streams["ledger"].name)
    assert facts.state.messages == 1  # kept for the sink's durable (interest), which has not read it yet
    svcs = await run_services("sink")
    await sink_stored(svcs["sink"].handlers, cost_ledger=1)
    assert store.scalar("SELECT count() FROM cost_ledger") == 4
    assert store.scalar("SELECT uniqExact(event_id) FROM cost_ledger") == 4


async def test_an_event_resent_under_other_message_ids_is_stored_and_billed_once(
    run_services, bus: Bus, store: Store
) -> None:
    """Exactly once per event id: re-sent in another array, twice in one array, or alone, an event is
    one row in inference_events and one entry (one cost) in the ledger."""
    svcs = await run_services("sink", "cost")
    events = _batch()
    subject = bus.subjects.inference("shop")
    await bus.publish(subject, events[:3], msg_id="first")
    await bus.publish(bus.subjects.inference("shop", "acme"), events[3], msg_id="first-acme")
    await bus.publish(subject, [events[1], events[0]], msg_id="resent-by-the-sdk")
    await bus.publish(subject, [events[2], events[2]], msg_id="twice-in-one-array")
    await bus.publish(bus.subjects.inference("shop", "acme"), events[3], msg_id="alone")
    await svcs["sink"].handlers.events.wait_for(9)
    await svcs["cost"].handlers.events.wait_for(9)
    await sink_stored(svcs["sink"].handlers, cost_ledger=4)  # one ledger fact per message
    assert store.scalar("SELECT count() FROM inference_events") == 4
    assert store.scalar("SELECT uniqExact(id) FROM inference_events") == 4
    assert store.scalar("SELECT count() FROM cost_ledger") == 4
    assert store.scalar("SELECT sum(cost_usd) FROM cost_ledger") == pytest.approx(sum(EXPECTED))
    rollup = await asyncio.to_thread(cost_rollup, store, ["tenant"])
    assert sum(r["calls"] for r in rollup) == 4
    assert sum(r["cost_usd"] for r in rollup) == pytest.approx(sum(EXPECTED))


async def test_another_apps_event_under_the_same_id_hides_nothing(run_services, bus: Bus, store: Store) -> None:
    """Found by a probe: app `shop` sent, first, an event under the id `support`'s next event would have (same
    tenant); support's event (2M gpt-4o tokens, $12.50) was then taken for its duplicate: not stored, not billed,
    no dead letter. Another app's event under the same id is another event."""
    svcs = await run_services("sink", "cost")
    mine = _batch()[0]
    theirs = msgspec.structs.replace(mine, app="support", input_tokens=1_000_000, output_tokens=1_000_000)
    await bus.publish(bus.subjects.inference("shop"), [mine])
    await bus.publish(bus.subjects.inference("support"), [theirs])
    await svcs["sink"].handlers.events.wait_for(2)
    await svcs["cost"].handlers.events.wait_for(2)
    await sink_stored(svcs["sink"].handlers, cost_ledger=2)
    assert store.rows("SELECT app, input_tokens FROM inference_events ORDER BY app") == [
        {"app": "shop", "input_tokens": mine.input_tokens}, {"app": "support", "input_tokens": 1_000_000}]
    billed = store.rows("SELECT app, cost_usd FROM cost_ledger ORDER BY app")
    assert [r["app"] for r in billed] == ["shop", "support"] and billed[1]["cost_usd"] > billed[0]["cost_usd"]


async def test_a_bad_message_is_lettered_once_by_the_sink_and_costs_the_others_a_decode(
        run_services, bus: Bus, store: Store) -> None:
    # Sink, cost and drift each wrote a scrubbed, base64 copy of every undecodable message (~0.3 s and 340 kB a
    # 256 KiB message): garbage kept billing and drift behind without bound, and filled the DLQ four times over.
    svcs = await run_services("sink", "cost", "drift")
    garbage = b"\x00" + bytes(range(256)) * 1024
    await bus.publish(bus.subjects.inference("shop"), garbage, msg_id="garbage")
    await bus.publish(bus.subjects.inference("shop"), b"{not json", msg_id="bad-1")
    good = InferenceEvent(app="shop", model="sim-good", input_tokens=100)
    await bus.publish(bus.subjects.inference("shop"), good)
    # Ordered consumers: past the good event, past the bad messages before it.
    await svcs["cost"].handlers.events.wait_for(1)
    await svcs["drift"].handlers.events.wait_for(1)
    await sink_stored(svcs["sink"].handlers, cost_ledger=1)
    await svcs["sink"].handlers.dead_letters.wait_for(2)
    assert store.scalar("SELECT event_id FROM cost_ledger") == good.id
    # Letters the DLQ ever took (it keeps one only until the sink has stored it: interest retention).
    assert (await bus.js.stream_info(bus.subjects.streams["dlq"].name)).state.last_seq == 2
    letters = store.rows("SELECT origin, reason FROM dead_letters")
    assert letters == [{"origin": "sink", "reason": "invalid event"}] * 2


async def test_a_message_of_5000_events_is_billed_in_ledgers_that_fit_a_bus_message(
        run_services, bus: Bus, store: Store) -> None:
    # The limits allow 5,000 events a message; its one ledger (an entry is ~2.5x its event) was over NATS'
    # max_payload, retried as if NATS were down, then dead-lettered: stored, never billed.
    svcs = await run_services("sink", "cost")
    now = datetime.now(UTC).isoformat()
    body = msgspec.json.encode([{"type": "lockgate.inference", "app": "shop", "id": f"big-{i}", "time": now,
                                 "model": "sim-good", "input_tokens": 1000, "output_tokens": 1000}
                                for i in range(5000)])
    assert len(body) < 1_000_000
    await bus.publish(bus.subjects.inference("shop"), body, msg_id="big")
    await svcs["cost"].handlers.events.wait_for(5000)
    await sink_stored(svcs["sink"].handlers, cost_ledger=2)
    assert store.scalar("SELECT count() FROM cost_ledger") == 5000
    assert store.scalar("SELECT uniqExact(event_id) FROM cost_ledger") == 5000
    assert store.scalar("SELECT count() FROM dead_letters") == 0
