"""The application SDK against a real nats-server: batching, exactly-once, flush, drops, decisions."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import pytest

from lockgate.bus import Bus
from lockgate.client import Client
from lockgate.codec import Codec, encode
from lockgate.config import Settings
from lockgate.contracts import GateDecided, InferenceEvent, RuleResult
from lockgate.errors import (
    BusUnavailable,
    ClientClosed,
    InvalidEvent,
    InvalidName,
    PublishFailed,
    SignatureError,
)
from lockgate.ids import batch_id
from lockgate.outbox import encode_event, publish_events
from lockgate.server.natsserver import NatsServer
from lockgate.server.service import ServiceContext
from lockgate.signing import Signer, publish_key, revoke_key, trust_file_path, trust_key
from lockgate.store import Store
from lockgate.subjects import Subjects, token
from tests.helpers import gate_decided

pytestmark = pytest.mark.timeout(60)

events_codec: Codec[list[InferenceEvent]] = Codec(list[InferenceEvent])


def client(settings: Settings, **kw: Any) -> Client:
    kw.setdefault("trust_file", str(trust_file_path(settings)))
    return Client(settings.nats_url, prefix=settings.prefix, app="shop", **kw)


async def stored(bus: Bus) -> tuple[list[InferenceEvent], list[Any]]:
    """Every event on the inference stream, and the messages that carried them."""
    stream = bus.subjects.streams["inference"].name
    total = (await bus.js.stream_info(stream)).state.messages
    sub = await bus.js.pull_subscribe(bus.subjects.inference_all, stream=stream)
    events: list[InferenceEvent] = []
    msgs: list[Any] = []
    while len(msgs) < total:
        for msg in await sub.fetch(min(total - len(msgs), 256), timeout=5):
            msgs.append(msg)
            events.extend(events_codec.decode(msg.data))
    await sub.unsubscribe()
    return events, msgs


async def test_ten_thousand_events_arrive_exactly_once_in_batches(bus: Bus, settings: Settings) -> None:
    async with client(settings, batch_size=500) as c:
        for i in range(10_000):
            assert c.emit(model="m", input_tokens=i)
            if i % 1000 == 999:
                await c.flush()  # let the sender run between bursts, as an app's requests would
    assert (c.sent, c.dropped, c.failed) == (10_000, 0, 0)
    events, msgs = await stored(bus)
    assert len(events) == 10_000
    assert sorted(e.input_tokens for e in events) == list(range(10_000))
    assert len({e.id for e in events}) == 10_000
    assert all(len(events_codec.decode(m.data)) <= 500 for m in msgs)
    assert all(m.headers["Nats-Msg-Id"] == batch_id(events_codec.decode(m.data)) for m in msgs)
    assert {m.subject for m in msgs} == {bus.subjects.inference("shop")}


async def test_secrets_are_scrubbed_before_events_leave_the_process(bus: Bus, settings: Settings) -> None:
    async with client(settings) as c:
        c.emit(prompt="token: ghp_abcdefghijklmnopqrstuvwxyz0123", response="plain answer")
    events, msgs = await stored(bus)
    assert "ghp_" not in msgs[0].data.decode()
    assert events[0].prompt == "token: [REDACTED]" and events[0].response == "plain answer"


async def test_close_publishes_what_the_timer_has_not(bus: Bus, settings: Settings) -> None:
    c = client(settings, flush_interval_s=60)  # the timer never fires during this test
    await c.start()
    for _ in range(7):
        c.emit(release="r1")
    await c.close()
    events, _ = await stored(bus)
    assert [e.release for e in events] == ["r1"] * 7
    assert c.sent == 7


async def test_flush_waits_for_acks_of_the_clients_own_subject(bus: Bus, settings: Settings) -> None:
    async with client(settings, flush_interval_s=60) as c:
        c.emit()
        # Another app's event would go on another subject (consumers hold events to theirs): refused at emit.
        with pytest.raises(InvalidEvent, match="this client sends tenant 'default', app 'shop'"):
            c.emit(InferenceEvent(app="search"))
        c.emit(InferenceEvent(app="shop"))
        await c.flush()
        assert (c.sent, c.dropped) == (2, 0)
        events, msgs = await stored(bus)
    assert [e.app for e in events] == ["shop", "shop"]
    assert {m.subject for m in msgs} == {bus.subjects.inference("shop")}


async def test_emit_fills_defaults_from_the_client_and_keeps_a_given_event(bus: Bus, settings: Settings) -> None:
    given = InferenceEvent(app="shop", tenant="acme", model="g")
    async with Client(settings.nats_url, prefix=settings.prefix, app="shop", tenant="acme") as c:
        assert c.emit(model="m", input_tokens=3)
        assert c.emit(given)
        with pytest.raises(InvalidEvent, match="tenant 't2', app 'shop'"):
            c.emit(InferenceEvent(app="shop", tenant="t2"))
    events, msgs = await stored(bus)
    built = next(e for e in events if e.model == "m")
    assert (built.app, built.tenant, built.input_tokens) == ("shop", "acme", 3)
    assert [e for e in events if e.model == "g"] == [given]
    assert {m.subject for m in msgs} == {bus.subjects.inference("shop", "acme")}


async def test_events_emitted_before_start_are_sent_once_started(bus: Bus, settings: Settings) -> None:
    c = client(settings, flush_interval_s=60)
    assert c.emit(release="early") and c.pending == 1
    async with c:
        await c.flush()
        assert (c.sent, c.pending) == (1, 0)
    events, _ = await stored(bus)
    assert [e.release for e in events] == ["early"]


async def test_an_invalid_event_is_refused_and_the_batch_around_it_is_stored_whole(
    run_services: Any, bus: Bus, settings: Settings, store: Store
) -> None:
    svcs = await run_services("sink")
    async with client(settings, flush_interval_s=60) as c:
        for i in range(10):
            c.emit(model="m", input_tokens=i)
        with pytest.raises(InvalidEvent, match=re.escape("$.input_tokens")):
            c.emit(model="m", input_tokens=-1)
        for i in range(10, 20):
            c.emit(model="m", input_tokens=i)
        await c.flush()
        assert (c.sent, c.failed, c.dropped) == (20, 0, 0)
    _, msgs = await stored(bus)
    assert len(msgs) == 1  # the twenty went out together, as one batch the sink must take whole
    await svcs["sink"].handlers.events.wait_for(20)
    tokens = [r["input_tokens"] for r in store.rows("SELECT input_tokens FROM inference_events ORDER BY 1")]
    assert tokens == list(range(20))


async def test_an_event_no_bus_message_can_carry_is_refused_at_emit_not_failed_later(
    bus: Bus, settings: Settings
) -> None:
    # It used to be accepted and then fail at every publish (MaxPayloadError), counted in `failed`.
    async with client(settings) as c:
        with pytest.raises(InvalidEvent, match="larger than 900000 bytes encoded"):
            c.emit(model="m", prompt="x" * 1_500_000)
        c.emit(model="m", prompt="the one beside it")
        await c.flush()
        assert (c.sent, c.failed, c.dropped) == (1, 0, 0)
    events, _ = await stored(bus)
    assert [e.prompt for e in events] == ["the one beside it"]


async def test_close_refuses_later_events_and_counts_them(bus: Bus, settings: Settings) -> None:
    async with client(settings) as c:
        c.emit()
    assert not c.emit() and (c.sent, c.dropped) == (1, 1)


async def test_a_full_buffer_drops_and_counts(bus: Bus, settings: Settings) -> None:
    async with client(settings, max_buffer=10, batch_size=1000, flush_interval_s=60) as c:
        accepted = [c.emit() for _ in range(15)]
        assert accepted == [True] * 10 + [False] * 5
        assert c.dropped == 5
    events, _ = await stored(bus)
    assert len(events) == 10


async def test_a_lost_ack_is_retried_without_a_duplicate(bus: Bus, settings: Settings) -> None:
    async with client(settings, flush_interval_s=60) as c:
        real = c._nc.request  # the SDK's publishes are JetStream requests (client._Publishes)
        calls = 0

        async def publish_then_lose_the_ack(*args: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            ack = await real(*args, **kw)
            if calls == 1:
                raise nats.errors.TimeoutError
            return ack

        c._nc.request = publish_then_lose_the_ack
        for _ in range(5):
            c.emit()
        await c.flush()
    assert calls == 2 and (c.sent, c.failed) == (5, 0)
    events, msgs = await stored(bus)
    assert (len(events), len(msgs)) == (5, 1)


async def test_publish_that_keeps_failing_is_counted_not_hung(settings: Settings, bus: Bus) -> None:
    async with client(settings, flush_interval_s=60, max_attempts=2) as c:

        async def unavailable(*args: Any, **kw: Any) -> Any:
            raise nats.errors.NoRespondersError

        c._nc.request = unavailable
        c.emit()
        c.emit()
        await c.flush()
        assert (c.sent, c.failed) == (0, 2)


SIGNER = Signer.generate()


@pytest.fixture(autouse=True)
def _trusted(settings: Settings) -> None:
    """SIGNER stands in for the gatekeeper: its key is in the trust file the SDK reads."""
    trust_key(trust_file_path(settings), SIGNER.public)


def gate(release: str, decision: str = "PASS") -> GateDecided:
    rule = RuleResult(rule="q", metric="accuracy", op=">=", threshold=0.8, observed=0.9, verdict="PASS")
    return SIGNER.sign(GateDecided(release=release, decision=decision, rules=[rule]))


async def test_decision_reads_the_gate_bucket(bus: Bus, settings: Settings) -> None:
    kv = await bus.kv(bus.subjects.kv_gates)
    d = gate("shop/v2")
    await kv.put(token(d.release), encode(d))
    async with client(settings) as c:
        assert await c.decision("shop/v2") == d
        assert await c.decision("unknown") is None


async def test_decisions_yields_current_then_new_for_a_prefix(
        bus: Bus, context: ServiceContext, settings: Settings) -> None:
    kv = await bus.kv(bus.subjects.kv_gates)
    first = gate("shop-1")
    await kv.put(token(first.release), encode(first))
    async with client(settings) as c:
        stream = c.decisions("shop-")
        assert await asyncio.wait_for(anext(stream), 10) == first  # the watch is live from here
        for d in (gate("search-1"), gate("shop-2", "BLOCK")):  # stored, then announced, as the gatekeeper does
            await gate_decided(context.bus, d, d.id)
        got = await asyncio.wait_for(anext(stream), 10)
        assert (got.release, got.decision) == ("shop-2", "BLOCK")
        await stream.aclose()


async def test_unsigned_or_tampered_decisions_are_not_acted_on(bus: Bus, settings: Settings) -> None:
    kv = await bus.kv(bus.subjects.kv_gates)
    tampered = msgspec.structs.replace(gate("shop-3", "BLOCK"), decision="PASS")
    await kv.put(token(tampered.release), encode(tampered))
    async with client(settings) as c:
        with pytest.raises(SignatureError, match="signature invalid"):
            await c.decision("shop-3")
        stream = c.decisions("shop-")
        good = gate("shop-4")
        await kv.put(token(good.release), encode(good))
        got = await asyncio.wait_for(anext(stream), 10)  # the tampered one is skipped, not yielded
        assert got == good and c.rejected_decisions == 1
        await stream.aclose()


async def test_names_that_used_to_share_a_key_get_their_own_decision(
    context: ServiceContext, settings: Settings
) -> None:
    # Issue 7: `shop.v3`, `shop_v3`, `shop v3` and `shop*v3` shared one KV key. Written through the
    # gatekeeper's own write path, each valid name now reads back its own decision.
    blocked, passed = gate("shop.v3", "BLOCK"), gate("shop_v3")
    await gate_decided(context.bus, blocked, "k-blocked")
    await gate_decided(context.bus, passed, "k-passed")
    async with client(settings) as c:
        assert await c.decision("shop.v3") == blocked
        assert await c.decision("shop_v3") == passed
        assert await c.decision("shop-v3") is None
        for bad in ("shop v3", "shop*v3"):
            with pytest.raises(InvalidName, match="no spaces or wildcards"):
                await c.decision(bad)
        # A signed decision copied under another release's key does not answer for that release.
        kv = await context.bus.kv(context.bus.subjects.kv_gates)
        await kv.put(token("shop-v3"), encode(passed))
        with pytest.raises(SignatureError, match="is for 'shop_v3'"):
            await c.decision("shop-v3")
        # The watch skips it too: only the two decisions under their own keys are yielded.
        stream = c.decisions("shop")
        got = [await asyncio.wait_for(anext(stream), 10) for _ in range(2)]
        assert sorted(d.release for d in got) == ["shop.v3", "shop_v3"]
        relisted = gate("shop-v4")
        await gate_decided(context.bus, relisted, "k-relisted")
        assert await asyncio.wait_for(anext(stream), 10) == relisted
        await stream.aclose()


async def test_decisions_by_unknown_or_revoked_keys_are_refused(bus: Bus, settings: Settings) -> None:
    # A key announced in the open keys bucket is not trusted; a revoked key no longer is.
    rogue, retired = Signer.generate(), Signer.generate()
    await publish_key(bus, rogue)
    trust_key(trust_file_path(settings), retired.public)
    kv = await bus.kv(bus.subjects.kv_gates)
    await kv.put(token("shop-5"), encode(rogue.sign(GateDecided(release="shop-5", decision="PASS", rules=[]))))
    await kv.put(token("shop-6"), encode(retired.sign(GateDecided(release="shop-6", decision="PASS", rules=[]))))
    async with client(settings) as c:
        assert (await c.decision("shop-6")).key_id == retired.key_id
        revoke_key(trust_file_path(settings), retired.key_id)
        with pytest.raises(SignatureError, match="unknown key id"):
            await c.decision("shop-5")
        with pytest.raises(SignatureError, match="revoked key id"):
            await c.decision("shop-6")
    # No trust roots at all: nothing is trusted, rather than whatever the bus offers.
    async with client(settings, trust_file=str(settings.home) + "/missing.json") as c:
        with pytest.raises(SignatureError, match="missing"):
            await c.decision("shop-5")


async def test_a_publish_no_retry_can_help_is_not_said_to_have_been_retried(bus: Bus) -> None:
    # A MaxPayloadError (a server whose max_payload is below the 900,000 bytes `emit` allows) was tried
    # once, and reported "after 5 attempts".
    subjects: list[str] = []

    class Counting:  # the real JetStream context, its publishes counted
        def publish(self, subject: str, *args: Any, **kw: Any) -> Any:
            subjects.append(subject)
            return bus.js.publish(subject, *args, **kw)

    big = encode_event(InferenceEvent(app="shop", prompt="x" * 1_200_000))  # unchecked: over this server's 1 MB
    with pytest.raises(PublishFailed) as err:
        await publish_events(Counting(), bus.subjects, [big])
    assert subjects == [bus.subjects.inference("shop")]
    message = err.value.message
    assert "MaxPayloadError" in message and "not retried" in message and "attempts" not in message, message


async def test_a_nats_urls_password_is_not_in_the_error_an_application_logs() -> None:
    # Before: `BusUnavailable: cannot reach NATS at nats://shopapp:<password>@...`, in the application's own log (a
    # password holding `/` is a URL nats-py cannot parse; a refused connection is retried, not raised).
    with pytest.raises(BusUnavailable) as caught:
        await Client("nats://shopapp:SDKPW/CANARY8@127.0.0.1:1", app="shop").start()
    assert "nats://shopapp:[REDACTED]@127.0.0.1:1" in str(caught.value) and "CANARY" not in str(caught.value)


async def test_start_twice_keeps_one_connection_and_start_after_close_is_refused(
        bus: Bus, settings: Settings) -> None:
    c = client(settings)
    await c.start()
    first = c._nc
    await c.start()  # used to open a second connection and leave the first open for good
    assert c._nc is first
    assert c.emit()
    await c.close()
    assert first.is_closed and c.sent == 1
    # Restarting a closed client connected again, then refused every event (its buffer is closed).
    with pytest.raises(ClientClosed, match="make a new one"):
        await c.start()
    with pytest.raises(ClientClosed):
        await c.flush()
    assert not c.emit() and c.dropped == 1
    await c.close()  # closing again does nothing


async def test_a_client_closed_without_starting_counts_its_events_dropped(bus: Bus, settings: Settings) -> None:
    # Its events were neither sent nor counted, and later emits were accepted (True) into a buffer that
    # nothing would ever publish; decision() after close raised nats-py's own error.
    c = client(settings)
    assert c.emit() and c.emit()
    await c.close()
    assert (c.sent, c.failed, c.dropped, c.pending) == (0, 0, 2, 0)
    assert not c.emit() and c.dropped == 3
    with pytest.raises(ClientClosed):
        await c.start()
    started = client(settings)
    await started.start()
    await started.close()
    with pytest.raises(ClientClosed, match="make a new one"):
        await started.decision("shop/v2")


async def test_close_while_the_bus_is_gone_counts_the_events_failed_and_does_not_raise(
        tmp_path: Path, settings: Settings) -> None:
    server = NatsServer(tmp_path / "js")
    await server.start()
    try:
        b = Bus(server.url, Subjects(settings.prefix), name="test")
        await b.connect()  # the streams
        await b.close()
        c = Client(server.url, prefix=settings.prefix, app="shop", max_attempts=1, flush_interval_s=60,
                   trust_file=str(trust_file_path(settings)))
        await c.start()
        assert c.emit()
        await c.flush()
        server.kill()
        for _ in range(3):
            assert c.emit()
        # nats-py buffered the publish made while disconnected and wrote it to the dead socket on close:
        # close() raised ConnectionResetError, after the events were counted failed.
        await c.close()
        assert (c.sent, c.failed, c.dropped) == (1, 3, 0)
        assert c._nc.is_closed
    finally:
        server.stop()
