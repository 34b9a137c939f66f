"""Whether a rerun reproduced a stored eval run (pure): per metric, do the two 95% intervals overlap; and
which parts of the captured environment differ between the two.

Two runs of the same suite on the same model agree on a metric when their intervals share a point: each
interval covers the metric's true value with 95% confidence, so disjoint intervals say the upstream (or
what it was called with) changed. A metric without an interval (a sample too small to estimate one)
agrees only with the same point value. Timing metrics (latency, time to first token) depend on the load of
the moment, not on what was run: they are shown, and compared only when asked (`--timing`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgspec

from lockgate.contracts import EvalReran, MetricInterval

# Environment entries whose change can change results (host details like the executable path cannot).
COMPARED = ("model", "endpoint", "sampling", "seed", "suite", "dataset", "repeats", "lockgate", "python",
            "packages_sha256", "lock_sha256", "gpu")
TOLERANCE = 1e-9
EXIT_DISAGREES = 5  # `lockgate eval rerun`: ran, but did not reproduce the stored run


class Agreement(msgspec.Struct, frozen=True, kw_only=True):
    """One metric of the stored run against the rerun."""

    metric: str
    stored: float | None
    stored_low: float | None = None
    stored_high: float | None = None
    rerun: float | None
    rerun_low: float | None = None
    rerun_high: float | None = None
    agrees: bool
    compared: bool = True  # False: a timing metric, shown but not part of the verdict


def is_timing(metric: str) -> bool:
    """Latency-like metrics, which a rerun cannot be expected to reproduce on a machine under other load."""
    return metric.startswith("latency") or "ttft" in metric or metric.endswith("_ms")


def _bounds(value: float | None, interval: MetricInterval | None) -> tuple[float, float] | None:
    if interval is not None and interval.low is not None and interval.high is not None:
        return interval.low, interval.high
    if value is None or math.isnan(value):
        return None
    return value, value


def agreement(stored: Mapping[str, float], stored_intervals: Mapping[str, MetricInterval],
              rerun: Mapping[str, float], rerun_intervals: Mapping[str, MetricInterval], *,
              timing: bool = False) -> list[Agreement]:
    """Every metric of either run, sorted; a metric only one run has disagrees. Timing metrics are compared
    only with `timing`."""
    out = []
    for metric in sorted(set(stored) | set(rerun)):
        a = _bounds(stored.get(metric), stored_intervals.get(metric))
        b = _bounds(rerun.get(metric), rerun_intervals.get(metric))
        agrees = a is not None and b is not None and max(a[0], b[0]) <= min(a[1], b[1]) + TOLERANCE
        si, ri = stored_intervals.get(metric), rerun_intervals.get(metric)
        out.append(Agreement(metric=metric, stored=stored.get(metric), rerun=rerun.get(metric), agrees=agrees,
                             compared=timing or not is_timing(metric),
                             stored_low=si.low if si else None, stored_high=si.high if si else None,
                             rerun_low=ri.low if ri else None, rerun_high=ri.high if ri else None))
    return out


def environment_changes(stored: Mapping[str, str], rerun: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """The compared environment entries that differ: name -> (stored, rerun)."""
    return {k: (stored.get(k, ""), rerun.get(k, "")) for k in COMPARED if stored.get(k, "") != rerun.get(k, "")}


def report(done: EvalReran, stored_env: Mapping[str, str], *, timing: bool = False) -> dict[str, Any]:
    """What `lockgate eval rerun` prints: the verdict, each metric, and what changed in the environment."""
    rows = agreement(done.stored_metrics, done.stored_intervals, done.metrics, done.intervals, timing=timing)
    compared = [r for r in rows if r.compared]
    ok = done.status == "completed" and done.stored_cases > 0 and bool(compared) and all(r.agrees for r in compared)
    return {"rerun_of": done.rerun_of, "run_id": done.run_id, "release": done.release, "status": done.status,
            "agrees": ok, "n_cases": done.n_cases, "stored_cases": done.stored_cases, "error": done.error,
            "metrics": [msgspec.to_builtins(r) for r in rows],
            "environment_changes": {k: {"stored": a, "rerun": b}
                                    for k, (a, b) in environment_changes(stored_env, done.environment).items()},
            "warnings": list(done.warnings)}
