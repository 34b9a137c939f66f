"""The gateway's relay under one application user's flood, on the embedded runtime with per-application users (as
`lockgate up` runs it): another tenant's events are relayed at once, and every message of the flood is answered,
relayed or refused as retryable, none dropped unanswered."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator

import nats
import pytest

from lockgate import credentials
from lockgate.client import Client
from lockgate.codec import encode
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.server.runtime import Runtime
from lockgate.services.gateway import relay as relay_module

pytestmark = pytest.mark.timeout(120)

FLOODER, VICTIM = ("evil", "x"), ("acme", "shop")


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    for tenant, app in (FLOODER, VICTIM):
        credentials.create_app(settings.home, tenant, app)  # before the start: the server loads them at once
    # No sink: what is measured is the relay, and nothing reads the stream meanwhile.
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["gateway"])
    await runtime.start()
    yield runtime
    await runtime.stop()


async def _connect(runtime: Runtime, tenant: str, app: str) -> nats.NATS:
    user = f"apps.{tenant}.{app}"
    found = await asyncio.to_thread(credentials.apps, runtime.settings.home)
    return await nats.connect(runtime.settings.nats_url, user=user, password=found[user]["password"],
                              allow_reconnect=False, connect_timeout=5, inbox_prefix=f"_INBOX.{user}")


class Flood:
    """Messages sent on one connection's `ingest` subject without waiting for their answers, each with a reply
    subject of its own in the sender's inbox; the answers are kept by message."""

    def __init__(self, nc: nats.NATS, subject: str, inbox: str, order: list[str] | None = None) -> None:
        self.nc, self.subject, self.inbox = nc, subject, inbox
        self.answers: dict[int, list[dict]] = {}
        self.order = [] if order is None else order  # "A" for each acknowledgement, as it arrives
        self._expected: dict[int, int] = {}  # answers each message has once its latest send is answered
        self._arrived = asyncio.Condition()

    async def start(self) -> None:
        await self.nc.subscribe(f"{self.inbox}.*", cb=self._on_answer)

    async def _on_answer(self, msg: nats.aio.msg.Msg) -> None:
        async with self._arrived:
            answer = json.loads(msg.data)
            self.answers.setdefault(int(msg.subject.rpartition(".")[2]), []).append(answer)
            if _acked(answer):
                self.order.append("A")
            self._arrived.notify_all()

    async def send(self, which: list[int], body: bytes) -> None:
        """Publish `which` (each its own message id), then flush: the server has them all before this returns."""
        for i in which:
            self._expected[i] = len(self.answers.get(i, [])) + 1
            await self.nc.publish(self.subject, body, reply=f"{self.inbox}.{i}", headers={"Nats-Msg-Id": f"m{i}"})
        await self.nc.flush()

    async def answered(self, which: list[int], timeout_s: float) -> None:
        """Wait until each of `which` has had the answer to its latest `send`."""
        async with asyncio.timeout(timeout_s), self._arrived:
            await self._arrived.wait_for(lambda: all(len(self.answers.get(i, [])) >= self._expected[i] for i in which))


def _acked(answer: dict) -> bool:
    return "seq" in answer and "error" not in answer


def _retryable(answer: dict) -> bool:
    # As JetStream answers a message it cannot take now: the SDK takes a 503 as transient and publishes it again.
    return answer.get("error", {}).get("code") == 503


async def test_a_flood_of_large_messages_holds_no_other_senders_events(stack: Runtime) -> None:
    # Found by a probe: the relay handled one message at a time for every tenant, each awaiting JetStream's
    # acknowledgement. One application user publishing 900 KB messages held another tenant's events behind all of
    # its own: 17 s at p50 when paced, every other tenant's publish timed out during a 225 MB burst. Now each
    # sender has its own share: the flood waits (or is refused, retryable) behind itself only.
    s, relay = stack.ctx.bus.subjects, stack.services["gateway"].relay
    flooder, victim = await _connect(stack, *FLOODER), await _connect(stack, *VICTIM)
    try:
        order: list[str] = []  # "A" for each of the flood's acknowledgements, "B" for each of the victim's
        flood = Flood(flooder, s.ingest(FLOODER[1], FLOODER[0]), f"_INBOX.apps.{FLOODER[0]}.{FLOODER[1]}.flood",
                      order)
        await flood.start()
        body = b"\xff" * (flooder.max_payload - 4096)  # garbage near max_payload, room left for the scoped id
        total = 64  # ~64 MB: the sequential relay took every one before the victim's first event
        first_round = asyncio.Event()

        async def flood_until_relayed() -> None:
            # Like any client publishing without waiting for each ack: what is refused as retryable is sent again
            # once its round is answered, until every message is acknowledged.
            waiting = list(range(total))
            while waiting:
                await flood.send(waiting, body)
                first_round.set()
                await flood.answered(waiting, timeout_s=60)  # none left unanswered
                latest = {i: flood.answers[i][-1] for i in waiting}
                assert all(_acked(a) or _retryable(a) for a in latest.values()), latest
                waiting = [i for i, a in latest.items() if not _acked(a)]

        async def victim_publishes() -> None:
            await first_round.wait()  # the server has the whole first round: the relay gets it before these
            js = victim.jetstream()
            for k in range(5):
                event = InferenceEvent(app=VICTIM[1], tenant=VICTIM[0], input_tokens=k)
                ack = await js.publish(s.ingest(VICTIM[1], VICTIM[0]), encode([event]),
                                       headers={"Nats-Msg-Id": f"victim-{k}"}, timeout=60)
                assert ack.seq > 0 and not ack.duplicate
                order.append("B")

        await asyncio.gather(flood_until_relayed(), victim_publishes())
    finally:
        await flooder.close()
        await victim.close()

    # Every message of the flood relayed once in the end, and the victim's five before the flood's last.
    assert order.count("A") == total and order.count("B") == 5
    last_a = len(order) - 1 - order[::-1].index("A")
    assert max(i for i, who in enumerate(order) if who == "B") < last_a, order
    assert relay.relayed.count == total + 5
    # What waited was the flood's own: its sender was told to retry, the victim never.
    assert relay.busy.count > 0
    assert all(_acked(a) or _retryable(a) for answers in flood.answers.values() for a in answers)


async def test_messages_past_the_subscriptions_pending_limit_are_answered_counted_and_logged(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Past nats-py's pending limits (128 MiB by default), the relay's subscription dropped messages with no reply,
    # no log line and no counter. Its limits are explicit now, and each message dropped is answered as retryable on
    # its sender's inbox, counted, and logged (once a minute at most, with each sender's count).
    monkeypatch.setattr(relay_module, "PENDING_MSGS", 4)  # a burst of small messages fills it in one read
    credentials.create_app(settings.home, *FLOODER)
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["gateway"])
    await runtime.start()
    with caplog.at_level(logging.WARNING, logger="lockgate.gateway.relay"):
        try:
            s, relay = runtime.ctx.bus.subjects, runtime.services["gateway"].relay
            nc = await _connect(runtime, *FLOODER)
            try:
                flood = Flood(nc, s.ingest(FLOODER[1], FLOODER[0]), f"_INBOX.apps.{FLOODER[0]}.{FLOODER[1]}.burst")
                await flood.start()
                which = list(range(300))
                await flood.send(which, encode([InferenceEvent(app=FLOODER[1], tenant=FLOODER[0])]))
                await flood.answered(which, timeout_s=30)  # every one: none dropped unanswered
            finally:
                await nc.close()
        finally:
            await runtime.stop()  # which logs the counts not logged yet
    answers = [flood.answers[i][0] for i in which]
    assert all(_acked(a) or _retryable(a) for a in answers), answers
    dropped = [a for a in answers if _retryable(a) and "dropped" in a["error"]["description"]]
    assert dropped and relay.dropped.count == len(dropped)
    # The first drop at once, the others (within the minute) when the relay stopped: each sender's count.
    logged = [r.getMessage() for r in caplog.records if "dropped by the NATS client" in r.getMessage()]
    counts = [int(re.search(rf"{FLOODER[0]}/{FLOODER[1]}: (\d+)", line)[1]) for line in logged]
    assert 1 <= len(logged) <= 2 and sum(counts) == len(dropped), logged


async def test_the_sdk_retries_what_the_relay_refuses_until_every_event_is_stored(stack: Runtime) -> None:
    # A sender over its share is answered 503 at once, as JetStream answers a message it cannot take now: the SDK
    # takes that as transient and publishes the batch again, so nothing it emitted is lost to the refusal.
    s, relay = stack.ctx.bus.subjects, stack.services["gateway"].relay
    user = f"apps.{FLOODER[0]}.{FLOODER[1]}"
    found = await asyncio.to_thread(credentials.apps, stack.settings.home)
    # 24 batches of one large event each in flight at once: three times its 8 MiB share.
    async with Client(stack.settings.nats_url, prefix=s.prefix, app=FLOODER[1], tenant=FLOODER[0], user=user,
                      password=found[user]["password"], max_in_flight=24, batch_size=1) as client:
        for _ in range(24):
            assert client.emit(prompt="p" * 800_000, input_tokens=1)
        await client.flush()
        assert (client.sent, client.failed, client.dropped) == (24, 0, 0)
    assert relay.busy.count > 0
