"""Drift monitor bench (pure domain, no bus): events observed per second with and without text drift
(hashing vectoriser), and the cost of one report (500 against 500 rows, every feature's test, and with
texts the two permutation tests). Chat-like events: a 60-word prompt and a 120-word answer from a
3,000-word vocabulary, half of them canary traffic (so the canary-versus-stable windows fill too).
Run alone: `python -m tests.bench.bench_drift` (prints JSON)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from lockgate.contracts import InferenceEvent
from lockgate.services.drift import text
from lockgate.services.drift.domain import DriftMonitor

BATCHES, BATCH = 80, 64


def _events() -> list[list[InferenceEvent]]:
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(3000)]
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    return [[InferenceEvent(app="a", deployment="d", variant="canary" if i % 2 else "stable",
                            release="r2" if i % 2 else "r1", output_tokens=int(rng.integers(10, 200)),
                            input_tokens=50, latency_ms=float(rng.normal(300, 30)),
                            prompt=" ".join(rng.choice(vocab, 60)), response=" ".join(rng.choice(vocab, 120)),
                            time=t0 + timedelta(seconds=k * BATCH + i)) for i in range(BATCH)]
            for k in range(BATCHES)]


def measure() -> dict[str, Any]:
    """Figures for the monitor without and with text drift."""
    batches = _events()
    out: dict[str, Any] = {}
    for label, embedder in (("numeric_and_categorical", None), ("with_text_hashing", text.HASHING)):
        m = DriftMonitor(500, 500, 0.2, embedder=embedder)
        started = time.perf_counter()
        reports = sum(len(m.observe_events(b)) for b in batches)
        wall = time.perf_counter() - started
        started = time.perf_counter()
        m.report("d", m.windows["d"])
        out[label] = {"events_per_s": round(BATCHES * BATCH / wall), "reports": reports,
                      "one_report_ms": round((time.perf_counter() - started) * 1000, 1)}
    return out


async def run(env: Any = None) -> dict[str, Any]:
    """`make bench` entry: the measurement off the event loop."""
    return await asyncio.to_thread(measure)


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
