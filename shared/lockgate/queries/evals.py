"""Eval runs and their per-case results."""

from __future__ import annotations

from typing import Any

from lockgate.store import Store


def eval_runs(store: Store, release: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Eval runs for one release or all, latest first (metrics as a dict)."""
    where = "WHERE release = {release:String}" if release else ""
    return store.rows(
        "SELECT run_id, release, suite, baseline, policy, status, n_cases, n_errors, metrics, error, time, "
        f"event_id FROM eval_runs {where} ORDER BY time DESC, run_id DESC LIMIT {{limit:UInt32}}",
        {"release": release or "", "limit": max(0, int(limit))},
    )


def eval_cases(store: Store, run_id: str, limit: int = 1000) -> list[dict[str, Any]]:
    """Per-case results of one run, in case order (errors included)."""
    return store.rows(
        "SELECT case_id, repeat, input, expected, output, scores, latency_ms, input_tokens, output_tokens, "
        "error, time FROM eval_cases WHERE run_id = {run_id:String} ORDER BY case_id, repeat "
        "LIMIT {limit:UInt32}",
        {"run_id": run_id, "limit": max(0, int(limit))},
    )
