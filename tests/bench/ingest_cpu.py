"""End-to-end ingest with the CPU each side spends per event: the SDK's process (from the first emit
to the last acknowledgement, its imports left out), the sink's (the bench process, while it waits
for the events to be visible; split into its Python threads and chDB's), and nats-server's.

On a shared machine the events per second swing with the neighbours' load; the CPU time per event
barely does, so it says which side of the pipeline a change made cheaper. Runs on any checkout that
has tests/bench/bench_ingest.py (it reuses its event fields and stack), so it can be pointed at an
older one:

    python tests/bench/ingest_cpu.py --events 100000                       # this checkout
    python -m tests.bench.paired_ingest --a ../before --script tests/bench/ingest_cpu.py
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import resource
import time
from typing import Any

from tests.bench import bench_ingest as bi
from tests.bench.common import bench_env, stack


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def _kernel() -> tuple[float, int]:
    """(system CPU seconds, minor page faults) of this process: on this VM most of the system time is the
    kernel zeroing fresh pages (first touch of memory freed back to it: decoded batches, insert buffers)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_stime, usage.ru_minflt


_TICK = os.sysconf("SC_CLK_TCK")


def _stat_cpu_s(path: str) -> float:
    with open(path) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _threads_cpu_s() -> dict[str, float]:
    """This process's CPU by thread name: chDB names its threads (ThreadPool, MergeMutate, ...);
    Python's are all "python" (the event loop and the insert threads that run clickhouse-connect)."""
    out: collections.Counter[str] = collections.Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as fh:
                name = fh.read().strip()
            out["python" if name.startswith("python") else "chdb"] += _stat_cpu_s(f"/proc/self/task/{tid}/stat")
        except OSError:  # the thread ended meanwhile
            continue
    return dict(out)


def _nats_server_cpu_s() -> float:
    """CPU of the bench's nats-server (a child of this process)."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
            if "(nats-server)" in stat and int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                total += _stat_cpu_s(f"/proc/{pid}/stat")
        except (OSError, ValueError, IndexError):
            continue
    return total


def _emitter(nats_url: str, prefix: str, n: int, conn: Any) -> None:
    """The bench's application process, timing its own CPU."""
    from lockgate.client import Client

    async def go() -> None:
        client = Client(nats_url, prefix=prefix, app="bench", max_buffer=n, batch_size=bi.BATCH,
                        max_in_flight=bi.IN_FLIGHT)
        await client.start()
        conn.send("ready")
        conn.recv()
        cpu0, kernel0, t0 = _cpu_s(), _kernel(), time.time()
        for i in range(n):
            client.emit(**bi.fields(i))
            if i % 2000 == 1999:
                await asyncio.sleep(0)  # as the bench's emitter does: the sender publishes meanwhile
        cpu_emitted = _cpu_s()
        await client.flush()
        kernel = _kernel()
        conn.send({"t0": t0, "published": time.time(), "emit_cpu_s": cpu_emitted - cpu0, "cpu_s": _cpu_s() - cpu0,
                   "sys_s": kernel[0] - kernel0[0], "faults": kernel[1] - kernel0[1]})
        await client.close()

    asyncio.run(go())


async def run(n: int) -> dict[str, Any]:
    """One end-to-end run of n events; rates and CPU microseconds per event."""
    async with bench_env() as env, stack(env, "sink") as st:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_emitter, args=(env.nats_url, st.ctx.settings.prefix, n, child), daemon=True)
        proc.start()
        assert await asyncio.to_thread(parent.recv) == "ready"
        sink_cpu0, threads0, nats0, kernel0 = _cpu_s(), _threads_cpu_s(), _nats_server_cpu_s(), _kernel()
        parent.send("go")
        t0 = time.time()
        visible = await bi._wait_visible(st, n, time.perf_counter() + 300)
        seconds, sink_cpu, kernel = time.time() - t0, _cpu_s() - sink_cpu0, _kernel()
        threads = {k: v - threads0.get(k, 0.0) for k, v in _threads_cpu_s().items()}
        nats_cpu = _nats_server_cpu_s() - nats0
        app = await asyncio.to_thread(parent.recv)
        await asyncio.to_thread(proc.join, 30)
    return {
        "events": n,
        "complete": visible >= n,
        "end_to_end_events_per_s": round(visible / seconds),
        "published_events_per_s": round(n / (app["published"] - app["t0"])),
        "sdk_emit_cpu_us_per_event": round(app["emit_cpu_s"] / n * 1e6, 2),
        "sdk_cpu_us_per_event": round(app["cpu_s"] / n * 1e6, 2),
        "sink_cpu_us_per_event": round(sink_cpu / n * 1e6, 2),
        # of which Python (decode, columns, clickhouse-connect's Native encoding) and chDB's own threads
        "sink_python_cpu_us_per_event": round(threads.get("python", 0.0) / n * 1e6, 2),
        "sink_chdb_threads_cpu_us_per_event": round(threads.get("chdb", 0.0) / n * 1e6, 2),
        "nats_server_cpu_us_per_event": round(nats_cpu / n * 1e6, 2),
        # of the SDK's and the sink's CPU, the kernel's share and the fresh pages touched (see _kernel)
        "sdk_sys_cpu_us_per_event": round(app.get("sys_s", 0.0) / n * 1e6, 2),
        "sdk_minor_faults_per_event": round(app.get("faults", 0) / n, 3),
        "sink_sys_cpu_us_per_event": round((kernel[0] - kernel0[0]) / n * 1e6, 2),
        "sink_minor_faults_per_event": round((kernel[1] - kernel0[1]) / n, 3),
        "total_cpu_us_per_event": round((app["cpu_s"] + sink_cpu + nats_cpu) / n * 1e6, 2),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    print(json.dumps(asyncio.run(run(parser.parse_args().events)), indent=2))
