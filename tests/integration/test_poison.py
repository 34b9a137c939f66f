"""Hostile input on the inference stream, through real NATS and chDB: each bad message (or bad event
in a message) is dead-lettered with its reason, every valid event is stored once and billed once,
and ingestion never stalls."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import msgspec
import pytest
from click.testing import CliRunner, Result

from lockgate.bus import MAX_LETTER_PAYLOAD, Bus
from lockgate.codec import encode
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.errors import RowsRefused
from lockgate.server.health import HealthServer
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
        # One event as an object, not an array (probe p31: the edge iterated it, crashed, and never settled it)
        ("lone far-future", _wire(time=far)),
        ("lone 1900", _wire(time=old)),
        ("lone other app", _wire(app="other")),
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
    assert "at `$.time`" in errors and "app 'other' are not those of the subject" in errors
    cut = [r for r in sink if f"cut to its first {MAX_LETTER_PAYLOAD}" in r["error"]]
    assert len(cut) == 1 and cut[0]["size"] <= MAX_LETTER_PAYLOAD
    # Only the garbage was cut (its whole copy is kept as an object: see below); nothing else was.
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


def _dlq_cli(settings: Settings, *args: str) -> Result:
    return _cli(settings, "dlq", *args)


async def test_a_cut_letters_whole_original_outlives_its_stream(run_services, bus: Bus, store: Store,
                                                                settings: Settings, tmp_path: Path) -> None:
    # The probe: the inference stream keeps a message only until its consumers acknowledge it, so a 1 MB garbage
    # message lettered cut to 256 KiB lost the rest of its bytes as soon as the sink and cost had taken it, while
    # its letter said "the original is kept in stream LG_INFERENCE #n".
    inference = bus.subjects.streams["inference"].name
    for durable in bus.subjects.streams["inference"].readers:  # only the consumers running here hold messages
        if durable not in (bus.subjects.durable("sink", "inference"), bus.subjects.durable("cost", "inference")):
            await bus.js.delete_consumer(inference, durable)
    svcs = await run_services("sink", "cost", "query")
    sink = svcs["sink"].handlers
    key = "sk-proj-" + "A1b2C3d4" * 6  # a leaked API key, past the first 256 KiB
    body = b"\x00garbage " + b"0123456789abcdef" * 32_000 + f" Authorization: {key} ".encode() + b"tail" * 100_000
    assert 880_000 < len(body) < 1_000_000
    ack = await bus.publish(bus.subjects.inference("shop"), body, msg_id="huge-garbage")
    await bus.publish(bus.subjects.inference("shop"), _ok(1, "after"))  # cost handles it after the garbage
    await sink.dead_letters.wait_for(1)
    await sink.progress("cost_ledger").wait_for(1)

    [letter] = store.rows("SELECT original, error, length(payload) AS size FROM dead_letters")
    assert letter["size"] <= MAX_LETTER_PAYLOAD and f"cut to its first {MAX_LETTER_PAYLOAD}" in letter["error"]
    assert letter["original"].startswith(f"{inference}.{ack.seq}.") and letter["original"] in letter["error"], (
        "the letter names no copy of the bytes past its cut")
    assert await bus.stored(inference, ack.seq) is None  # its consumers took it: the stream holds it no more

    out = tmp_path / "original.bin"
    got = await asyncio.to_thread(_dlq_cli, settings, "--original", letter["original"], "--out", str(out))
    assert got.exit_code == 0, got.output
    whole = out.read_bytes()
    assert key.encode() not in whole and b"Authorization: [REDACTED]" in whole  # scrubbed as the letter is
    assert whole == body.replace(key.encode(), b"[REDACTED]")  # every byte past the cut is there
    listed = await asyncio.to_thread(_dlq_cli, settings, "--json")
    assert [r["original"] for r in json.loads(listed.output)] == [letter["original"]]

    # Once the bucket no longer holds it (its 30 days passed): one line and exit code 3.
    gone = await asyncio.to_thread(_dlq_cli, settings, "--original", f"{inference}.{ack.seq + 99}.{'0' * 64}")
    assert gone.exit_code == 3 and "is no longer stored" in gone.output and len(gone.output.splitlines()) == 1


async def test_secrets_in_a_poison_messages_json_are_scrubbed_in_its_letter_and_its_whole_original(
        run_services, bus: Bus, store: Store, settings: Settings, tmp_path: Path) -> None:
    # The probe: a dead letter's payload is the raw JSON, where a newline or tab before a secret is written `\n` or
    # `\t` and a JSON text within a string quotes its keys `\"api_key\"`. The same event stored valid was scrubbed,
    # but its letter (dead_letters.payload) and its whole original (lg_dlq_originals) kept all six secrets.
    sink = (await run_services("sink"))["sink"].handlers
    secrets = {"sk-proj-DLQCANARYNL000000000000000", "AKIADLQCANARYTAB1234", "DLQCANARYBEARER123456",
               "ghp_DLQCANARYGHP00000000000000000000000", "DLQCANARYTOOLARG99", "DLQCANARYPW77"}
    prompt = ("my key is:\nsk-proj-DLQCANARYNL000000000000000\tAKIADLQCANARYTAB1234\nBearer DLQCANARYBEARER123456"
              "\nghp_DLQCANARYGHP00000000000000000000000")
    response = json.dumps({"api_key": "DLQCANARYTOOLARG99", "password": "DLQCANARYPW77"})
    big_key = "sk-proj-DLQBIGCANARY" + "0" * 20
    subject = bus.subjects.inference("shop")
    # A wrong type: the message is JSON, the event it holds is refused.
    await bus.publish(subject, _wire(input_tokens="notanumber", prompt=prompt, response=response), msg_id="small")
    big = _wire(input_tokens="notanumber", prompt="x" * 300_000 + "\n" + big_key)
    assert len(big) > MAX_LETTER_PAYLOAD
    await bus.publish(subject, big, msg_id="big")
    await sink.dead_letters.wait_for(2)

    letters = store.rows("SELECT payload, original FROM dead_letters ORDER BY length(payload)")
    small_letter, big_letter = letters
    assert not [s for s in secrets if s in small_letter["payload"]], small_letter["payload"]
    stored = json.loads(small_letter["payload"])  # every escape left whole: still the JSON it was
    assert stored["prompt"] == "my key is:\n[REDACTED]\t[REDACTED]\nBearer [REDACTED]\n[REDACTED]"
    assert json.loads(stored["response"]) == {"api_key": "[REDACTED]", "password": "[REDACTED]"}

    out = tmp_path / "original.bin"
    got = await asyncio.to_thread(_cli, settings, "dlq", "--original", big_letter["original"], "--out", str(out))
    assert got.exit_code == 0, got.output
    whole = out.read_bytes()
    assert b"DLQBIGCANARY" not in whole and json.loads(whole)["prompt"].endswith("x\n[REDACTED]")


async def test_garbage_whose_original_the_full_bucket_refuses_holds_back_no_event(
        run_services, bus: Bus, store: Store, settings: Settings) -> None:
    # The probe: with `lg_dlq_originals` full, each undecodable message over 256 KiB was nacked for ever; once about
    # 440 were stuck the sink's inference consumer got only their redeliveries, and no tenant's events were stored
    # for minutes on end, while /healthz said ok with `streams_full` empty and `lockgate status` did not show the
    # bucket. Here the bucket is made small (300 KiB) and filled through the inference subject, as an application's
    # garbage fills it.
    svcs = await run_services("sink")
    sink = svcs["sink"].handlers
    subject = bus.subjects.inference("shop")
    bucket = f"OBJ_{bus.subjects.object_dead_letters}"
    config = (await bus.js.stream_info(bucket)).config
    await bus.js.update_stream(config.evolve(max_bytes=300 * 1024))
    await bus.publish(subject, b"\x00fill " + b"f" * (280 * 1024), msg_id="fill")
    await sink.dead_letters.wait_for(1)
    assert [s["stream"] for s in await bus.full_streams()] == [bucket]  # 19 KiB left: full

    health = HealthServer(lambda: [bus], "127.0.0.1", 0)
    url = await health.start()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/readyz") as resp:
            ready = await resp.json()
    finally:
        await health.stop()
    assert [(s["stream"], s["bucket"]) for s in ready["streams_full"]] == [(bucket, bus.subjects.object_dead_letters)]
    shown = await asyncio.to_thread(_cli, settings, "status")
    assert shown.exit_code == 0 and "dlq_originals" in shown.output and "FULL dlq_originals" in shown.output, (
        shown.output)
    report = json.loads((await asyncio.to_thread(_cli, settings, "status", "--json")).output)
    assert {s["role"]: s["state"] for s in report["streams"]}["dlq_originals"].startswith("FULL")

    body = b"\x00garbage " + b"g" * 300_000  # over 256 KiB: its whole original would go to the full bucket
    await bus.publish(subject, body, msg_id="garbage")
    valid = _ok(5, "after")
    await bus.publish(subject, valid)
    await bus.publish(subject, _ok(3, "later"))
    await sink.events.wait_for(8, timeout_s=20)
    await sink.dead_letters.wait_for(2, timeout_s=20)  # before: never; the garbage was nacked for ever
    assert store.scalar("SELECT count() FROM inference_events") == 8

    letter = store.rows("SELECT original, error, length(payload) AS size FROM dead_letters "
                        "WHERE error LIKE '%300009 bytes%'")
    assert len(letter) == 1 and letter[0]["original"] == "" and letter[0]["size"] == MAX_LETTER_PAYLOAD
    assert "whole original was NOT kept" in letter[0]["error"] and "maximum bytes exceeded" in letter[0]["error"]
    consumer = await bus.js.consumer_info(bus.subjects.streams["inference"].name,
                                          bus.subjects.durable("sink", "inference"))
    assert (consumer.num_pending, consumer.num_ack_pending) == (0, 0)  # nothing left waiting or in flight


def _cli(settings: Settings, *args: str) -> Result:
    from lockgate.cli.main import cli

    env = {"LOCKGATE_NATS_URL": settings.nats_url, "LOCKGATE_PREFIX": settings.prefix,
           "LOCKGATE_DATABASE": settings.database, "LOCKGATE_CLICKHOUSE_URL": settings.clickhouse_url,
           "LOCKGATE_HOME": settings.home}
    return CliRunner().invoke(cli, list(args), env=env)
