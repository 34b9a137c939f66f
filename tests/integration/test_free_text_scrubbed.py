"""Secrets and names through the real interfaces (probe p10): an application publishing its own inference event
over NATS with its per-application credential (no SDK, so no scrub of its own) keeps no secret in any table, cost
event or drift snapshot; an OTLP span of a tenant whose name the patterns would take for a key keeps its tenant."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from lockgate.codec import encode
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.server.apikeys import KeyStore
from lockgate.server.runtime import Runtime
from lockgate.services.query.traces import trace
from lockgate.store import Store
from tests.helpers import eventually, run_cli, sink_stored

pytestmark = pytest.mark.timeout(120)

# The seven fields probe p10 found kept whole (the SDK, the router and gRPC scrub them before publishing).
FIELDS = ("model", "response_model", "provider", "error_type", "finish_reason", "variant", "user_hash", "key_id",
          "source")


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"),
                      services=["sink", "gateway", "gatekeeper", "cost", "drift"])
    await runtime.start()
    yield runtime
    await runtime.stop()


async def _web_credential(stack: Runtime) -> dict[str, Any]:
    """acme/web's own NATS user, as `lockgate app-credential create` writes it."""
    created = await run_cli(stack, "app-credential", "create", "--tenant", "acme", "--app", "web", "--json")
    assert created.exit_code == 0, created.output
    return json.loads(await asyncio.to_thread(Path(json.loads(created.output)["file"]).read_text))


async def test_an_apps_own_event_over_nats_keeps_no_secret_in_any_table_cost_event_or_drift_snapshot(
        stack: Runtime) -> None:
    cred = await _web_credential(stack)
    bus, s = stack.ctx.bus, stack.ctx.bus.subjects
    key, token = "sk-proj-" + secrets.token_urlsafe(30), "ghp_" + "A1b2" * 9
    planted = (key, token)
    event = InferenceEvent(tenant="acme", app="web", deployment="web", release="web-v1", model=f"gpt-4o {key}",
                           response_model=f"m {token}", provider=f"openai {key}", status="error",
                           error_type=f"401 Bearer {key}", finish_reason=f"stop {token}", variant=f"stable {token}",
                           user_hash=f"u {token}", input_tokens=3, output_tokens=2, prompt=f"my key {key}",
                           # Probe p13: these kept the key after the fix above.
                           key_id=f"k {key}", source=f"app {token}", scores={f"q {key}": 0.5})
    # An id that reads as a key is refused (masked, two events would share one id), alone.
    keyed = InferenceEvent(id=key, tenant="acme", app="web", deployment="web", release="web-v1", model="m")
    costs = await bus.nc.subscribe(s.cost_all)
    nc = await nats.connect(stack.settings.nats_url, user=cred["user"], password=cred["password"],
                            inbox_prefix=f"_INBOX.{cred['user']}", allow_reconnect=False)
    try:
        # As any producer other than the SDK publishes: the relay acknowledges on the sender's own inbox.
        dead = await bus.nc.subscribe(s.dlq_all)
        ack = await nc.request(s.ingest("web", "acme"), encode([keyed]), timeout=10)
        ack = await nc.request(s.ingest("web", "acme"), encode([event]), timeout=10)
        assert b'"seq"' in ack.data, ack.data
    finally:
        await nc.close()

    sink, drift = stack.services["sink"].handlers, stack.services["drift"].handlers
    await sink.events.wait_for(1, 30)
    await sink_stored(sink, cost_ledger=1)
    record = (await costs.next_msg(timeout=15)).data  # the cost service's record of the event's tenant
    await drift.events.wait_for(1, 30)
    await drift.save()

    store = stack.ctx.store
    row = store.rows(f"SELECT {', '.join(FIELDS)}, prompt FROM inference_events WHERE id = {{id:String}}",
                     {"id": event.id})[0]
    assert all("[REDACTED]" in row[name] for name in FIELDS), row
    assert list(store.rows("SELECT scores FROM inference_events WHERE id = {id:String}", {"id": event.id})[0]
                ["scores"]) == ["q [REDACTED]"]
    letter = (await dead.next_msg(timeout=15)).data
    assert b"its id holds what reads as a credential" in letter and key.encode() not in letter
    assert store.scalar("SELECT count() FROM inference_events WHERE tenant = 'acme'") == 1
    assert row["model"] == "gpt-4o [REDACTED]" and row["error_type"] == "401 Bearer [REDACTED]"
    ledger = store.rows("SELECT model FROM cost_ledger WHERE event_id = {id:String}", {"id": event.id})
    hourly = store.rows("SELECT model FROM cost_hourly WHERE tenant = 'acme'")
    assert [r["model"] for r in ledger] == [r["model"] for r in hourly] == ["gpt-4o [REDACTED]"]
    snapshot = b"".join((await bus.kv_entries(s.kv_drift)).values())
    assert b"[REDACTED]" in snapshot  # the labels it counts are there, masked
    everything = json.dumps([row, ledger, hourly]).encode() + record + snapshot
    assert not [p for p in planted if p.encode() in everything]


@pytest.fixture
async def receiver(run_services: Callable[..., Any]) -> Any:
    return await run_services("sink", "otlp")


def _span(trace_id: str, name: str) -> dict[str, Any]:
    start = time.time_ns() - 1_000_000_000
    span = {"traceId": trace_id, "spanId": "a000000000000001", "name": name, "kind": 2,
            "startTimeUnixNano": str(start), "endTimeUnixNano": str(start + 1000)}
    return {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
                               "scopeSpans": [{"spans": [span]}]}]}


async def test_an_otlp_span_of_a_tenant_named_like_a_secret_keeps_its_tenant(
        receiver: Any, store: Store, settings: Settings) -> None:
    # 40 mixed-case letters and digits: the bare AWS secret key heuristic. The receiver stamped the key's tenant on
    # the resource and scrubbed it with the rest: both tenants' spans were stored as tenant `[REDACTED]`, one
    # displacing the other (same ids), and `traces --tenant` found neither (probe p10).
    tenants = ("AcmeCorporationInternationalHoldings2024", "NorthwindTradersEuropeanOperations2025ab")
    keys = {t: KeyStore(settings.home).create(t, "web")[0] for t in tenants}
    trace_id = secrets.token_hex(16)
    async with aiohttp.ClientSession() as http:
        for n, tenant in enumerate(reversed(tenants)):
            async with http.post(receiver.endpoints["otlp-http"] + "/v1/traces", json=_span(trace_id, f"op {n}"),
                                 headers={"x-api-key": keys[tenant]}) as r:
                assert r.status == 200, await r.text()
    sink = receiver["sink"].handlers
    await eventually(lambda: len(store.rows("SELECT 1 FROM otel_traces WHERE TraceId = {t:String}",
                                            {"t": trace_id})) == 2, [sink.spans], what="both tenants' spans")
    rows = store.rows("SELECT SenderTenant AS sender, ResourceAttributes['lockgate.tenant'] AS stamped "
                      "FROM otel_traces WHERE TraceId = {t:String} ORDER BY sender", {"t": trace_id})
    assert [(r["sender"], r["stamped"]) for r in rows] == [(t, t) for t in tenants]
    mine = await asyncio.to_thread(trace, store, trace_id, tenants[0])
    assert [span["name"] for span in mine] == ["op 1"]


async def test_an_event_whose_id_reads_as_a_key_is_refused_alone_from_its_array_and_random_ids_are_kept(
        stack: Runtime) -> None:
    # Probe p16: the id of one event of ten, `sk-proj-...`, had the whole array lettered under `$.id`, its nine valid
    # neighbours neither stored nor billed; and a random 40-character base62 id (the shape of a bare AWS secret key)
    # was refused as a credential.
    cred = await _web_credential(stack)
    bus, s = stack.ctx.bus, stack.ctx.bus.subjects
    key = "sk-proj-" + "Ab3" * 16
    base62 = "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") for _ in range(39))
    ids = [f"{base62}{n}" for n in range(5)] + [f"req_{base62}{n}" for n in range(5)]
    ids[4] = key
    events = [InferenceEvent(id=i, tenant="acme", app="web", deployment="web", release="web-v1", model="m",
                             input_tokens=3, output_tokens=2) for i in ids]
    dead = await bus.nc.subscribe(s.dlq_all)
    nc = await nats.connect(stack.settings.nats_url, user=cred["user"], password=cred["password"],
                            inbox_prefix=f"_INBOX.{cred['user']}", allow_reconnect=False)
    try:
        ack = await nc.request(s.ingest("web", "acme"), encode(events), timeout=10)
        assert b'"seq"' in ack.data, ack.data
    finally:
        await nc.close()

    letter = json.loads((await dead.next_msg(timeout=15)).data)
    assert letter["reason"] == "invalid event", letter
    assert letter["error"].endswith("- at `$[4].id`"), letter
    assert key not in json.dumps(letter)
    sink = stack.services["sink"].handlers
    store = stack.ctx.store
    await eventually(lambda: store.scalar("SELECT count() FROM cost_ledger WHERE tenant = 'acme'") == 9,
                     [sink.progress("cost_ledger")], what="9 ledger entries")
    stored = {r["id"] for r in store.rows("SELECT id FROM inference_events WHERE tenant = 'acme'")}
    assert stored == set(ids) - {key}
    billed = {r["event_id"] for r in store.rows("SELECT event_id FROM cost_ledger WHERE tenant = 'acme'")}
    assert billed == stored
