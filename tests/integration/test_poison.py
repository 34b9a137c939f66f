"""Hostile input on the inference stream, through real NATS and chDB: each bad message (or bad event
in a message) is dead-lettered with its reason, every valid event is stored once and billed once,
and ingestion never stalls."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from lockgate.bus import MAX_LETTER_PAYLOAD, Bus
from lockgate.codec import encode
from lockgate.contracts import InferenceEvent
from lockgate.errors import RowsRefused
from lockgate.store import Store
from lockgate.store.tables import INFERENCE_EVENTS

pytestmark = pytest.mark.timeout(120)


def _ok(n: int, tag: str) -> list[InferenceEvent]:
    return [InferenceEvent(app="shop", model="gpt-4o-mini", input_tokens=10, output_tokens=5, session_id=f"{tag}-{i}")
            for i in range(n)]


def _wire(**fields: object) -> bytes:
    """One inference event as JSON, with whatever values a hostile producer puts in."""
    doc = msgspec.json.decode(encode(InferenceEvent(app="shop", model="gpt-4o-mini")))
    doc.update(fields)
    return msgspec.json.encode(doc)


async def test_a_flood_of_poison_harms_only_itself(run_services, bus: Bus, store: Store) -> None:
    svcs = await run_services("sink", "cost")
    subject = bus.subjects.inference("shop")
    far = (datetime.now(UTC) + timedelta(days=3650)).isoformat()
    old = datetime(1900, 1, 1, tzinfo=UTC).isoformat()
    valid: list[InferenceEvent] = []
    poison = [
        ("utf8", b'[{"type": "lockgate.inference", "app": "shop", "model": "\xff\xfe"}]'),
        ("overflow", b"[" + _wire(input_tokens=2**32) + b"]"),
        ("garbage", b"\x00" * (1024 * 1024 - 4096)),  # just under NATS' max payload: the letter must still fit
        ("oversized array", b"[" + b",".join([b'{"type":"lockgate.inference","app":"shop"}'] * 5001) + b"]"),
        ("float overflow", b"[" + _wire(latency_ms=1e300) + b"]"),
    ]
    for i, (name, body) in enumerate(poison):
        good = _ok(20, f"b{i}")
        valid += good
        await bus.publish(subject, good)
        await bus.publish(subject, body, msg_id=f"poison-{name}")
    # Bad times inside an otherwise good message: only they are parked, the others stored.
    mixed = _ok(10, "mixed")
    valid += mixed
    body = b"[" + b",".join([*(encode(e) for e in mixed), _wire(time=far), _wire(time=old)]) + b"]"
    await bus.publish(subject, body, msg_id="mixed-times")

    await svcs["sink"].handlers.events.wait_for(len(valid))
    # One letter per bad message (the sink's): cost skips what the sink records.
    await svcs["sink"].handlers.dead_letters.wait_for(len(poison) + 1)
    assert store.scalar("SELECT count() FROM inference_events") == len(valid)
    assert store.scalar("SELECT uniqExact(session_id) FROM inference_events") == len(valid)

    letters = store.rows("SELECT origin, reason, error, length(payload) AS size FROM dead_letters ORDER BY time")
    sink = [r for r in letters if r["origin"] == "sink"]
    errors = " | ".join(r["error"] for r in sink)
    assert "UTF-8" in errors
    assert "input_tokens" in errors and "latency_ms" in errors  # named by the contract's bounds
    assert "5001 events in one message; at most 5000" in errors
    assert "after now" in errors and "before now" in errors and "$[10].time" in errors and "$[11].time" in errors
    cut = [r for r in sink if f"cut to its first {MAX_LETTER_PAYLOAD}" in r["error"]]
    assert len(cut) == 1 and cut[0]["size"] <= MAX_LETTER_PAYLOAD
    # The garbage is kept whole in its stream (the letter holds only part of it); nothing else was.
    assert {r["reason"] for r in sink} == {"invalid event", "over limits"}

    # Billing saw exactly the stored events: one ledger per message with valid events.
    await svcs["sink"].handlers.progress("cost_ledger").wait_for(len(poison) + 1)
    assert store.scalar("SELECT count() FROM cost_ledger") == len(valid)
    assert {r["origin"] for r in letters} == {"sink"} and len(letters) == len(poison) + 1


def test_rows_the_store_refuses_are_a_permanent_error(store: Store) -> None:
    # A value beyond its column (UInt32) that bypassed the contract: retrying cannot help, so the
    # error is not Retryable and the sink's batcher isolates the message that holds it.
    event = InferenceEvent(app="shop", input_tokens=2**32)
    data = INFERENCE_EVENTS.data([event], {"msg_id": ["m"], "served": [False]})
    with pytest.raises(RowsRefused, match="refused the rows"):
        store.insert_columns(INFERENCE_EVENTS.name, INFERENCE_EVENTS.columns, data, token=None)
