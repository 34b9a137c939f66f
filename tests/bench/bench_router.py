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
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from lockgate.contracts import DriftReport, FeatureDrift, GateDecided
from lockgate.server.apikeys import bootstrap
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.bench import loadgen
from tests.bench.common import SIM_PIDS, BenchEnv, bench_env, percentiles, sim_process, stack
from tests.helpers import (
    Process,
    break_glass,
    gate_decided,
    printed_endpoints,
    register_model_release,
    store_decision,
    store_pass,
)

N_REQUESTS = 3000
CONCURRENCY = 8
CONCURRENCIES = (1, 8, 32)
TRIALS = 50
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


def _sim_process(env: BenchEnv) -> contextlib.AbstractAsyncContextManager[str]:
    return sim_process(env, "models:\n  m:\n    default: fine thanks\n")


async def _remote_load(url: str, n: int, concurrency: int = CONCURRENCY, stream: bool = False) -> loadgen.Load:
    """The load generator in a child process, so its CPU does not slow the router."""
    # The router takes only lockgate API keys (the simulator ignores the header): authentication is on
    # in the measured path, as in production.
    return await loadgen.remote(url, _KEY.get("admin", ""), n, concurrency, stream)


_KEY: dict[str, str] = {}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


@contextlib.asynccontextmanager
async def _served_router(env: BenchEnv, upstream: str, tree: str = "") -> AsyncIterator[tuple[str, int]]:
    """`lockgate serve router` in its own process, as deployed: API keys, events, tracing at the
    default sampling, its own event loop and CPU; yields its URL and pid. `tree`: another checkout's
    code (its shared/ and dev/ first on the path), for a side-by-side comparison."""
    settings = env.settings()
    # The proxy hop as measured since the start: the default deployment passes the client's model through
    # (an older checkout `tree` ignores the setting it does not know, and passed through anyway).
    environ = {**os.environ, "LOCKGATE_NATS_URL": settings.nats_url, "LOCKGATE_PREFIX": settings.prefix,
               "LOCKGATE_HOME": env.home, "LOCKGATE_STABLE_UPSTREAM": upstream,
               "LOCKGATE_CANARY_UPSTREAM": upstream, "LOCKGATE_PASSTHROUGH": "true"}
    if tree:
        environ["PYTHONPATH"] = f"{tree}/shared{os.pathsep}{tree}/dev"
    # Ready once it printed its endpoint (the line after "serving").
    served = Process([sys.executable, "-m", "lockgate.cli", "serve", "router", "--router-port", "0"], environ,
                     "http://")
    try:
        if not await asyncio.to_thread(served.started, 60):
            raise RuntimeError(f"router did not start:\n{served.output}")
        yield printed_endpoints(served.output)["router"], served.proc.pid
    finally:
        served.proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(served.proc.wait, 30)


async def _overhead(env: BenchEnv) -> dict[str, Any]:
    _KEY["admin"] = bootstrap(env.home).admin_key
    async with _sim_process(env) as sim_url, _served_router(env, sim_url) as (router_url, pid):
        sim_pid = SIM_PIDS[sim_url]
        await _remote_load(sim_url, 300)  # warm-up
        await _remote_load(router_url + "/v1", 300)
        out: dict[str, Any] = {"requests": N_REQUESTS, "router": "lockgate serve router (own process, uvloop)",
                               "governance": "API key auth, one inference event per request, tracing at "
                                             "the default tail-aware sampling",
                               "idle_rss_mib": _rss_mib(pid)}
        # Concurrency 1 is the latency the router adds to one call; 8 is LiteLLM's published
        # comparison point; 32 queues on the router's single event loop and shows its peak rate.
        for concurrency in CONCURRENCIES:
            direct = (await _remote_load(sim_url, N_REQUESTS, concurrency)).samples
            cpu0, sim0 = _cpu_s(pid), _cpu_s(sim_pid)
            routed, seconds, load_cpu = await _remote_load(router_url + "/v1", N_REQUESTS, concurrency)
            cpu, sim_cpu = _cpu_s(pid) - cpu0, _cpu_s(sim_pid) - sim0
            d, r = percentiles(direct), percentiles(routed)
            out[f"concurrency_{concurrency}"] = {
                "direct": d,
                "routed": r,
                "overhead_p50_ms": round(r["p50_ms"] - d["p50_ms"], 3),
                "overhead_p99_ms": round(r["p99_ms"] - d["p99_ms"], 3),
                "routed_rps": round(N_REQUESTS / seconds, 1),
                "router_cpu_per_request_ms": round(cpu * 1000.0 / N_REQUESTS, 3),
                # The rest of the two cores' work per routed request: the simulator's and the client's.
                "simulator_cpu_per_request_ms": round(sim_cpu * 1000.0 / N_REQUESTS, 3),
                "load_generator_cpu_per_request_ms": round(load_cpu * 1000.0 / N_REQUESTS, 3),
            }
        out["max_rps"] = max(out[f"concurrency_{c}"]["routed_rps"] for c in CONCURRENCIES)
        direct = (await _remote_load(sim_url, N_REQUESTS, CONCURRENCY, stream=True)).samples
        cpu0 = _cpu_s(pid)
        routed = (await _remote_load(router_url + "/v1", N_REQUESTS, CONCURRENCY, stream=True)).samples
        cpu = _cpu_s(pid) - cpu0
        d, r = percentiles(direct), percentiles(routed)
        out["stream_first_event_concurrency_8"] = {
            "direct": d, "routed": r, "added_p50_ms": round(r["p50_ms"] - d["p50_ms"], 3),
            "added_p99_ms": round(r["p99_ms"] - d["p99_ms"], 3),
            "router_cpu_per_request_ms": round(cpu * 1000.0 / N_REQUESTS, 3)}
        out["loaded_rss_mib"] = _rss_mib(pid)
        return out


async def paired(env: BenchEnv, tree: str, rounds: int = 5, n: int = N_REQUESTS) -> dict[str, Any]:
    """This checkout's router (A) and another checkout's (B, e.g. the commit before a change), both
    served at once against one simulator, load rounds at concurrency 8 and 32 (and 8 streamed) alternating
    A B, B A, ...: a machine busy with other work slows both alike. Added latency (concurrency 8) is over
    the direct calls of the same rounds (streamed: to the first event); CPU per request is each router
    process's own (user + system from /proc, the median over rounds, which a shared machine disturbs less
    than latency)."""
    _KEY["admin"] = bootstrap(env.home).admin_key
    async with _sim_process(env) as sim_url, _served_router(env, sim_url) as (a_url, a_pid), \
            _served_router(env, sim_url, tree) as (b_url, b_pid):
        routers = {"A": (a_url + "/v1", a_pid), "B": (b_url + "/v1", b_pid)}
        for url, _ in routers.values():
            await _remote_load(url, 300)  # warm-up
        # (concurrency, streamed): 8 and 32 as whole answers, 8 streamed (latency to the first event)
        loads = ((8, False), (32, False), (8, True))
        direct: dict[bool, list[float]] = {False: [], True: []}
        samples: dict[tuple[str, bool], list[float]] = {(name, st): [] for name in routers for st in (False, True)}
        cpu: dict[tuple[str, int, bool], list[float]] = {(name, *load): [] for name in routers for load in loads}
        rps: dict[tuple[str, int, bool], list[float]] = {(name, *load): [] for name in routers for load in loads}
        for r in range(rounds):
            for streamed in (False, True):
                direct[streamed] += (await _remote_load(sim_url, n, stream=streamed)).samples
            for concurrency, streamed in loads:
                for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                    url, pid = routers[name]
                    cpu0 = _cpu_s(pid)
                    got, secs, _ = await _remote_load(url, n, concurrency, stream=streamed)
                    cpu[name, concurrency, streamed].append((_cpu_s(pid) - cpu0) * 1000.0 / n)
                    rps[name, concurrency, streamed].append(n / secs)
                    if concurrency == 8:
                        samples[name, streamed] += got
        d, ds = percentiles(direct[False]), percentiles(direct[True])
        out: dict[str, Any] = {"A": "this checkout", "B": tree, "rounds": rounds, "requests_per_round": n,
                               "direct": d, "direct_stream_first_event": ds}
        for name in ("A", "B"):
            p, ps = percentiles(samples[name, False]), percentiles(samples[name, True])
            out[name + "_figures"] = {
                "added_p50_ms_c8": round(p["p50_ms"] - d["p50_ms"], 3),
                "added_p99_ms_c8": round(p["p99_ms"] - d["p99_ms"], 3),
                "stream_first_event_added_p50_ms_c8": round(ps["p50_ms"] - ds["p50_ms"], 3),
                "stream_first_event_added_p99_ms_c8": round(ps["p99_ms"] - ds["p99_ms"], 3),
                **{f"rps_c{c}": round(statistics.median(rps[name, c, False]), 1) for c in (8, 32)},
                **{f"cpu_per_request_ms_c{c}": round(statistics.median(cpu[name, c, False]), 3) for c in (8, 32)},
                "cpu_per_streamed_request_ms_c8": round(statistics.median(cpu[name, 8, True]), 3)}
        return out


async def _shadow_overhead(env: BenchEnv) -> dict[str, Any]:
    """The request path's latency with a shadow rollout copying 10% of requests against one copying
    (practically) none: the copies are scheduled off the request path, so the users' p50/p99 should not
    move beyond noise (the copies still cost the router CPU, which shows at the higher percentiles)."""
    _KEY["admin"] = bootstrap(env.home).admin_key
    # passthrough: the warm-up before the first rollout is served as it always was
    async with _sim_process(env) as sim_url, stack(env, "router", stable_upstream=sim_url,
                                                   canary_upstream=sim_url, passthrough=True) as st:
        router, bus = st.services["router"], st.ctx.bus
        for release, endpoint in (("base", "default"), ("cand", "canary")):
            await register_model_release(bus, release, "m", endpoint)
            await store_pass(bus, release, st.ctx.settings)
        url = f"{router.url}/lockgate/v1/deployments/{st.ctx.settings.deployment}"
        out: dict[str, Any] = {"requests": N_REQUESTS, "concurrency": CONCURRENCY}
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {_KEY['admin']}"}) as session:
            await _remote_load(router.url + "/v1", 300)  # warm-up
            for label, sample in (("shadow_0pct", 1e-9), ("shadow_10pct", 0.1)):
                strategy = {"shadow": {"sample": sample, "max_rps": 10_000, "max_concurrency": 64}}
                async with session.put(url, json={"stable_release": "base", "canary_release": "cand",
                                                  "strategy": strategy}) as resp:
                    assert resp.status == 200, await resp.text()
                await router.rollouts.wait_for(lambda r: r[st.ctx.settings.deployment].phase == "progressing", 10)
                routed, seconds, _ = await _remote_load(router.url + "/v1", N_REQUESTS)
                budget = router.rollouts.shadow_budget(router.rollouts.route(st.ctx.settings.deployment))
                out[label] = {**percentiles(routed), "rps": round(N_REQUESTS / seconds, 1),
                              "mirrored": budget.sent if budget else 0}
        out["added_p50_ms"] = round(out["shadow_10pct"]["p50_ms"] - out["shadow_0pct"]["p50_ms"], 3)
        out["added_p99_ms"] = round(out["shadow_10pct"]["p99_ms"] - out["shadow_0pct"]["p99_ms"], 3)
        return out


async def _reaction(env: BenchEnv, session: aiohttp.ClientSession) -> dict[str, Any]:
    async with stack(env, "router") as st:
        router, bus = st.services["router"], st.ctx.bus
        signer = Signer.generate()  # the router acts only on decisions signed by a key its trust file holds
        trust_key(trust_file_path(st.ctx.settings), signer.public)
        samples: list[float] = []
        await register_model_release(bus, "base")
        await store_pass(bus, "base", st.ctx.settings)  # the stable a canary starts from serves by a decision
        for i in range(TRIALS):
            release = f"rel-{i}"
            await register_model_release(bus, release)  # a rollout names registered releases only
            # Never gated: only an admin's break-glass gives it a weight (admission holds in the bench too).
            payload = {"stable_release": "base", "canary_release": release, "initial_weight": 50,
                       "break_glass": break_glass(st.ctx.settings, "bench", release, "canary", "bench", weight=50)}
            async with session.put(f"{router.url}/lockgate/v1/deployments/bench", json=payload) as resp:
                assert resp.status == 200, await resp.text()
            decision = signer.sign(GateDecided(release=release, decision="BLOCK", rules=[]))
            await store_decision(bus, decision)  # current first, as the gatekeeper stores it: the router acts on that
            t0 = time.perf_counter()
            await bus.publish(bus.subjects.gate_decided(release), decision)
            await router.rollouts.wait_for(lambda routes, rel=release: routes["bench"].canary.release == rel
                                           and routes["bench"].weight == 0.0, timeout=10)
            samples.append((time.perf_counter() - t0) * 1000.0)
        return {"trials": TRIALS, **percentiles(samples)}


FAULT_TRIALS = 20
# Analysis as an operator would set it for a fast loop: 50 events per variant, a look every 50 ms over
# the last second, abort on the first failing look; `count` keeps a healthy canary at its step.
_FAULT_STRATEGY = {"steps": [50, 100], "interval_s": 0.05, "analysis": {
    "metrics": [{"name": "error_rate", "max_increase": 0.01}], "min_sample": 50, "count": 1_000_000,
    "inconclusive_limit": 1_000_000, "window_s": 1.0}}


async def _until_stopped(session: aiohttp.ClientSession, url: str, headers: dict[str, str], stop: asyncio.Event,
                         sent: list[int], worker: int) -> None:
    """One load worker: requests from distinct users until `stop`; `sent[0]` counts them all."""
    while not stop.is_set():
        body = {**BODY, "user": f"u{worker}-{sent[0]}"}
        sent[0] += 1
        async with session.post(url, json=body, headers=headers) as resp:
            await resp.read()


async def _fault_to_zero(env: BenchEnv, session: aiohttp.ClientSession) -> dict[str, Any]:
    """Time from an injected fault (the canary's upstream starts failing every call) to canary weight 0,
    under load at concurrency 8; and from a drift report to weight 0. The load runs in this process
    (the fault is injected into an in-process simulator), so it shares the router's event loop."""
    fault = ModelSpec(default="fine thanks")  # mutated in place: the simulator reads it per request
    config = SimConfig(models={"m": ModelSpec(default="fine thanks"), "c": fault})
    async with SimServer(config) as sim, stack(env, "router", stable_upstream=sim.url, canary_upstream=sim.url) as st:
        router, bus = st.services["router"], st.ctx.bus
        signer = Signer.generate()
        trust_key(trust_file_path(st.ctx.settings), signer.public)
        await register_model_release(bus, "base", "m", "default")
        await store_pass(bus, "base", st.ctx.settings)
        url = f"{router.url}/lockgate/v1/deployments/fault"
        headers = {"x-lockgate-deployment": "fault"}
        fault_ms: list[float] = []
        fault_requests: list[int] = []
        drift_ms: list[float] = []
        for i in range(FAULT_TRIALS * 2):
            release = f"c-{i}"
            arts = await register_model_release(bus, release, "c", "canary")
            analysed = i < FAULT_TRIALS
            strategy = _FAULT_STRATEGY if analysed else {"steps": [50, 100], "interval_s": 3600}
            async with session.put(url, json={"stable_release": "base", "canary_release": release,
                                              "strategy": strategy}) as resp:
                assert resp.status == 200, await resp.text()
            await gate_decided(bus, signer.sign(GateDecided(release=release, decision="PASS", rules=[], artifacts=arts)))
            await router.rollouts.wait_for(lambda r: r["fault"].phase == "progressing", timeout=10)
            if not analysed:
                now = datetime.now(UTC)
                # The canary's window against stable's: the one comparison that aborts a canary.
                report = DriftReport(served=True, deployment="fault", comparison="canary_vs_stable", release=release,
                                     reference_release="base", window_start=now, window_end=now, reference_n=500,
                                     current_n=500, drifted=True, features=[FeatureDrift(
                                         feature="output_tokens", psi=0.5, ks_stat=0.5, ks_pvalue=0.0,
                                         reference_mean=10, current_mean=30, drifted=True)])
                t0 = time.perf_counter()
                await bus.publish(bus.subjects.drift("fault"), report)
                await router.rollouts.wait_for(lambda r: r["fault"].weight == 0.0, timeout=10)
                drift_ms.append((time.perf_counter() - t0) * 1000.0)
                continue
            stop = asyncio.Event()
            sent = [0]
            workers = [asyncio.create_task(_until_stopped(session, f"{router.url}/v1/chat/completions", headers,
                                                          stop, sent, w)) for w in range(CONCURRENCY)]
            # A healthy baseline first: the canary has passed a look at its step.
            await router.rollouts.wait_for(lambda r: (a := r["fault"].analysis) is not None and a.last is not None
                                           and a.last.verdict == "SUCCESSFUL", timeout=30)
            before = sent[0]
            fault.error_rate = 1.0
            t0 = time.perf_counter()
            await router.rollouts.wait_for(lambda r: r["fault"].weight == 0.0, timeout=30)
            fault_ms.append((time.perf_counter() - t0) * 1000.0)
            fault_requests.append(sent[0] - before)
            stop.set()
            await asyncio.gather(*workers)
            fault.error_rate = 0.0
        return {"injected_fault_to_weight_0": {"trials": FAULT_TRIALS, "fault": "canary upstream fails every call",
                                               "analysis": "interval 50 ms (a due look taken as its evidence arrives), window 1 s, "
                                                           "min 50 events per variant",
                                               "requests_until_abort_p50": sorted(fault_requests)[len(fault_requests) // 2],
                                               **percentiles(fault_ms)},
                "drift_report_to_weight_0": {"trials": FAULT_TRIALS, **percentiles(drift_ms)}}


async def run(env: BenchEnv) -> dict[str, Any]:
    """Router overhead vs. direct calls, gate decision -> weight change, injected fault -> weight 0."""
    overhead = await _overhead(env)
    shadow = await _shadow_overhead(env)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {bootstrap(env.home).admin_key}"}) as session:
        reaction = await _reaction(env, session)
        closed_loop = await _fault_to_zero(env, session)
    return {"overhead": overhead, "shadow_overhead": shadow, "decision_to_weight": reaction, **closed_loop}


async def _main(tree: str = "") -> None:
    async with bench_env() as env:
        print(json.dumps(await (paired(env, tree) if tree else run(env)), indent=2))


if __name__ == "__main__":
    import uvloop  # the loop `lockgate up` and `lockgate serve` run on

    # `--paired TREE`: this checkout against TREE's code, side by side (see `paired`).
    uvloop.run(_main(sys.argv[2] if len(sys.argv) == 3 and sys.argv[1] == "--paired" else ""))
