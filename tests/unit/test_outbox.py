"""The one publish routine and the Outbox: grouping, chunking, deterministic msg ids, traceparent,
scrubbing, retry of transient failures, give-up, and counting (sent after the ack only).

The JetStream double stands in only for the transport call (`js.publish`); the end-to-end paths
through a real nats-server are in tests/integration/test_client.py, test_router.py and test_grpc.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lockgate.codec import Codec
from lockgate.contracts import InferenceEvent
from lockgate.encoded import Encoded
from lockgate.errors import PublishFailed
from lockgate.ids import batch_id
from lockgate.outbox import Outbox, chunk_by_sender, chunked, encode_event, publish_events
from lockgate.retry import RetryPolicy
from lockgate.subjects import Subjects

pytestmark = pytest.mark.timeout(30)

SUBJECTS = Subjects("t")
NO_WAIT = RetryPolicy(attempts=3, initial_s=0, max_s=0)  # retries without backoff: these tests wait on nothing
decode = Codec(list[InferenceEvent]).decode


class FakeJetStream:
    """Records each publish; `fail` maps an app to the exceptions its next publishes raise, in
    order; with `hold` set, each publish waits for it, like an ack that has not come back yet."""

    def __init__(self, fail: dict[str, list[BaseException]] | None = None) -> None:
        self.fail = {SUBJECTS.inference(app): list(excs) for app, excs in (fail or {}).items()}
        self.calls: list[tuple[str, bytes, dict[str, str]]] = []
        self.acked: list[tuple[str, list[InferenceEvent], dict[str, str]]] = []
        self.hold: asyncio.Event | None = None
        self.waiting = 0
        self.arrived = asyncio.Event()

    async def publish(self, subject: str, payload: bytes, *, headers: dict[str, str], timeout: float) -> object:
        self.calls.append((subject, payload, dict(headers)))
        if self.fail.get(subject):
            raise self.fail[subject].pop(0)
        if self.hold is not None:
            self.waiting += 1
            self.arrived.set()
            await self.hold.wait()
        self.acked.append((subject, decode(payload), dict(headers)))
        return object()

    def events(self) -> list[InferenceEvent]:
        return [e for _, events, _ in self.acked for e in events]


def event(app: str = "a", n: int = 0, **kw: Any) -> Encoded:
    return encode_event(InferenceEvent(app=app, trace_id=f"{n + 1:032x}", span_id=f"{n + 1:016x}", input_tokens=n, **kw))


@pytest.mark.parametrize(
    ("apps", "batch_size", "expected"),
    [
        ("abababa", 3, [("a", 3), ("a", 1), ("b", 3)]),
        ("aaaa", 2, [("a", 2), ("a", 2)]),
        ("abc", 500, [("a", 1), ("b", 1), ("c", 1)]),
        ("", 500, []),
    ],
)
def test_chunk_by_sender_groups_then_caps_each_chunk(apps: str, batch_size: int, expected: list) -> None:
    events = [event(app, i) for i, app in enumerate(apps)]
    chunks = chunk_by_sender(events, batch_size)
    assert [(c[0].app, len(c)) for c in chunks] == expected
    assert all(len({e.app for e in c}) == 1 for c in chunks)
    for app in set(apps):  # each app's events keep their order across its chunks
        assert [e for c in chunks for e in c if e.app == app] == [e for e in events if e.app == app]


def test_chunk_by_sender_never_mixes_tenants_of_one_app() -> None:
    # Each chunk goes out on its sender's subject (`lg.inference.<tenant>.<app>`), which consumers hold it to.
    events = [event("a", 0, tenant="t1"), event("a", 1, tenant="t2"), event("a", 2, tenant="t1")]
    chunks = chunk_by_sender(events)
    ids = [e.id for e in events]
    assert [[(e.tenant, ids.index(e.id)) for e in c] for c in chunks] == [[("t1", 0), ("t1", 2)], [("t2", 1)]]


async def test_one_message_per_app_and_chunk_with_the_chunks_batch_id() -> None:
    js = FakeJetStream()
    events = [event("a" if i % 2 == 0 else "b", i) for i in range(7)]
    assert await publish_events(js, SUBJECTS, events, batch_size=3, retry=NO_WAIT) == 7
    assert sorted((s, len(ev)) for s, ev, _ in js.acked) == [
        (SUBJECTS.inference("a"), 1), (SUBJECTS.inference("a"), 3), (SUBJECTS.inference("b"), 3)
    ]
    assert all(h["Nats-Msg-Id"] == batch_id(ev) for _, ev, h in js.acked)
    assert sorted(e.id for e in js.events()) == sorted(e.id for e in events)


async def test_the_same_events_always_give_the_same_msg_ids() -> None:
    events = [event("a", i) for i in range(5)] + [event("b", 9)]
    first, again = FakeJetStream(), FakeJetStream()
    await publish_events(first, SUBJECTS, events, batch_size=2, retry=NO_WAIT)
    await publish_events(again, SUBJECTS, list(events), batch_size=2, retry=NO_WAIT)
    ids = [h["Nats-Msg-Id"] for _, _, h in first.acked]
    assert ids == [h["Nats-Msg-Id"] for _, _, h in again.acked]
    assert len(set(ids)) == len(ids) == 4  # and different chunks never share one


async def test_traceparent_from_the_caller_else_from_the_chunks_first_event() -> None:
    js = FakeJetStream()
    await publish_events(js, SUBJECTS, [event("a", 0), event("a", 1)], retry=NO_WAIT)
    assert js.acked[0][2]["traceparent"] == f"00-{1:032x}-{1:016x}-01"

    js = FakeJetStream()
    given = {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}
    await publish_events(js, SUBJECTS, [event("a"), event("b")], headers=given, retry=NO_WAIT)
    assert [h["traceparent"] for _, _, h in js.acked] == [given["traceparent"]] * 2

    js = FakeJetStream()
    await publish_events(js, SUBJECTS, [encode_event(InferenceEvent(app="a"))], retry=NO_WAIT)
    assert "traceparent" not in js.acked[0][2]  # no trace known: no made-up header


async def test_secrets_are_scrubbed_before_the_bytes_leave() -> None:
    js = FakeJetStream()
    await publish_events(js, SUBJECTS, [event(prompt="key sk-abcdefghijklmnopqrstuvwx", response="ok")], retry=NO_WAIT)
    payload = js.calls[0][1].decode()
    assert "sk-abc" not in payload and "[REDACTED]" in payload


# NoStreamResponseError: what js.publish raises for "no responders", as while a cluster elects a stream's leader.
@pytest.mark.parametrize("then", [nats.errors.NoRespondersError(), nats.js.errors.NoStreamResponseError()])
async def test_a_transient_failure_is_retried_with_the_same_msg_id(then: Exception) -> None:
    js = FakeJetStream(fail={"a": [nats.errors.TimeoutError(), then]})
    events = [event("a", i) for i in range(4)]
    assert await publish_events(js, SUBJECTS, events, retry=NO_WAIT) == 4
    assert len(js.calls) == 3 and len(js.acked) == 1
    # Every attempt carries the same bytes and id, so an ack lost after a write is deduplicated.
    assert len({(payload, h["Nats-Msg-Id"]) for _, payload, h in js.calls}) == 1


async def test_given_up_chunks_are_reported_and_the_others_still_published() -> None:
    js = FakeJetStream(fail={"b": [nats.errors.NoRespondersError()] * 3})  # all three attempts for b
    events = [event("a", i) for i in range(3)] + [event("b", 5), event("b", 6)]
    with pytest.raises(PublishFailed, match="2 of 5") as raised:
        await publish_events(js, SUBJECTS, events, batch_size=2, retry=NO_WAIT)
    assert (raised.value.sent, raised.value.failed) == (3, 2)
    assert sorted(e.input_tokens for e in js.events()) == [0, 1, 2]


async def test_an_error_that_cannot_heal_is_not_retried() -> None:
    js = FakeJetStream(fail={"a": [nats.errors.MaxPayloadError()]})
    with pytest.raises(PublishFailed) as raised:
        await publish_events(js, SUBJECTS, [event()], retry=NO_WAIT)
    assert (raised.value.sent, raised.value.failed, len(js.calls)) == (0, 1, 1)


async def test_a_deadline_bounds_every_attempt_together_and_says_the_events_may_be_stored() -> None:
    # Before (probe p4): Ingest.Send waited 5 attempts of 5 s for an ack that did not come, answered after 25 s, past
    # its caller's deadline, and said the events were "counted as failed" though JetStream may have stored them.
    js = FakeJetStream()
    js.hold = asyncio.Event()  # no ack comes back
    with pytest.raises(PublishFailed) as raised:
        await publish_events(js, SUBJECTS, [event("a"), event("b")], retry=NO_WAIT, deadline_s=0.05)
    assert (raised.value.sent, raised.value.failed, len(js.calls)) == (0, 2, 2)  # the attempts in flight, not retried
    assert raised.value.message.startswith("JetStream did not acknowledge 2 of 2 inference events within 0.05 s: ")
    assert raised.value.message.endswith("they may have been stored all the same (sent, but not acknowledged): a "
                                         "retry of the same events (the same ids) is deduplicated")


async def test_a_deadline_that_does_not_come_changes_nothing() -> None:
    js = FakeJetStream(fail={"a": [nats.errors.TimeoutError()]})
    assert await publish_events(js, SUBJECTS, [event("a")], retry=NO_WAIT, deadline_s=30) == 1
    assert len(js.calls) == 2


def outbox(**kw: Any) -> Outbox:
    kw.setdefault("retry", NO_WAIT)
    kw.setdefault("max_age_s", 60)  # only size, flush() and close() flush in these tests
    return Outbox(SUBJECTS, **kw)


async def test_outbox_publishes_nothing_before_start_and_everything_on_flush() -> None:
    js = FakeJetStream()
    box = outbox(batch_size=2, max_age_s=0.001)
    for i in range(5):
        assert box.add(event("a", i))
    assert asyncio.all_tasks() == {asyncio.current_task()} and len(box) == 5  # buffered, no sender yet
    box.start(js)
    await box.flush()
    assert (box.sent, box.failed, box.dropped, len(box)) == (5, 0, 0, 0)
    assert [e.input_tokens for e in js.events()] == [0, 1, 2, 3, 4]
    await box.close()


async def test_outbox_counts_sent_only_after_the_ack_with_batches_in_flight() -> None:
    js = FakeJetStream()
    js.hold = asyncio.Event()
    box = outbox(batch_size=2, max_in_flight=3)
    box.start(js)
    for i in range(6):
        box.add(event("a", i))  # three full batches: all three publishes start
    while js.waiting < 3:
        js.arrived.clear()
        await asyncio.wait_for(js.arrived.wait(), 5)
    assert box.sent == 0  # written, but not acknowledged yet
    js.hold.set()
    await box.close()
    assert (box.sent, box.failed) == (6, 0)


async def test_outbox_counts_failed_after_retries_and_drops_when_refusing() -> None:
    js = FakeJetStream(fail={"a": [nats.errors.NoRespondersError()] * 3})
    box = outbox(capacity=3, overflow="drop_newest")
    box.start(js)
    assert [box.add(event("a", i)) for i in range(5)] == [True, True, True, False, False]
    await box.flush()
    assert (box.sent, box.failed, box.dropped) == (0, 3, 2)
    await box.close()
    assert not box.add(event()) and box.dropped == 3  # closed: refused and counted, never raised


UNTIL_BACK_NOW = RetryPolicy(attempts=None, initial_s=0, max_s=0)  # UNTIL_BACK without its backoff


async def test_an_outbox_retrying_until_back_rides_out_an_outage_of_any_length() -> None:
    # Twenty failed publishes in a row, four times what PUBLISH_RETRY allows: nothing given up.
    js = FakeJetStream(fail={"a": [nats.errors.NoRespondersError()] * 20})
    box = outbox(retry=UNTIL_BACK_NOW)
    box.start(js)
    events = [event("a", i) for i in range(3)]
    assert all(map(box.add, events))
    await box.flush()
    assert (box.sent, box.failed, box.dropped, len(js.calls)) == (3, 0, 0, 21)
    assert [e.id for e in js.events()] == [e.id for e in events]
    assert len({h["Nats-Msg-Id"] for _, _, h in js.calls}) == 1  # every retry the same message: deduplicated


async def test_close_gives_up_on_a_bus_still_away_after_its_timeout_and_counts_it_failed() -> None:
    js = FakeJetStream(fail={"a": [nats.errors.NoRespondersError()] * 10_000})
    box = outbox(retry=UNTIL_BACK_NOW, close_timeout_s=0)
    box.start(js)
    assert box.add(event("a", 1))
    await box.close()
    assert (box.sent, box.failed, box.dropped) == (0, 1, 0)


async def test_close_keeps_to_its_timeout_with_a_publish_in_flight_that_is_never_answered(
        caplog: pytest.LogCaptureFixture) -> None:
    # The publish in flight when close() began waited its own timeout past close_timeout_s (an SDK's close()
    # took 14.1 s with 10): close() now ends it at the deadline, and its events are counted unconfirmed (sent: they may be stored).
    js = FakeJetStream()
    js.hold = asyncio.Event()  # never set: no ack ever comes
    box = outbox(retry=UNTIL_BACK_NOW, close_timeout_s=0.2, max_age_s=0.001)
    box.start(js)
    assert box.add(event("a", 1))
    await asyncio.wait_for(js.arrived.wait(), 5)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(box.close(), 5)
    assert loop.time() - began < 1
    assert (box.sent, box.failed, box.unconfirmed, box.dropped) == (0, 0, 1, 0)
    # Sent, unanswered: it may be stored (a probe saw JetStream store such a batch), so not "not published".
    assert [r.getMessage() for r in caplog.records if "not confirmed" in r.getMessage()]
    assert not [r for r in caplog.records if "not published" in r.getMessage()]


async def test_outbox_drop_oldest_keeps_the_newest() -> None:
    js = FakeJetStream()
    box = outbox(capacity=2, overflow="drop_oldest")
    for i in range(5):
        assert box.add(event("a", i))
    box.start(js)
    await box.close()
    assert [e.input_tokens for e in js.events()] == [3, 4]
    assert (box.sent, box.dropped) == (2, 3)


def test_the_wire_is_a_json_list_of_events() -> None:
    # What the sink decodes: the routine's payload must stay a plain list of tagged events.
    js = FakeJetStream()
    asyncio.run(publish_events(js, SUBJECTS, [event()], retry=NO_WAIT))
    assert msgspec.json.decode(js.calls[0][1])[0]["type"] == "lockgate.inference"


async def test_outbox_reports_its_counts_to_the_callbacks_a_server_turns_into_metrics() -> None:
    sent: list[int] = []
    dropped: list[tuple[int, str]] = []
    js = FakeJetStream(fail={"b": [nats.errors.NoRespondersError()] * 3})
    box = outbox(capacity=3, overflow="drop_newest", on_sent=sent.append,
                 on_drop=lambda n, reason: dropped.append((n, reason)))
    box.start(js)
    assert [box.add(event(app, i)) for i, app in enumerate("aabaa")] == [True, True, True, False, False]
    await box.close()
    assert not box.add(event())
    assert sum(sent) == box.sent == 2
    assert sorted(dropped) == [(1, "closed"), (1, "overflow"), (1, "overflow"), (1, "publish_failed")]


def test_chunks_are_cut_by_bytes_so_large_events_never_exceed_the_message_limit() -> None:
    big = [event("a", i, prompt="x" * 1000) for i in range(10)]
    limit = 3 * len(big[0].data) + 2  # room for two events and most of a third
    chunks = chunk_by_sender(big, batch_size=500, batch_bytes=limit)
    assert [len(c) for c in chunks] == [2, 2, 2, 2, 2]
    assert [e for c in chunks for e in c] == big
    # An event larger than the limit still goes, alone: the server's refusal then names the size.
    assert [len(c) for c in chunk_by_sender([event("a", prompt="y" * 5000), event("a")], batch_bytes=limit)] == [1, 1]


@given(st.lists(st.integers(1, 120), max_size=60), st.integers(1, 8), st.integers(1, 300))
def test_chunked_keeps_order_and_each_chunk_within_both_limits(sizes: list[int], max_items: int,
                                                                 max_bytes: int) -> None:
    # One mechanism for every fact cut to fit a bus message (SDK batches, cost ledgers).
    chunks = chunked(list(range(len(sizes))), sizes, max_items=max_items, max_bytes=max_bytes)
    assert [i for c in chunks for i in c] == list(range(len(sizes)))
    for c in chunks:
        assert 1 <= len(c) <= max_items
        assert len(c) == 1 or sum(sizes[i] for i in c) <= max_bytes  # only an item over the limit goes alone


async def test_published_message_is_the_json_array_of_the_encoded_events() -> None:
    js = FakeJetStream()
    events = [event("a", i) for i in range(3)]
    await publish_events(js, SUBJECTS, events, retry=NO_WAIT)
    assert [e.id for e in js.events()] == [e.id for e in events]
    assert js.calls[0][1] == b"[" + b",".join(e.data for e in events) + b"]"


@pytest.mark.parametrize("n", [1, 2, 500])
async def test_a_chunk_of_any_size_is_the_json_array_of_its_events(n: int) -> None:
    js = FakeJetStream()
    events = [event("a", i) for i in range(n)]
    await publish_events(js, SUBJECTS, events, retry=NO_WAIT)
    assert js.calls[0][1] == b"[" + b",".join(e.data for e in events) + b"]"
    assert [e.data for e in events] == [encode_event(InferenceEvent(
        app="a", id=e.id, time=d.time, trace_id=d.trace_id, span_id=d.span_id, input_tokens=i)).data
        for i, (e, d) in enumerate(zip(events, js.events(), strict=True))]  # the events' own bytes untouched


def test_batch_id_is_the_hash_of_the_tenants_apps_and_ids_in_order() -> None:
    # The id a chunk had before must stay its id: JetStream deduplicates a retry by it.
    events = [event("a", i) for i in range(3)]
    h = hashlib.sha256()
    for e in events:
        h.update(f"{e.tenant}\x00{e.app}\x00{e.id}\x00".encode())
    assert batch_id(events) == "b-" + h.hexdigest()[:40]
    assert batch_id(events[::-1]) != batch_id(events)
    # Another tenant's or app's events under the same ids are another batch (JetStream dropped it as a duplicate).
    assert batch_id([msgspec.structs.replace(e, tenant="globex") for e in events]) != batch_id(events)
    assert batch_id([msgspec.structs.replace(e, app="support") for e in events]) != batch_id(events)


@pytest.mark.parametrize(("spare", "chunks"), [(0, 1), (-1, 2)])
def test_one_apps_events_are_one_chunk_up_to_the_byte_limit_exactly(spare: int, chunks: int) -> None:
    events = [event("a", i) for i in range(4)]
    limit = sum(len(e.data) + 1 for e in events) + spare
    out = chunk_by_sender(events, batch_size=4, batch_bytes=limit)
    assert len(out) == chunks and [e.id for c in out for e in c] == [e.id for e in events]
    assert len(chunk_by_sender(events, batch_size=3)) == 2
