"""End-to-end ingest: SDK emit -> JetStream -> sink -> visible in ClickHouse, beside the raw limits.

Run alone with `python -m tests.bench.bench_ingest [--events N]`; prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import time
from typing import Any

from lockgate.client import Client
from lockgate.codec import encode
from lockgate.contracts import InferenceEvent
from lockgate.ids import batch_id
from tests.bench.common import BenchEnv, Stack, bench_env, stack

BATCH = 500
IN_FLIGHT = 8


def fields(i: int) -> dict[str, Any]:
    """One realistic event's fields (about 250 bytes of content, plus the envelope)."""
    return {
        "deployment": "checkout",
        "variant": "canary" if i % 10 == 0 else "stable",
        "release": "shop-2025.06.1",
        "model": "gpt-4o-mini",
        "provider": "openai",
        "input_tokens": 100 + i % 400,
        "output_tokens": 20 + i % 200,
        "latency_ms": 120.0 + i % 900,
        "ttft_ms": 40.0 + i % 100,
        "finish_reason": "stop",
        "user_hash": f"u{i % 5000:05d}",
        "session_id": f"s{i % 20000:06d}",
        "attributes": {"route": "/v1/chat", "region": "eu-west-1"},
        "scores": {"helpfulness": (i % 100) / 100},
    }


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds) if seconds > 0 else 0.0


async def _count(st: Stack) -> int:
    return int(await asyncio.to_thread(st.ctx.store.scalar, "SELECT count() FROM inference_events") or 0)


_LATENCY_SQL = (
    "SELECT quantiles(0.5, 0.9, 0.99)(d) AS q, max(d) AS mx FROM (SELECT"
    " (toUnixTimestamp64Micro(ingested_at) - toUnixTimestamp64Micro(time)) / 1000.0 AS d"
    " FROM inference_events WHERE release = {release:String})"
)


async def _latency(st: Stack, release: str) -> dict[str, float]:
    # `time` is set at emit and `ingested_at` by ClickHouse at insert (ms precision):
    # their difference is each event's emit-to-visible latency.
    row = (await asyncio.to_thread(st.ctx.store.rows, _LATENCY_SQL, {"release": release}))[0]
    q = row["q"]
    return {
        "p50_ms": round(q[0], 1),
        "p90_ms": round(q[1], 1),
        "p99_ms": round(q[2], 1),
        "max_ms": round(row["mx"], 1),
    }


async def _wait_visible(st: Stack, n: int, deadline: float) -> int:
    """Wait until the sink reports n events handled (its insert precedes the report), then count."""
    with contextlib.suppress(TimeoutError):
        await st.services["sink"].handlers.events.wait_for(n, max(0.0, deadline - time.perf_counter()))
    return await _count(st)


def _emitter(nats_url: str, prefix: str, n: int, conn: Any, rate: float | None = None, release: str = "") -> None:
    """The application: its own process, as in production, so it does not share the sink's CPU.

    Without `rate` it emits as fast as it can (a flood); with it, paced at `rate` events per second."""

    async def go() -> None:
        client = Client(nats_url, prefix=prefix, app="bench", max_buffer=n, batch_size=BATCH,
                        max_in_flight=IN_FLIGHT)
        await client.start()
        conn.send("ready")
        conn.recv()
        t0 = time.time()
        extra = {"release": release} if release else {}
        if rate is None:
            for i in range(n):
                client.emit(**{**fields(i), **extra})
                if i % 2000 == 1999:
                    await asyncio.sleep(0)  # yield so the sender publishes while we emit, as an app would
        else:
            i, start = 0, time.perf_counter()
            while i < n:
                due = min(n, int((time.perf_counter() - start) * rate) + 1)
                while i < due:
                    client.emit(**{**fields(i), **extra})
                    i += 1
                await asyncio.sleep(0.001)  # pacing the load (about 1 ms of events per step), not synchronisation
        t_emitted = time.time()
        await client.flush()
        t_published = time.time()
        await client.close()
        conn.send({"t0": t0, "emitted": t_emitted, "published": t_published, "sent": client.sent,
                   "dropped": client.dropped, "failed": client.failed})

    asyncio.run(go())


async def _app_run(env: BenchEnv, st: Stack, n: int, timeout_s: float, rate: float | None, release: str
                   ) -> tuple[dict[str, Any], int, float]:
    """n events from an application process; (its report, events visible, seconds from go to visible)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_emitter, args=(env.nats_url, st.ctx.settings.prefix, n, child, rate, release),
                       daemon=True)
    proc.start()
    assert await asyncio.to_thread(parent.recv) == "ready"
    before = st.services["sink"].handlers.events.count
    parent.send("go")
    t0 = time.time()
    with contextlib.suppress(TimeoutError):  # the sink reports events after their insert
        await st.services["sink"].handlers.events.wait_for(before + n, timeout_s)
    t_visible = time.time()
    if not await asyncio.to_thread(parent.poll, 60):  # the application died (its traceback is on stderr)
        raise RuntimeError(f"the emitting application did not report (exit code {proc.exitcode})")
    app = parent.recv()
    await asyncio.to_thread(proc.join, 30)
    visible = int(await asyncio.to_thread(
        st.ctx.store.scalar, "SELECT count() FROM inference_events WHERE release = {r:String}", {"r": release}) or 0)
    return app, visible, t_visible - t0


async def end_to_end(env: BenchEnv, st: Stack, n: int, timeout_s: float) -> dict[str, Any]:
    """An application process emits n events through the SDK as fast as it can; time until all
    are counted in ClickHouse."""
    release = fields(0)["release"]
    app, visible, seconds = await _app_run(env, st, n, timeout_s, None, release)
    latency = await _latency(st, release)
    rate = _rate(visible, seconds)
    return {
        "events": n,
        "visible": visible,
        "complete": visible >= n,
        "sent": app["sent"],
        "dropped": app["dropped"],
        "failed": app["failed"],
        "emit_events_per_s": _rate(n, app["emitted"] - app["t0"]),
        "published_events_per_s": _rate(n, app["published"] - app["t0"]),
        "end_to_end_events_per_s": rate,
        "end_to_end_s": round(seconds, 3),
        # A flood's visibility is its backlog over the drain rate: the last event waits for all before it.
        # Bounded by the backlog the SDK may hold (its max_buffer) and what JetStream holds, over this rate.
        "visibility_latency_under_flood": latency,
        "flood_visibility_bound_s_per_100k_backlog": round(100_000 / rate, 2) if rate else None,
    }


async def paced_sustained(env: BenchEnv, st: Stack, rate: float = 20_000.0, seconds: float = 10.0,
                          timeout_s: float = 120.0) -> dict[str, Any]:
    """Emit-to-visible latency at a sustained rate: an application process paced at `rate` events/s for
    `seconds`, every event's visibility measured."""
    n = int(rate * seconds)
    release = f"paced-{int(rate)}"
    app, visible, _ = await _app_run(env, st, n, timeout_s, rate, release)
    return {
        "events": n,
        "visible": visible,
        "complete": visible >= n,
        "target_events_per_s": rate,
        "emitted_events_per_s": _rate(n, app["emitted"] - app["t0"]),  # the pacing held if this is the target
        "dropped": app["dropped"],
        "failed": app["failed"],
        **await _latency(st, release),
    }


async def paced_latency(
    env: BenchEnv, st: Stack, n_before: int, probes: int = 200, rate: float = 200.0
) -> dict:
    """Emit-to-visible latency when the pipeline is not saturated (probes paced at `rate`/s)."""
    s = st.ctx.settings
    async with Client(env.nats_url, prefix=s.prefix, app="bench") as client:
        for _ in range(probes):
            client.emit(release="probe")
            await asyncio.sleep(1 / rate)  # pacing the load, not synchronisation
        await client.flush()
        await _wait_visible(st, n_before + probes, time.perf_counter() + 60)
    return {"probes": probes, "rate_per_s": rate, **await _latency(st, "probe")}


async def raw_jetstream(st: Stack, events: list[InferenceEvent]) -> dict[str, Any]:
    """Publish the same batches straight to a scratch stream, IN_FLIGHT acks pipelined."""
    js, prefix = st.ctx.bus.js, st.ctx.settings.prefix
    stream, subject = f"{prefix.upper()}_RAW_BENCH", f"{prefix}-raw.bench"
    await js.add_stream(name=stream, subjects=[subject])
    batches = [events[i : i + BATCH] for i in range(0, len(events), BATCH)]
    payloads = [(encode(b), batch_id(b)) for b in batches]
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(data: bytes, msg_id: str) -> None:
        try:
            await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id}, timeout=10)
        finally:
            slots.release()

    t0 = time.perf_counter()
    tasks = []
    for data, msg_id in payloads:
        await slots.acquire()
        tasks.append(asyncio.create_task(one(data, msg_id)))
    await asyncio.gather(*tasks)
    seconds = time.perf_counter() - t0
    stored = (await js.stream_info(stream)).state.messages
    await js.delete_stream(stream)
    return {
        "events_per_s": _rate(len(events), seconds),
        "messages": stored,
        "batch": BATCH,
        "in_flight": IN_FLIGHT,
        "bytes_per_event": round(sum(len(p[0]) for p in payloads) / len(events)),
    }


async def raw_clickhouse(st: Stack, events: list[InferenceEvent]) -> dict[str, Any]:
    """Column-oriented inserts of the same rows into a scratch copy of inference_events."""
    from lockgate.services.sink.domain import redaction
    from lockgate.store.tables import INFERENCE_EVENTS

    store = st.ctx.store
    out: dict[str, Any] = {}
    for rows_per_insert in (BATCH, 20_000):
        table = f"inference_events_raw_{rows_per_insert}"
        store.command(f"CREATE TABLE IF NOT EXISTS {table} AS inference_events")
        scrub = redaction(st.ctx.settings.redact)
        chunks = [
            INFERENCE_EVENTS.data(events[i : i + rows_per_insert],
                                  {"msg_id": [f"raw-{i}"] * len(events[i : i + rows_per_insert]),
                                   "served": [False] * len(events[i : i + rows_per_insert])},
                                  scrub)
            for i in range(0, len(events), rows_per_insert)
        ]
        t0 = time.perf_counter()
        for k, cols in enumerate(chunks):
            await store.ainsert_columns(table, INFERENCE_EVENTS.columns, cols, token=f"raw-{rows_per_insert}-{k}")
        seconds = time.perf_counter() - t0
        assert store.scalar(f"SELECT count() FROM {table}") == len(events)
        store.command(f"DROP TABLE {table}")
        out[f"rows_per_s_at_{rows_per_insert}_rows_per_insert"] = _rate(len(events), seconds)
    return out


async def run(env: BenchEnv, n: int = 200_000, timeout_s: float = 300.0, paced_rate: float = 20_000.0,
              paced_s: float = 10.0) -> dict[str, Any]:
    """Ingest figures: end-to-end events/s and visibility latency, with raw NATS and chDB rates."""
    async with stack(env, "sink") as st:
        e2e = await end_to_end(env, st, n, timeout_s)
        e2e["visibility_latency_paced"] = await paced_latency(env, st, e2e["visible"])
        e2e["visibility_latency_paced_20k"] = await paced_sustained(env, st, paced_rate, paced_s)
        same_rows = [InferenceEvent(app="bench", **fields(i)) for i in range(n)]
        js = await raw_jetstream(st, same_rows)
        ch = await raw_clickhouse(st, same_rows)
    rate = e2e["end_to_end_events_per_s"]
    # The same run's raw limits: what share of each the whole path achieves.
    ratio = {"over_raw_chdb_insert_at_20000": round(rate / ch["rows_per_s_at_20000_rows_per_insert"], 3),
             "over_raw_jetstream_publish": round(rate / js["events_per_s"], 3)}
    return {"bench": "ingest", "end_to_end": e2e, "raw_jetstream_publish": js, "raw_clickhouse_insert": ch,
            "end_to_end_over_raw": ratio}


async def _main(n: int, paced_rate: float, paced_s: float) -> None:
    async with bench_env() as env:
        print(json.dumps(await run(env, n, paced_rate=paced_rate, paced_s=paced_s), indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000, help="events in the flood")
    parser.add_argument("--paced-rate", type=float, default=20_000.0, help="events/s of the sustained paced run")
    parser.add_argument("--paced-seconds", type=float, default=10.0, help="length of the sustained paced run")
    args = parser.parse_args()
    asyncio.run(_main(args.events, args.paced_rate, args.paced_seconds))
