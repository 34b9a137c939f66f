"""Evaluator bench: throughput and overhead per case at concurrency 64 against a 50 ms simulated upstream.

overhead per case (ms) = (evaluator wall - bare HTTP client wall) / cases, both against the same
simulator at the same concurrency: what the evaluator adds per case on top of making the call
(scoring, cache, progress, per-case rows, statistics, NATS). Also reported: the bench process's CPU
time per case, and `lane_overhead_ms` = (wall - ideal) * concurrency / cases, the time each of the 64
lanes spends per case beyond the upstream's 50 ms (this includes the HTTP client and the simulator's
own queueing, so it is an upper bound). The simulator runs in a child process so its CPU is not
charged to the evaluator. Run alone: `python -m tests.bench.bench_evaluator` (prints JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import aiohttp

from lockgate import artifacts
from lockgate.codec import Codec
from lockgate.contracts import EvalCompleted, EvalRequested
from lockgate.ids import uuid7
from tests.bench.common import BenchEnv, bench_env, sim_process, stack

CASES = 1000
CONCURRENCY = 64
LATENCY_MS = 50.0


def _sim_process(env: BenchEnv) -> contextlib.AbstractAsyncContextManager[str]:
    return sim_process(env, f"models:\n  m:\n    default: answer\n    latency_ms: {LATENCY_MS}\n")


async def _direct(url: str) -> float:
    """The same calls from a bare aiohttp loop: what the simulator and HTTP alone cost."""
    body = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    todo = iter(range(CASES))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:

        async def lane() -> None:
            for _ in todo:
                async with session.post(f"{url}/chat/completions", json=body) as resp:
                    await resp.read()

        t0 = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))
        return time.perf_counter() - t0


async def _eval_once(env: BenchEnv, url: str, cache: bool) -> dict[str, Any]:
    # the query service answers the evaluator's reads (resume, baseline); the sink stores its cases
    async with stack(env, "sink", "query", "evaluator", eval_cache=cache) as st:
        bus = st.ctx.bus
        cases = [{"id": str(i), "input": f"question {i}", "expected": "answer"} for i in range(CASES)]
        suite = await artifacts.register(bus, "eval_suite", "bench", {
            "name": "bench", "prompt": {"template": "{input}"}, "dataset": cases,
            "scorers": [{"name": "exact_match", "weight": 2}, "token_f1"]})
        done: asyncio.Future[EvalCompleted] = asyncio.get_running_loop().create_future()
        codec: Codec[EvalCompleted] = Codec(EvalCompleted)
        run_id = uuid7()

        async def on(msg: Any) -> None:
            event = codec.decode(msg.data)
            if event.run_id == run_id and not done.done():
                done.set_result(event)

        sub = await bus.nc.subscribe(bus.subjects.eval_completed, cb=on)
        t0, cpu0 = time.perf_counter(), time.process_time()
        await bus.publish(bus.subjects.eval_requested, EvalRequested(
            run_id=run_id, release="bench", suite=suite.hash, endpoint=url, model="m", concurrency=CONCURRENCY))
        event = await asyncio.wait_for(done, 120)
        await _cases_stored(st, run_id)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        await sub.unsubscribe()
        if event.n_cases != CASES or event.n_errors:
            raise RuntimeError(f"bench run incomplete: {event.n_cases} cases, {event.n_errors} errors")
        return {"wall_s": wall, "cpu_s": cpu}


async def _cases_stored(st: Any, run_id: str) -> None:
    """Wait until the sink has stored every case of the run (checked after each batch it stores)."""
    progress = st.services["sink"].handlers.progress("eval_cases")
    sql = "SELECT count() FROM eval_cases WHERE run_id = {r:String}"
    while True:
        seen = progress.count  # read before the count, so a batch stored in between is not missed
        if await asyncio.to_thread(st.ctx.store.scalar, sql, {"r": run_id}) >= CASES:
            return
        await progress.wait_for(seen + 1, 60)


def _figures(wall: float, reference: float | None = None, cpu: float | None = None) -> dict[str, float]:
    ideal = CASES / CONCURRENCY * LATENCY_MS / 1000.0
    out = {"wall_s": round(wall, 3), "ideal_wall_s": round(ideal, 3), "cases_per_s": round(CASES / wall, 1),
           "lane_overhead_ms": round((wall - ideal) * 1000.0 * CONCURRENCY / CASES, 3)}
    if reference is not None:
        out["overhead_per_case_ms"] = round((wall - reference) * 1000.0 / CASES, 3)
    if cpu is not None:
        out["cpu_per_case_ms"] = round(cpu * 1000.0 / CASES, 3)
    return out


async def run(env: BenchEnv) -> dict[str, Any]:
    """Cases/s, wall vs ideal, and overhead per case, with the cache off and on, plus a bare-HTTP reference."""
    async with _sim_process(env) as url:
        await _direct(url)  # warm-up
        direct = await _direct(url)
        off = await _eval_once(env, url, cache=False)
        on = await _eval_once(env, url, cache=True)
    return {
        "cases": CASES, "concurrency": CONCURRENCY, "upstream_latency_ms": LATENCY_MS,
        "evaluator": _figures(off["wall_s"], direct, off["cpu_s"]),
        "evaluator_with_cache_writes": _figures(on["wall_s"], direct, on["cpu_s"]),
        "bare_http_reference": _figures(direct),
        "note": "wall is publish of EvalRequested to every case stored by the sink (includes statistics and storage)",
    }


async def _main() -> None:
    async with bench_env() as env:
        print(json.dumps(await run(env), indent=2))


if __name__ == "__main__":
    asyncio.run(_main())
