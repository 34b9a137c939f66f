"""The sink on real NATS and chDB: rows land once, whatever the redelivery or republishing; dead letters are
queryable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import nats
import pytest

from lockgate.bus import Bus, Delivery
from lockgate.codec import Codec, encode
from lockgate.contracts import (
    CostEntry,
    CostLedger,
    DriftReport,
    FeatureDrift,
    InferenceEvent,
    InferenceScored,
    Score,
    SpanBatch,
    SpanRecord,
)
from lockgate.server.registry import ServiceSet
from lockgate.server.service import ServiceContext
from lockgate.store import Store
from lockgate.subjects import Subjects
from lockgate.telemetry import Telemetry
from tests.helpers import metric_points

pytestmark = pytest.mark.timeout(90)
NOW = datetime(2026, 1, 2, tzinfo=UTC)


def _events(n: int, app: str = "shop") -> list[InferenceEvent]:
    return [
        InferenceEvent(app=app, deployment="web", model="sim-good", input_tokens=10 + i, output_tokens=i,
                       prompt=f"question {i} my key is sk-abcdefghijklmnopqrstuvwx", response=f"answer {i}")
        for i in range(n)
    ]


async def test_batches_land_once_with_secrets_scrubbed(run_services, bus: Bus, store: Store) -> None:
    svcs = await run_services("sink")
    events = _events(300)
    for chunk in (events[:100], events[100:]):
        await bus.publish(bus.subjects.inference("shop"), chunk)
        await bus.publish(bus.subjects.inference("shop"), chunk)  # same Nats-Msg-Id: JetStream drops it
    await svcs["sink"].handlers.events.wait_for(300)
    assert store.scalar("SELECT count() FROM inference_events") == 300
    assert store.scalar("SELECT uniqExact(id) FROM inference_events") == 300
    prompts = [r["prompt"] for r in store.rows("SELECT prompt FROM inference_events LIMIT 5")]
    assert all("sk-" not in p and "[REDACTED]" in p for p in prompts)


async def test_writer_killed_before_ack_gives_one_row_per_event(
    context: ServiceContext, bus: Bus, store: Store, settings, metric_reader
) -> None:
    """Insert a batch, die before the ack, restart: the redelivered messages arrive regrouped with a
    new one, are recognised by their events' ids and skipped; every event is stored exactly once."""
    first = ServiceSet(context, ["sink"])
    await first.start()  # creates the durable consumer
    await first.stop()
    await bus.stop_consumers()

    first_batch, second_batch, late = _events(50), _events(30), _events(20)
    await bus.publish(bus.subjects.inference("shop"), first_batch)
    await bus.publish(bus.subjects.inference("shop"), second_batch)

    # The "writer" that dies: fetch two messages from the sink's durable consumer, insert them
    # together in one batch, never ack.
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(bus.subjects.durable("sink", "inference"),
                                       stream=bus.subjects.streams["inference"].name)
    msgs = await sub.fetch(2, timeout=5)
    assert len(msgs) == 2
    items = [(Codec(list[InferenceEvent]).decode(m.data),
              Delivery(subject=m.subject, msg_id=m.headers["Nats-Msg-Id"], headers=dict(m.headers), deliveries=1,
                       stream_seq=m.metadata.sequence.stream)) for m in msgs]
    await first["sink"].handlers.on_inference(items)
    assert store.scalar("SELECT count() FROM inference_events") == 80
    await nc.close()  # killed: both messages stay unacknowledged

    # Meanwhile a new message arrives, so the redelivery is grouped differently than the first insert.
    await bus.publish(bus.subjects.inference("shop"), late)

    # Restart: a fresh process-equivalent (new bus, same consumer) gets the redelivery.
    bus2 = Bus(settings.nats_url, Subjects(settings.prefix), name="restarted")
    await bus2.connect()
    ctx2 = ServiceContext(bus=bus2, store=store, telemetry=Telemetry(), settings=settings)
    second = ServiceSet(ctx2, ["sink"])
    await second.start()
    try:
        await second["sink"].handlers.events.wait_for(100, timeout_s=30)
        info = await bus2.js.consumer_info(bus.subjects.streams["inference"].name,
                                           bus.subjects.durable("sink", "inference"))
        # more deliveries than stream messages: the first two really were redelivered
        assert info.delivered.consumer_seq > info.delivered.stream_seq
        assert store.scalar("SELECT count() FROM inference_events") == 100
        assert store.scalar("SELECT uniqExact(id) FROM inference_events") == 100
        assert second["sink"].handlers.skipped_redeliveries == 2
        assert metric_points(metric_reader, "lockgate.redeliveries.skipped") == {(("service", "sink"),): 2}
    finally:
        await second.stop()
        await bus2.close()


async def test_dead_letters_are_queryable(run_services, bus: Bus, store: Store) -> None:
    svcs = await run_services("sink")
    await bus.publish(bus.subjects.inference("shop"), b"\x00not json", msg_id="poison-1")
    await bus.publish(bus.subjects.inference("shop"), _events(3))
    await svcs["sink"].handlers.events.wait_for(3)
    await svcs["sink"].handlers.dead_letters.wait_for(1)
    row = store.rows("SELECT origin, reason, error, subject FROM dead_letters")[0]
    assert row["origin"] == "sink"
    assert row["reason"] == "invalid event"
    assert "malformed" in row["error"]
    assert row["subject"] == bus.subjects.inference("shop")


async def test_facts_republished_under_other_ids_are_stored_once(run_services, bus: Bus, store: Store) -> None:
    """Low-volume facts are looked up by key: the same fact in two messages, in one batch or two, is one row set."""
    svcs = await run_services("sink")
    sink = svcs["sink"].handlers
    report = DriftReport(deployment="web", window_start=NOW, window_end=NOW, reference_n=1, current_n=1, drifted=True,
                         features=[FeatureDrift(feature=f, psi=0.3, ks_stat=0.5, ks_pvalue=0.01, reference_mean=1.0,
                                                current_mean=2.0, drifted=True) for f in ("a", "b", "c")])
    for msg_id in ("first", "second"):
        await bus.publish(bus.subjects.drift("web"), report, msg_id=msg_id)
    await sink.progress("drift_reports").wait_for(2)
    await bus.publish(bus.subjects.drift("web"), report, msg_id="third")
    await sink.progress("drift_reports").wait_for(3)
    assert store.scalar("SELECT count() FROM drift_reports") == 3  # one report of three features


async def test_a_redelivered_ledger_regrouped_with_a_new_one_is_stored_once(context: ServiceContext, store: Store) -> None:
    """A ledger entry is stored once per event id, however its facts are regrouped."""
    from lockgate.services.sink.handlers import SinkHandlers
    from lockgate.telemetry import Telemetry

    sink = SinkHandlers(context, Telemetry().tracer("test"))

    def ledger(n: int, start: int) -> CostLedger:
        return CostLedger(price_book="pb", entries=[CostEntry(event_id=f"e{i}", time=NOW, tenant="t", app="a")
                                                    for i in range(start, start + n)])

    def delivery(msg_id: str, deliveries: int) -> Delivery:
        return Delivery(subject="s", msg_id=msg_id, headers={}, deliveries=deliveries, stream_seq=1)

    writer = sink.facts["cost_ledger"]
    first = ledger(5, 0)
    await writer.on_facts([(first, delivery("m1", 1))])
    await writer.on_facts([(first, delivery("m1", 2)), (ledger(3, 5), delivery("m2", 1))])
    assert store.scalar("SELECT count() FROM cost_ledger") == 8
    assert store.scalar("SELECT uniqExact(event_id) FROM cost_ledger") == 8


async def test_an_event_stored_by_an_earlier_process_and_resent_is_stored_once(
    context: ServiceContext, store: Store
) -> None:
    """A writer remembers the events it stored, so most need no lookup; what an earlier process stored
    (here: another Store on the same database) is still found in the store."""
    from lockgate.services.sink.handlers import SinkHandlers
    from lockgate.store import open_store

    def delivery(msg_id: str) -> Delivery:
        return Delivery(subject="s", msg_id=msg_id, headers={}, deliveries=1, stream_seq=1)

    events = _events(10)
    await SinkHandlers(context, Telemetry().tracer("test")).on_inference([(events, delivery("before-restart"))])
    later = open_store(store.url, store.database)  # the restarted process's own store
    restarted = ServiceContext(bus=context.bus, store=later, telemetry=Telemetry(), settings=context.settings)
    sink = SinkHandlers(restarted, Telemetry().tracer("test"))
    await sink.on_inference([([*events[5:], *_events(3)], delivery("after-restart"))])
    await sink.on_inference([(events[:2], delivery("once-more"))])  # known to the store, not to this writer
    assert store.scalar("SELECT count() FROM inference_events") == 13
    assert store.scalar("SELECT uniqExact(id) FROM inference_events") == 13


async def test_an_event_resent_with_another_time_after_a_restart_is_stored_once(
    context: ServiceContext, store: Store
) -> None:
    """A producer re-sends events with other times (built again under their ids) to a restarted sink, which never
    saw them: found by id in the table of stored keys, whatever their times. Before, the lookup was bounded to the
    batch's times and the restarted writer vouched for rows later than the table's latest: stored twice."""
    from lockgate.services.sink.handlers import SinkHandlers
    from lockgate.store import open_store

    def delivery(msg_id: str) -> Delivery:
        return Delivery(subject="s", msg_id=msg_id, headers={}, deliveries=1, stream_seq=1)

    events = _events(4)
    await SinkHandlers(context, Telemetry().tracer("test")).on_inference([(events, delivery("first"))])
    later = open_store(store.url, store.database)
    restarted = ServiceContext(bus=context.bus, store=later, telemetry=Telemetry(), settings=context.settings)
    sink = SinkHandlers(restarted, Telemetry().tracer("test"))
    again = [msgspec.structs.replace(e, time=e.time + timedelta(minutes=5)) for e in events[:2]]
    await sink.on_inference([([*again, *_events(1)], delivery("again"))])
    earlier = [msgspec.structs.replace(e, time=e.time - timedelta(minutes=5)) for e in events[2:]]
    await sink.on_inference([(earlier, delivery("once-more"))])
    assert store.scalar("SELECT count() FROM inference_events") == 5
    assert store.scalar("SELECT uniqExact(id) FROM inference_events") == 5


async def test_a_score_of_an_event_resent_with_another_time_is_stored_once(context: ServiceContext, store: Store) -> None:
    """The evaluator scores a re-sent event again, with the event's new time: a restarted sink finds the (event,
    scorer) in the table of stored score keys, whatever the time. Before, the lookup read the batch's times only."""
    from lockgate.services.sink.handlers import SinkHandlers
    from lockgate.store import open_store

    def scored(event_id: str, at: datetime) -> InferenceScored:
        return InferenceScored(event_id=event_id, app="shop", deployment="web", time=at,
                               results=[Score(scorer="pii_free", value=1.0), Score(scorer="judge", value=0.5)])

    first = [scored(f"ev-{i}", datetime.now(UTC)) for i in range(3)]
    sink = SinkHandlers(context, Telemetry().tracer("test"))
    await sink.facts["inference_scores"].on_facts([(s, Delivery(subject="s", msg_id=s.id, headers={}, deliveries=1,
                                                                stream_seq=1)) for s in first])
    later = open_store(store.url, store.database)
    restarted = SinkHandlers(ServiceContext(bus=context.bus, store=later, telemetry=Telemetry(),
                                            settings=context.settings), Telemetry().tracer("test"))
    again = [scored(s.event_id, s.time + timedelta(minutes=5)) for s in first[:2]]
    await restarted.facts["inference_scores"].on_facts([
        (s, Delivery(subject="s", msg_id=s.id, headers={}, deliveries=1, stream_seq=2)) for s in again])
    assert store.scalar("SELECT count() FROM inference_scores") == 6


async def test_an_event_the_sdk_builds_again_under_its_id_is_stored_and_billed_once(
    run_services, settings, store: Store
) -> None:
    """An application emits an event again under its own id (its retry of a request it logged): the SDK times each
    build, so the two differ in time and message. One row, one ledger entry, and the new neighbour stored."""
    from lockgate.client import Client

    svcs = await run_services("sink", "cost")
    async with Client(settings.nats_url, prefix=settings.prefix, app="shop") as client:
        client.emit(id="order-42-answer", deployment="web", model="sim-good", input_tokens=10)
        await client.flush()
        await svcs["sink"].handlers.events.wait_for(1)
        client.emit(id="order-42-answer", deployment="web", model="sim-good", input_tokens=10)
        client.emit(deployment="web", model="sim-good")
        await client.flush()
    await svcs["sink"].handlers.events.wait_for(3)
    assert store.scalar("SELECT count() FROM inference_events") == 2
    assert store.scalar("SELECT count() FROM inference_events WHERE id = 'order-42-answer'") == 1
    await svcs["sink"].handlers.progress("cost_ledger").wait_for(2)  # a ledger for each of the two messages
    assert store.scalar("SELECT count() FROM cost_ledger") == 2
    assert store.scalar("SELECT count() FROM cost_ledger WHERE event_id = 'order-42-answer'") == 1


async def test_an_applications_event_is_stored_as_its_own_never_as_one_the_router_served(
    run_services, settings, bus: Bus, store: Store
) -> None:
    """An application's event names no arm a router chose, nor lockgate as its maker, whatever it says: before, an
    SDK emit with neither stored source `lockgate` and variant `stable`, as if the router had served it, and one
    naming `lockgate-router` was stored so. A router's event (on its own subject) keeps both."""
    from lockgate.client import Client

    svcs = await run_services("sink")
    async with Client(settings.nats_url, prefix=settings.prefix, app="shop") as client:
        client.emit(id="plain", deployment="web", model="m")
        client.emit(id="own-words", deployment="web", model="m", variant="blue", source="shop-api")
        client.emit(id="posing", deployment="web", model="m", variant="canary", source="lockgate-router")
        await client.flush()
    # An SDK of before this fix wrote the envelope's default, `lockgate`, and `stable` on every event.
    older = InferenceEvent(id="older-sdk", app="shop", deployment="web", source="lockgate", variant="stable")
    await bus.publish(bus.subjects.inference("shop"), [older])
    router = InferenceEvent(id="served", app="shop", deployment="web", source="lockgate-router", variant="canary")
    await bus.publish(bus.subjects.served("shop"), [router])
    await svcs["sink"].handlers.events.wait_for(5)
    rows = {r["id"]: (r["source"], r["variant"], r["served"])
            for r in store.rows("SELECT id, source, variant, served FROM inference_events")}
    assert rows == {"plain": ("application", "", False), "own-words": ("shop-api", "blue", False),
                    "posing": ("application", "canary", False), "older-sdk": ("application", "stable", False),
                    "served": ("lockgate-router", "canary", True)}, rows


async def test_an_event_resent_under_another_message_id_later_is_stored_once(
    run_services, bus: Bus, store: Store
) -> None:
    """Beyond JetStream's duplicate window (another message id) and in another insert, the sink finds
    the stored event by id; its new neighbours are stored."""
    svcs = await run_services("sink")
    events = _events(10)
    await bus.publish(bus.subjects.inference("shop"), events, msg_id="sdk-try-1")
    await svcs["sink"].handlers.events.wait_for(10)
    await bus.publish(bus.subjects.inference("shop"), [*events[5:], *_events(3)], msg_id="sdk-try-2")
    await svcs["sink"].handlers.events.wait_for(18)
    assert store.scalar("SELECT count() FROM inference_events") == 13
    assert store.scalar("SELECT uniqExact(id) FROM inference_events") == 13


async def test_a_span_the_store_refuses_is_dead_lettered_alone(run_services, bus: Bus, store: Store) -> None:
    # One span event at 2**64-1 ns (year 2554, past DateTime64(9)) failed the insert of its whole SpanBatch,
    # which was dead-lettered: every valid span published with it was lost. (A batch published before the
    # OTLP receiver refused such spans, or by another producer.)
    now = datetime.now(UTC)

    def span(n: int, event_at: datetime) -> SpanRecord:
        return SpanRecord(timestamp=now, trace_id="0c" * 16, span_id=f"{n:016x}", parent_span_id="", trace_state="",
                          name=f"span {n}", kind="Internal", service="batch", resource={}, scope_name="",
                          scope_version="", attributes={}, duration_ns=1000, status_code="Unset", status_message="",
                          events=[(event_at, "retry", {})])

    endless = datetime.fromtimestamp((2**64 - 1) / 1e9, UTC)
    spans = [span(n, endless if n == 3 else now) for n in range(6)]
    svcs = await run_services("sink")
    sink = svcs["sink"].handlers
    await bus.publish(bus.subjects.spans, encode(SpanBatch(id="poisoned-batch", spans=spans)), msg_id="poisoned-batch")
    await sink.dead_letters.wait_for(1)  # sent once the others were stored
    assert sorted(r["SpanName"] for r in store.rows("SELECT SpanName FROM otel_traces")) == [
        f"span {n}" for n in (0, 1, 2, 4, 5)]
    await sink.spans.wait_for(6)
    letter = store.rows("SELECT origin, reason, error FROM dead_letters")
    assert len(letter) == 1 and (letter[0]["origin"], letter[0]["reason"]) == ("sink-spans", "rejected")
    assert f"span {3:016x}: insert into otel_traces refused the rows" in letter[0]["error"]
    assert "Events.Timestamp" in letter[0]["error"]


async def test_a_span_is_stored_once_per_sender_whichever_batches_carry_it(run_services, bus: Bus,
                                                                           store: Store) -> None:
    # Spans were inserted under their message's id only: a span in two batches (re-batched by a Collector, or
    # published twice by another producer) or twice in one batch had a row each time.
    now = datetime.now(UTC)

    def span(n: int, tenant: str = "") -> SpanRecord:
        return SpanRecord(timestamp=now + timedelta(microseconds=n), trace_id="0d" * 16, span_id=f"{n:016x}",
                          parent_span_id="", trace_state="", name=f"span {n}", kind="Internal", service="batch",
                          resource={"lockgate.tenant": tenant} if tenant else {}, scope_name="", scope_version="",
                          attributes={}, duration_ns=1000, status_code="Unset", status_message="")

    svcs = await run_services("sink")
    sink = svcs["sink"].handlers
    batches = {"x": [span(1), span(2)], "y": [span(2), span(3)], "z": [span(4), span(4)],
               # A tenant's sender naming lockgate's own span's ids is another span (the receiver stamps its tenant)
               "t": [span(1, "acme"), span(1, "acme")]}
    for msg_id, spans in batches.items():
        await bus.publish(bus.subjects.spans, encode(SpanBatch(id=msg_id, spans=spans)), msg_id=msg_id)
    await sink.spans.wait_for(8)
    rows = store.rows("SELECT ResourceAttributes['lockgate.tenant'] AS tenant, SpanId, count() AS n FROM otel_traces "
                      "GROUP BY tenant, SpanId ORDER BY tenant, SpanId")
    assert [(r["tenant"], r["SpanId"], r["n"]) for r in rows] == [
        ("", f"{n:016x}", 1) for n in (1, 2, 3, 4)] + [("acme", f"{1:016x}", 1)]
