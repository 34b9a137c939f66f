"""`make bench`: run every benchmark against one real nats-server + chDB, print figures, write JSON.

Timing never decides a test; these figures are reported, with the machine they came from.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from tests.bench.common import bench_env

BENCHES = ["bench_ingest", "bench_otlp", "bench_router", "bench_stacks", "bench_online_eval", "bench_evaluator",
           "bench_schema", "bench_provenance", "bench_cluster", "bench_drift", "bench_spool"]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    mem_gib = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:  # Linux only
        mem_gib = round(int(fh.readline().split()[1]) / 1024 / 1024, 1)
    return {"cpus": os.cpu_count(), "memory_gib": mem_gib, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.machine()}


def _print(name: str, figures: dict[str, Any], indent: str = "  ") -> None:
    for key, value in figures.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print(name, value, indent + "  ")
        else:
            print(f"{indent}{key}: {value:,.3f}" if isinstance(value, float) else f"{indent}{key}: {value}")


def _read(out: Path) -> dict[str, Any]:
    return json.loads(out.read_text()) if out.exists() else {}


def _write(out: Path, results: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")


async def main(out: Path, only: list[str], merge: bool = False) -> int:
    results: dict[str, Any] = {"machine": machine(), "command": "make bench",
                               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "benches": {}}
    if merge and (kept := await asyncio.to_thread(_read, out)):
        # Re-measure some benches, keep the others' figures (each stamped with when it ran).
        results["benches"] = kept.get("benches", {})
        results["note"] = (kept.get("note", "") + f"; {', '.join(only or BENCHES)} re-measured at "
                           f"{results['started']} (`python -m tests.bench.run --merge`)").lstrip("; ")
    failed = 0
    async with bench_env() as env:
        for name in only or BENCHES:
            try:
                module = importlib.import_module(f"tests.bench.{name}")
            except ModuleNotFoundError:
                continue
            print(f"\n== {name}", flush=True)
            started = time.perf_counter()
            try:
                figures = await module.run(env)
            except Exception:
                traceback.print_exc()
                results["benches"][name] = {"error": traceback.format_exc(limit=3)}
                failed += 1
                continue
            figures["wall_s"] = round(time.perf_counter() - started, 2)
            figures["measured"] = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
            results["benches"][name] = figures
            _print(name, figures)
    await asyncio.to_thread(_write, out, results)
    print(f"\nwrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    parser.add_argument("only", nargs="*", help="bench module names (default: all)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other benches' figures already in --out (re-measure only these)")
    args = parser.parse_args()
    import uvloop  # the loop `lockgate up` and `lockgate serve` run on

    sys.exit(uvloop.run(main(args.out, args.only, args.merge)))
