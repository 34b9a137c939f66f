"""Side-by-side ingest figures of two checkouts on one (noisy, shared) machine.

Runs `python -m tests.bench.bench_ingest --events N` alternately in checkout A and checkout B (each
with its own .venv), so that whatever else loads the machine falls on both alike, and prints the
median and range of each figure per checkout. Only a comparison made this way means anything on a
shared machine; a lone figure from another hour does not.

    python -m tests.bench.paired_ingest --a /path/to/before --b . --pairs 4 --events 200000

With `--script tests/bench/ingest_cpu.py` each run is that script instead (this checkout's copy, run
in each checkout), and every number it prints is summarised (CPU per event of the SDK and the sink).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

FIGURES = {
    "e2e": ("end_to_end", "end_to_end_events_per_s"),
    "emit": ("end_to_end", "emit_events_per_s"),
    "published": ("end_to_end", "published_events_per_s"),
    "flood_p99_ms": ("end_to_end", "visibility_latency_under_flood", "p99_ms"),
    "paced_p99_ms": ("end_to_end", "visibility_latency_paced", "p99_ms"),
    "paced20k_emitted": ("end_to_end", "visibility_latency_paced_20k", "emitted_events_per_s"),
    "paced20k_p50_ms": ("end_to_end", "visibility_latency_paced_20k", "p50_ms"),
    "paced20k_p99_ms": ("end_to_end", "visibility_latency_paced_20k", "p99_ms"),
}


def run_once(tree: Path, python: Path | None, events: int, script: Path | None = None,
             extra: list[str] | None = None) -> dict[str, float]:
    """One bench run in `tree` (its own code first on the path, so a copy of a checkout can borrow
    another's .venv); its figures by short name."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(tree / p) for p in ("", "shared", "dev"))}
    bench = [str(script)] if script else ["-m", "tests.bench.bench_ingest"]
    out = subprocess.run([str(python or tree / ".venv/bin/python"), *bench, "--events", str(events), *(extra or [])],
                         cwd=tree,
                         env=env, capture_output=True, text=True, check=True, timeout=900)
    result = json.loads(out.stdout[out.stdout.index("{"):])
    if script:  # a flat result: every number is a figure
        return {k: v for k, v in result.items() if isinstance(v, int | float)}
    figures = {}
    for name, path in FIGURES.items():
        value = result
        for key in path:
            value = value.get(key, {}) if isinstance(value, dict) else {}
        if isinstance(value, int | float):  # a figure an older checkout's bench does not have is left out
            figures[name] = value
    figures["complete"] = result["end_to_end"]["complete"]
    return figures


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def summary(runs: list[dict[str, float]]) -> dict[str, str]:
    """Median [min-max] of each figure."""
    out = {}
    for name in runs[0]:
        values = [r[name] for r in runs]
        out[name] = f"{_fmt(statistics.median(values))} [{_fmt(min(values))}-{_fmt(max(values))}]"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=Path, required=True, help="first checkout (e.g. the baseline)")
    parser.add_argument("--b", type=Path, default=Path("."), help="second checkout (default: this one)")
    parser.add_argument("--a-python", type=Path, help="interpreter for A (default: A's .venv)")
    parser.add_argument("--b-python", type=Path, help="interpreter for B (default: B's .venv)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--script", type=Path, help="a bench script to run instead of tests.bench.bench_ingest")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--paced-rate", type=float, help="events/s of bench_ingest's sustained paced run")
    args = parser.parse_args()
    extra = ["--paced-rate", str(args.paced_rate)] if args.paced_rate else []
    runs: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    for i in range(args.pairs):
        # Alternate which goes first, so neither always runs on the warmer (or busier) half of a pair.
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        for side in order:
            try:
                figures = run_once(getattr(args, side).resolve(), getattr(args, f"{side}_python"), args.events,
                                   args.script.resolve() if args.script else None, extra)
            except subprocess.CalledProcessError as exc:  # one failed run is reported, not the whole comparison lost
                print(json.dumps({"pair": i, "side": side, "failed": exc.stderr[-2000:]}), file=sys.stderr, flush=True)
                continue
            runs[side].append(figures)
            print(json.dumps({"pair": i, "side": side, **figures}), file=sys.stderr, flush=True)
    print(json.dumps({"a": str(args.a), "b": str(args.b), "pairs": args.pairs, "events": args.events,
                      "a_runs": runs["a"], "b_runs": runs["b"],
                      "a_median_range": summary(runs["a"]), "b_median_range": summary(runs["b"])}, indent=2))


if __name__ == "__main__":
    main()
