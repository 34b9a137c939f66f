"""Online evaluation bench: the router's added latency with the evaluator scoring 10% of live answers
against 0%, in the same run, side by side (the request path must not pay for online evaluation).

The router runs as deployed (`lockgate serve router`, its own process), the simulator and the load
generator in their own processes, the evaluator in this one, consuming the router's inference events.
Rounds alternate 0% and 10%, so a drift of the machine's load hits both alike. Run alone:
`python -m tests.bench.bench_online_eval` (prints JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
from collections.abc import AsyncIterator
from typing import Any

from lockgate.config import Settings
from lockgate.server.apikeys import bootstrap
from tests.bench import bench_router
from tests.bench.common import BenchEnv, bench_env, percentiles, sim_process, stack
from tests.helpers import Process, printed_endpoints

N_REQUESTS = 1000  # per round
ROUNDS = 8  # per rate
CONCURRENCY = 8
RATES = (0.0, 0.1)


@contextlib.asynccontextmanager
async def _router(env: BenchEnv, settings: Settings, upstream: str) -> AsyncIterator[tuple[str, int]]:
    """`lockgate serve router` on `settings`' prefix, so the evaluator here reads its events."""
    environ = {**os.environ, "LOCKGATE_NATS_URL": settings.nats_url, "LOCKGATE_PREFIX": settings.prefix,
               "LOCKGATE_HOME": env.home, "LOCKGATE_STABLE_UPSTREAM": upstream, "LOCKGATE_CANARY_UPSTREAM": upstream,
               "LOCKGATE_PASSTHROUGH": "true"}  # the default deployment, no rollout: as the router bench measures
    served = Process([sys.executable, "-m", "lockgate.cli", "serve", "router", "--router-port", "0"], environ,
                     "http://")
    try:
        if not await asyncio.to_thread(served.started, 60):
            raise RuntimeError(f"router did not start:\n{served.output}")
        yield printed_endpoints(served.output)["router"], served.proc.pid
    finally:
        served.proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(served.proc.wait, 30)


async def run(env: BenchEnv) -> dict[str, Any]:
    """Added latency (routed minus direct) at concurrency 8 with online evaluation at 0% and 10%."""
    bench_router._KEY["admin"] = bootstrap(env.home).admin_key
    settings = env.settings()
    samples: dict[float, dict[str, list[float]]] = {r: {"direct": [], "routed": []} for r in RATES}
    per_round: dict[float, list[tuple[float, float]]] = {r: [] for r in RATES}  # (added p50, added p99)
    scored = {r: 0 for r in RATES}
    cpu = {r: 0.0 for r in RATES}  # the router process's CPU seconds: its work per request, which load elsewhere moves little
    load = [round(os.getloadavg()[0], 2)]
    async with sim_process(env, "models:\n  m:\n    default: fine thanks\n") as sim_url, \
            _router(env, settings, sim_url) as (router_url, pid):
        await bench_router._remote_load(router_url + "/v1", 300)  # warm-up
        for _ in range(ROUNDS):
            for rate in RATES:
                async with stack(env, "evaluator", prefix=settings.prefix, database=settings.database,
                                 online_eval_sample=rate) as st:
                    evaluator = st.services["evaluator"]
                    direct = (await bench_router._remote_load(sim_url, N_REQUESTS, CONCURRENCY)).samples
                    cpu0 = bench_router._cpu_s(pid)
                    routed = (await bench_router._remote_load(router_url + "/v1", N_REQUESTS, CONCURRENCY)).samples
                    cpu[rate] += bench_router._cpu_s(pid) - cpu0
                    samples[rate]["direct"] += direct
                    samples[rate]["routed"] += routed
                    d, r = percentiles(direct), percentiles(routed)
                    per_round[rate].append((r["p50_ms"] - d["p50_ms"], r["p99_ms"] - d["p99_ms"]))
                    # The scores of this round, so the 10% rounds are measured with the evaluator at work.
                    expected = int(N_REQUESTS * rate * 0.8)
                    if expected:
                        await evaluator.online.scored.wait_for(expected, timeout_s=120)
                    scored[rate] += evaluator.online.scored.count
        load.append(round(os.getloadavg()[0], 2))
    out: dict[str, Any] = {"requests_per_rate": N_REQUESTS * ROUNDS, "concurrency": CONCURRENCY,
                           "rounds": ROUNDS, "scorers": list(Settings().online_eval_scorers),
                           "router": "lockgate serve router (own process); evaluator consuming its events",
                           "load_average_1m_before_after": load}
    for rate in RATES:
        d, r = percentiles(samples[rate]["direct"]), percentiles(samples[rate]["routed"])
        out[f"sample_{int(rate * 100)}pct"] = {
            "direct": d, "routed": r, "added_p50_ms": round(r["p50_ms"] - d["p50_ms"], 3),
            "added_p99_ms": round(r["p99_ms"] - d["p99_ms"], 3),
            # Each round's own added latency, then the median over rounds: a burst of load elsewhere on the
            # machine moves one round, not the figure.
            "median_round_added_p50_ms": round(statistics.median(a for a, _ in per_round[rate]), 3),
            "median_round_added_p99_ms": round(statistics.median(b for _, b in per_round[rate]), 3),
            "router_cpu_per_request_ms": round(cpu[rate] * 1000.0 / (N_REQUESTS * ROUNDS), 3),
            "answers_scored": scored[rate]}
    off, on = out["sample_0pct"], out["sample_10pct"]
    out["difference_10pct_minus_0pct"] = {
        k: round(on[k] - off[k], 3) for k in ("added_p50_ms", "added_p99_ms", "median_round_added_p50_ms",
                                              "median_round_added_p99_ms", "router_cpu_per_request_ms")}
    return out


async def _main() -> None:
    async with bench_env() as env:
        print(json.dumps(await run(env), indent=2))


if __name__ == "__main__":
    import uvloop  # the loop `lockgate up` and `lockgate serve` run on

    uvloop.run(_main())
