"""What one tenant or one viewer can do to everyone's reads, on the embedded runtime as `lockgate up` runs it (probe
p10, F7, F10, F12).

- A tenant that learns another's trace id sent 600 spans of 2.5 kB into it: `lockgate traces <id>` then failed (the
  whole trace more than one NATS reply carries) with advice naming a `--limit` the command lacks. It pages now.
- Four legal requests of the viewer credential made the services' reads wait behind them (named queries were
  answered one at a time), and a named query ran with no bound on rows, time or memory. The CLI's roles ask in a
  lane of their own now, and every named query carries the operator session's bounds.
- An OTLP sender timed 20 traces 55 minutes ahead: they filled the default `lockgate traces` listing for that hour.
  Traces starting after now are left out of it now, and counted in its title."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from lockgate import credentials
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.errors import QueryRefused
from lockgate.queryclient import ask
from lockgate.server.apikeys import KeyStore
from lockgate.server.runtime import Runtime
from lockgate.services.query import traces
from lockgate.subjects import Subjects
from tests.helpers import eventually, run_cli, run_cli_json

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    """The embedded runtime with its own nats-server (a user per service and role)."""
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", trace_sample_ratio=1.0),
                      services=["sink", "query", "otlp"])
    await runtime.start()
    yield runtime
    await runtime.stop()


async def _as(runtime: Runtime, identity: str) -> Bus:
    s = runtime.settings
    bus = Bus(s.nats_url, Subjects(s.prefix), name=f"test-{identity}", auth=credentials.for_identity(s, identity),
              manage_topology=False)
    await bus.connect()
    return bus


def _span(trace_id: str, span_id: str, start_ns: int, **attributes: str) -> dict[str, Any]:
    return {"traceId": trace_id, "spanId": span_id, "name": "x", "kind": 1, "startTimeUnixNano": str(start_ns),
            "endTimeUnixNano": str(start_ns + 1000),
            "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attributes.items()]}


async def _export(runtime: Runtime, key: str, spans: list[dict[str, Any]]) -> None:
    url = runtime.services["otlp"].endpoints["otlp-http"] + "/v1/traces"
    body = {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "web"}}]},
                               "scopeSpans": [{"spans": spans}]}]}
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers={"x-api-key": key}) as resp:
        assert resp.status == 200, await resp.text()


async def _stored(runtime: Runtime, spans: int) -> None:
    store = runtime.ctx.store
    assert store is not None
    await eventually(lambda: store.scalar("SELECT count() FROM otel_traces WHERE ServiceName = 'web'") == spans,
                     [runtime.services["sink"].handlers.spans], what=f"{spans} spans stored")


async def test_another_tenants_spans_never_make_a_trace_unreadable(stack: Runtime) -> None:
    keys = KeyStore(stack.settings.home)
    default_key, _ = keys.create("default", "shop", "app")
    acme_key, _ = keys.create("acme", "shop", "app")
    victim, now = secrets.token_hex(16), time.time_ns()
    await _export(stack, default_key, [_span(victim, f"{i + 1:016x}", now) for i in range(2)])
    # acme's 600 spans of 2.5 kB in default's trace: 1.6 MB, more than one reply carries (1 MB).
    await _export(stack, acme_key, [_span(victim, f"{i + 1001:016x}", now, pad="p" * 2500) for i in range(600)])
    await _stored(stack, 602)

    spans = await run_cli_json(stack, "traces", victim)
    web = [r for r in spans if r["service"] == "web"]
    assert len(web) == 602 and len({r["span_id"] for r in web}) == 602  # every span, once
    assert sum(r["tenant"] == "default" for r in web) == 2
    table = await run_cli(stack, "traces", victim)
    assert table.exit_code == 0, table.output
    assert "holds spans of 2 tenants (acme, default)" in table.stderr


async def test_traces_timed_ahead_are_left_out_of_the_listing_and_counted(stack: Runtime) -> None:
    keys = KeyStore(stack.settings.home)
    default_key, _ = keys.create("default", "shop", "app")
    acme_key, _ = keys.create("acme", "shop", "app")
    ahead = time.time_ns() + 55 * 60 * 10**9
    await _export(stack, acme_key, [_span(secrets.token_hex(16), secrets.token_hex(8), ahead) for _ in range(20)])
    real = secrets.token_hex(16)
    await _export(stack, default_key, [_span(real, secrets.token_hex(8), time.time_ns())])
    await _stored(stack, 21)

    listed = await run_cli_json(stack, "traces")
    assert [r["trace_id"] for r in listed if r["services"] == ["web (otlp)"]] == [real]
    table = await run_cli(stack, "traces")
    assert table.exit_code == 0, table.output
    assert real in table.stdout
    assert "20 trace(s) starting after now left out" in " ".join(table.stdout.split())


async def test_a_viewers_requests_never_hold_up_the_services_reads(stack: Runtime,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    held, release = threading.Semaphore(0), threading.Event()
    counts = traces.dead_letter_counts

    def slow(store: Any) -> list[dict[str, Any]]:  # a viewer's long legal query, held until the test lets it go
        held.release()
        release.wait(timeout=60)
        return counts(store)

    monkeypatch.setattr(traces, "dead_letter_counts", slow)
    viewer, gatekeeper = await _as(stack, "viewer"), await _as(stack, "gatekeeper")
    try:
        asked = [asyncio.create_task(ask(viewer, "dead_letter_counts")) for _ in range(4)]
        try:
            await asyncio.to_thread(held.acquire, True, 30)  # the viewer's first is being answered
            # The gatekeeper's read is answered while the viewer's hold their lane.
            assert await ask(gatekeeper, "decisions", {"limit": 1}, timeout_s=10) == []
            assert not any(task.done() for task in asked)
        finally:
            release.set()
        assert await asyncio.gather(*asked) == [[]] * 4  # and the viewer's, each its own answer
    finally:
        await viewer.close()
        await gatekeeper.close()


async def test_a_named_query_is_bounded_as_operator_sql_is(stack: Runtime) -> None:
    # 100,001 rows: refused by ClickHouse at its bound, never built whole in the query service's memory first (a
    # `served_events` since 1970 was, then refused for its size).
    store = stack.ctx.store
    assert store is not None
    store.insert_columns("inference_events", ["id", "time", "served"],
                         [[f"e{i}" for i in range(100_001)], [datetime.now(UTC)] * 100_001, [True] * 100_001],
                         token=None)
    viewer = await _as(stack, "viewer")
    try:
        with pytest.raises(QueryRefused, match="bounds"):
            await ask(viewer, "served_events", {"since": "1970-01-01T00:00:00Z", "limit": 200_000})
        # The session is whole after it: the next query of that lane is answered as its own.
        assert len(await ask(viewer, "served_events", {"since": "1970-01-01T00:00:00Z", "limit": 3})) == 3
    finally:
        await viewer.close()

