"""Router bench: added latency over a zero-latency simulator, and gate-decision reaction time.

The simulator and the load generator run in their own processes, so the figures show the
router's cost and not three servers sharing one event loop. Run alone:
`python -m tests.bench.bench_router` (prints JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

import aiohttp

from lockgate.contracts import GateDecided
from lockgate.server.apikeys import bootstrap
from lockgate.signing import Signer, trust_file_path, trust_key
from tests.bench.common import BenchEnv, bench_env, percentiles, sim_process, stack
from tests.helpers import break_glass, register_model_release

N_REQUESTS = 3000
CONCURRENCY = 8
TRIALS = 50
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


async def _load(session: aiohttp.ClientSession, url: str, n: int, concurrency: int) -> tuple[list[float], float]:
    """n requests from `concurrency` workers; per-request ms and total seconds."""
    samples: list[float] = []
    todo = iter(range(n))

    async def worker(w: int) -> None:
        for i in todo:
            body = {**BODY, "user": f"u{w}-{i}"}
            t0 = time.perf_counter()
            async with session.post(f"{url}/chat/completions", json=body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
            samples.append((time.perf_counter() - t0) * 1000.0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return samples, time.perf_counter() - t0


def _sim_process(env: BenchEnv) -> contextlib.AbstractAsyncContextManager[str]:
    return sim_process(env, "models:\n  m:\n    default: fine thanks\n")


async def _remote_load(url: str, n: int, concurrency: int = CONCURRENCY) -> tuple[list[float], float]:
    """Run the load generator in a child process so its CPU does not slow the router."""
    # The router takes only lockgate API keys (the simulator ignores the header): authentication is on
    # in the measured path, as in production.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.bench_router", "--load", url, str(n), str(concurrency),
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "LOCKGATE_BENCH_KEY": _KEY.get("admin", "")})
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError("load generator failed")
    data = json.loads(out)
    return data["samples"], data["seconds"]


_KEY: dict[str, str] = {}


async def _overhead(env: BenchEnv) -> dict[str, Any]:
    _KEY["admin"] = bootstrap(env.home).admin_key
    async with _sim_process(env) as sim_url, stack(env, "router", stable_upstream=sim_url) as st:
        router = st.services["router"]
        await _remote_load(sim_url, 300)  # warm-up
        await _remote_load(router.url + "/v1", 300)
        out: dict[str, Any] = {"requests": N_REQUESTS}
        # Concurrency 1 is the latency the router adds to one call; concurrency 8 (LiteLLM's
        # published comparison point) adds queueing on the router's single event loop.
        for concurrency in (1, CONCURRENCY):
            direct, _ = await _remote_load(sim_url, N_REQUESTS, concurrency)
            cpu0 = time.process_time()
            routed, seconds = await _remote_load(router.url + "/v1", N_REQUESTS, concurrency)
            cpu = time.process_time() - cpu0  # this process runs only the router (sim and load are children)
            d, r = percentiles(direct), percentiles(routed)
            out[f"concurrency_{concurrency}"] = {
                "direct": d,
                "routed": r,
                "overhead_p50_ms": round(r["p50_ms"] - d["p50_ms"], 3),
                "overhead_p99_ms": round(r["p99_ms"] - d["p99_ms"], 3),
                "routed_rps": round(N_REQUESTS / seconds, 1),
                "router_cpu_per_request_ms": round(cpu * 1000.0 / N_REQUESTS, 3),
            }
        out["events_published"] = router.batcher.sent
        out["events_dropped"] = router.batcher.dropped
        return out


async def _reaction(env: BenchEnv, session: aiohttp.ClientSession) -> dict[str, Any]:
    async with stack(env, "router") as st:
        router, bus = st.services["router"], st.ctx.bus
        signer = Signer.generate()  # the router acts only on decisions signed by a key its trust file holds
        trust_key(trust_file_path(st.ctx.settings), signer.public)
        samples: list[float] = []
        await register_model_release(bus, "base")
        for i in range(TRIALS):
            release = f"rel-{i}"
            await register_model_release(bus, release)  # a rollout names registered releases only
            # Never gated: only an admin's break-glass gives it a weight (admission holds in the bench too).
            payload = {"stable_release": "base", "canary_release": release, "initial_weight": 50,
                       "break_glass": break_glass(st.ctx.settings, "bench", release, "canary", "bench")}
            async with session.put(f"{router.url}/lockgate/v1/deployments/bench", json=payload) as resp:
                assert resp.status == 200, await resp.text()
            decision = signer.sign(GateDecided(release=release, decision="BLOCK", rules=[]))
            t0 = time.perf_counter()
            await bus.publish(bus.subjects.gate_decided(release), decision)
            await router.rollouts.wait_for(lambda routes, rel=release: routes["bench"].canary.release == rel
                                           and routes["bench"].weight == 0.0, timeout=10)
            samples.append((time.perf_counter() - t0) * 1000.0)
        return {"trials": TRIALS, **percentiles(samples)}


async def run(env: BenchEnv) -> dict[str, Any]:
    """Router overhead vs. direct calls, and gate decision -> weight change latency."""
    overhead = await _overhead(env)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {bootstrap(env.home).admin_key}"}) as session:
        reaction = await _reaction(env, session)
    return {"overhead": overhead, "decision_to_weight": reaction}


async def _load_main(url: str, n: int, concurrency: int) -> None:
    headers = {"Authorization": f"Bearer {os.environ.get('LOCKGATE_BENCH_KEY', '')}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), headers=headers) as session:
        samples, seconds = await _load(session, url, n, concurrency)
    print(json.dumps({"samples": samples, "seconds": seconds}))


async def _main() -> None:
    async with bench_env() as env:
        print(json.dumps(await run(env), indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--load":
        asyncio.run(_load_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    else:
        asyncio.run(_main())
