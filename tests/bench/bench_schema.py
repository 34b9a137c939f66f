"""Schema bench: trace lookup by id and `lockgate cost` at scale, on synthetic rows.

Rows are made inside chDB (`INSERT ... SELECT FROM numbers(...)`, in chunks, so the materialized
views run as they do for the sink's inserts) up to ROWS or until BUILD_BUDGET_S is spent; the
figures say how many rows were built. Reported beside each: the same answer from the raw table
(the full scan the lookup table and the rollup replace), and the sink's per-batch id lookup.
Run alone: `python -m tests.bench.run --out /tmp/schema.json bench_schema`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from lockgate.contracts import CostEntry, CostLedger
from lockgate.services.query.cost import cost_rollup
from lockgate.services.query.traces import trace
from lockgate.services.sink.domain import FACTS
from lockgate.services.sink.handlers import Writer
from lockgate.store import Store, open_store
from lockgate.store.tables import COST_LEDGER
from tests.bench.common import BenchEnv, bench_env, percentiles

ROWS = int(os.environ.get("LOCKGATE_BENCH_SCHEMA_ROWS", 10_000_000))
CHUNK = 1_000_000
BUILD_BUDGET_S = 60.0
SPANS_PER_TRACE = 10
DAYS = 10
T0 = datetime(2026, 11, 20, tzinfo=UTC)
SAMPLES = 30

# 10 spans per trace over DAYS days; services and span names of a small fleet; no links.
_SPANS = f"""
INSERT INTO otel_traces (Timestamp, TraceId, SpanId, ParentSpanId, ServiceName, SpanName, SpanKind, Duration,
                         StatusCode, SpanAttributes)
SELECT toDateTime64({int(T0.timestamp())}, 9) + toIntervalMillisecond(intDiv(number, {SPANS_PER_TRACE}) * {{step_ms:UInt64}}
           + number % {SPANS_PER_TRACE}),
       lower(hex(reinterpretAsFixedString(sipHash128(intDiv(number, {SPANS_PER_TRACE}))))),
       lower(hex(reinterpretAsFixedString(cityHash64(number)))), '',
       concat('lockgate-svc', toString(number % 7)), concat('op', toString(number % 23)), 'Internal',
       1000000 + number % 5000000, if(number % 97 = 0, 'Error', 'Unset'), map('lockgate.release', 'r1')
FROM numbers({{start:UInt64}}, {{n:UInt64}})
"""

# One priced event per row over 30 days: 10 apps, 2 releases each, 4 models, 5 tenants.
_LEDGER = f"""
INSERT INTO cost_ledger
SELECT concat('e', toString(number)),
       toDateTime64({int(T0.timestamp())}, 6, 'UTC') - toIntervalSecond(number * {{step_s:Float64}}),
       concat('t', toString(number % 10 % 5)), concat('app', toString(number % 10)),
       concat('dep', toString(number % 10 % 3)), concat('rel', toString(number % 10), '-', toString(number % 2)),
       concat('model', toString(number % 4)), 100 + number % 900, 10 + number % 400, number % 50,
       (100 + number % 900) * 5e-7 + (10 + number % 400) * 1.5e-6, number % 50 != 7, 'pb1'
FROM numbers({{start:UInt64}}, {{n:UInt64}})
"""


def _build(store: Store, sql: str, params: dict[str, Any]) -> dict[str, Any]:
    """Insert chunks until ROWS or the budget; rows built and seconds taken."""
    started, built = time.perf_counter(), 0
    while built < ROWS and time.perf_counter() - started < BUILD_BUDGET_S:
        store.command(sql, {**params, "start": built, "n": CHUNK})
        built += CHUNK
    return {"rows": built, "build_s": round(time.perf_counter() - started, 1)}


def _timed(fn: Callable[[], Any], n: int = SAMPLES) -> dict[str, float]:
    fn()  # warm: the first call loads marks and index granules
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return percentiles(samples)


def _traces(store: Store) -> dict[str, Any]:
    built = _build(store, _SPANS, {"step_ms": DAYS * 86_400_000 * SPANS_PER_TRACE // ROWS})
    traces = built["rows"] // SPANS_PER_TRACE
    rnd = random.Random(1)
    ids = [store.scalar("SELECT lower(hex(reinterpretAsFixedString(sipHash128({n:UInt64}))))", {"n": rnd.randrange(traces)})
           for _ in range(SAMPLES)]
    picks = iter(ids * 3)
    spans = {len(trace(store, i)) for i in ids}
    assert spans == {SPANS_PER_TRACE}, spans
    full_scan = ("SELECT count() FROM otel_traces WHERE TraceId = {id:String} OR has(Links.TraceId, {id:String})")
    return {
        **built, "traces": traces, "lookup_rows": store.scalar("SELECT count() FROM otel_traces_trace_id_ts"),
        "trace_by_id": _timed(lambda: trace(store, next(picks))),
        "full_scan_reference": _timed(lambda: store.scalar(full_scan, {"id": next(picks)}), n=5),
        "target": "trace by id <= 50 ms at 10M spans",
    }


def _cost(store: Store) -> dict[str, Any]:
    built = _build(store, _LEDGER, {"step_s": 30 * 86_400 / ROWS})
    since = T0 - timedelta(days=7, minutes=13)
    raw = ("SELECT tenant, app, deployment, toDate(time) AS day, count() AS calls, sum(cost_usd) AS cost_usd "
           "FROM cost_ledger GROUP BY tenant, app, deployment, day ORDER BY cost_usd DESC")
    # The sink's lookup before each insert (its own code): 5,000 ledger entries, half of them stored already.
    mid = built["rows"] // 2
    stored = store.rows("SELECT event_id, time, tenant, app FROM cost_ledger WHERE event_id IN {ids:Array(String)}",
                        {"ids": [f"e{n}" for n in range(mid, mid + 2500)]})
    entries = [CostEntry(event_id=r["event_id"], time=r["time"], tenant=r["tenant"], app=r["app"]) for r in stored]
    entries += [CostEntry(event_id=f"new-{i}", time=stored[i]["time"], tenant="t0", app="app0") for i in range(2500)]
    writer = Writer(store, next(p for p in FACTS if p.table is COST_LEDGER))
    data = COST_LEDGER.data([CostLedger(price_book="pb1", entries=entries)])
    keys = set(COST_LEDGER.keys(data))
    assert len(writer._stored_keys(keys, None)) == 2500
    return {
        **built, "rollup_rows": store.scalar("SELECT count() FROM cost_hourly"),
        "cost_by_tenant_app_deployment_day": _timed(lambda: cost_rollup(store)),
        "cost_by_model_since_7_days_unaligned": _timed(lambda: cost_rollup(store, ["model"], since)),
        "cost_by_every_dimension": _timed(lambda: cost_rollup(store, ["tenant", "app", "deployment", "release",
                                                                       "model", "price_book", "hour"])),
        "raw_ledger_reference": _timed(lambda: store.rows(raw), n=5),
        "sink_lookup_5000_entries_half_stored": _timed(lambda: writer._stored_keys(keys, None)),
        "target": "lockgate cost over 10M events <= 200 ms",
    }


async def run(env: BenchEnv) -> dict[str, Any]:
    store = await asyncio.to_thread(open_store, env.chdb_url, "b" + uuid.uuid4().hex[:8])
    try:
        traces = await asyncio.to_thread(_traces, store)
        cost = await asyncio.to_thread(_cost, store)
    finally:
        store.command(f"DROP DATABASE IF EXISTS {store.database}")
        store.close()
    return {"trace_lookup": traces, "cost_rollup": cost,
            "note": f"synthetic rows built in chunks of {CHUNK:,} through the materialized views, "
                    f"up to {ROWS:,} or {BUILD_BUDGET_S:.0f} s per table"}


async def _main() -> None:
    async with bench_env() as env:
        print(json.dumps(await run(env), indent=2, default=str))


if __name__ == "__main__":
    asyncio.run(_main())
