"""Exactly-once across a sink restart on real NATS and chDB, events sent through the gateway's gRPC Send with an app
key: an event whose id holds characters of more than one byte is stored and billed once when re-sent to a restarted
sink (probe p47 F2)."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.ids import uuid7_prefix
from lockgate.server.apikeys import bootstrap
from lockgate.server.registry import ServiceSet
from lockgate.server.service import ServiceContext
from lockgate.store import Store, open_store
from lockgate.subjects import Subjects
from lockgate.telemetry import Telemetry
from lockgate.v1 import ingest_pb2, ingest_pb2_grpc
from tests.helpers import grpc_key

pytestmark = pytest.mark.timeout(120)


async def _send(address: str, key: str, events: list[ingest_pb2.InferenceEvent]) -> None:
    async with grpc.aio.insecure_channel(address, interceptors=grpc_key(key)) as ch:
        reply = await ingest_pb2_grpc.IngestStub(ch).Send(ingest_pb2.InferenceBatch(events=events), timeout=10)
    assert (reply.accepted, reply.rejected) == (len(events), 0)


async def test_an_event_whose_id_is_not_ascii_resent_to_a_restarted_sink_is_stored_and_billed_once(
        context: ServiceContext, run_services: Any, settings: Settings, store: Store, unique: str) -> None:
    key = bootstrap(settings.home, tenant="acme", app="shop").app_key
    grpc_at = (await run_services("gateway"))["gateway"].endpoints["grpc"]
    # A UUIDv7's time digits of two minutes ago (under the window's ceiling), then `é`, two bytes each: the id's first
    # 13 characters are 17 bytes, and the table's latest id order read at start must be its first 13 characters too.
    rid = uuid7_prefix(int((time.time() - 131) * 1000))[:9] + f"éééé-{unique}"
    when = Timestamp()
    when.GetCurrentTime()
    event = ingest_pb2.InferenceEvent(id=rid, app="shop", deployment="web", model="gpt-4o-mini", time=when,
                                      input_tokens=1000, output_tokens=1000, status="ok")

    first = ServiceSet(context, ["sink", "cost"])
    await first.start()
    try:
        await _send(grpc_at, key, [event])
        await first["sink"].handlers.events.wait_for(1, timeout_s=30)
        await first["sink"].handlers.progress("cost_ledger").wait_for(1, timeout_s=30)
    finally:
        await first.stop()
        await context.bus.stop_consumers()  # the first process's consumers end with it (the gateway keeps running)
    assert store.scalar("SELECT count() FROM cost_ledger WHERE event_id = {i:String}", {"i": rid}) == 1

    # The restarted process: its own bus and store, so its stored-keys window is read from the tables.
    bus2 = Bus(settings.nats_url, Subjects(settings.prefix), name="restarted")
    await bus2.connect()
    later = open_store(store.url, store.database)
    second = ServiceSet(ServiceContext(bus=bus2, store=later, telemetry=Telemetry(), settings=settings), ["sink", "cost"])
    await second.start()
    try:
        # The same event again, with a new one: another batch, so another message id (as any SDK's re-send).
        await _send(grpc_at, key, [event, ingest_pb2.InferenceEvent(app="shop", deployment="web", model="m")])
        await second["sink"].handlers.events.wait_for(2, timeout_s=30)
        await second["sink"].handlers.progress("cost_ledger").wait_for(1, timeout_s=30)
    finally:
        await second.stop()
        await bus2.close()
    # Before, probe p47 F2: 2 and 2 (the window's horizon was the id's first 13 bytes, which sort before its first 13
    # characters, so the re-sent event counted as newer than anything stored and was not looked up).
    stored = store.scalar("SELECT count() FROM inference_events WHERE id = {i:String}", {"i": rid})
    billed = store.scalar("SELECT count() FROM cost_ledger WHERE event_id = {i:String}", {"i": rid})
    assert (stored, billed) == (1, 1)
    assert store.scalar("SELECT count() FROM inference_events") == 2
