"""Stored side of the evaluator: per-case rows as cases finish; resume, baseline and recorded outputs are
read through the query service (this process never opens ClickHouse for reading)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from lockgate.bus import Bus
from lockgate.queryclient import ask, ask_pages
from lockgate.services.evaluator import domain

if TYPE_CHECKING:  # the store module loads clickhouse-connect; this process only holds a handle
    from lockgate.store import Store

log = logging.getLogger("lockgate.evaluator.persist")
RUN_COLUMNS = ("run_id", "release", "suite", "baseline", "policy", "status", "n_cases", "n_errors",
               "metrics", "error", "time", "event_id")


class CaseWriter:
    """Buffers finished cases and inserts them in small batches (by size or every `interval_s`).

    Each batch's dedup token is the hash of its (case, repeat) keys, so re-sending a batch after a
    failed insert never duplicates rows, and a resumed run (which skips stored cases) never
    produces the same token for different rows.
    """

    def __init__(self, store: Store, run_id: str, release: str, *, batch: int = 256, interval_s: float = 0.25) -> None:
        self.store = store
        self.run_id = run_id
        self.release = release
        self.batch = batch
        self.interval_s = interval_s
        self.written = 0
        self._pending: list[domain.CaseResult] = []
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        """Start the background flusher."""
        self._task = asyncio.create_task(self._loop())

    def add(self, result: domain.CaseResult) -> None:
        """Queue one finished case."""
        self._pending.append(result)
        if len(self._pending) >= self.batch:
            self._full.set()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self.interval_s)  # a flush timer, not synchronisation
            self._full.clear()
            await self.flush()

    async def flush(self) -> None:
        """Insert everything queued; on failure the rows stay queued for the next flush."""
        async with self._lock:
            while self._pending:
                batch = self._pending[: self.batch]
                keys = "\n".join(f"{r.case_id}\x00{r.repeat}" for r in batch)
                token = f"eval-cases-{self.run_id}-{hashlib.sha256(keys.encode()).hexdigest()[:32]}"
                rows = domain.case_rows(self.run_id, self.release, batch, datetime.now(UTC))
                await self.store.ainsert_rows("eval_cases", domain.CASE_COLUMNS, rows, token=token)
                del self._pending[: len(batch)]
                self.written += len(batch)

    async def close(self) -> None:
        """Stop the flusher and write what is left (also on cancellation, so finished work is kept)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await asyncio.shield(self.flush())


def _result(row: dict[str, Any]) -> domain.CaseResult:
    details: dict[str, Any] = {}
    if row.get("details"):
        with contextlib.suppress(ValueError):
            details = json.loads(row["details"])
    return domain.CaseResult(
        case_id=row["case_id"], repeat=int(row["repeat"]), input=row["input"], expected=row["expected"],
        output=row["output"], scores=dict(row["scores"]), latency_ms=float(row["latency_ms"]),
        input_tokens=int(row["input_tokens"]), output_tokens=int(row["output_tokens"]), error=row["error"],
        details=details)


async def run_cases(bus: Bus, run_id: str) -> list[domain.CaseResult]:
    """Stored per-case results of a run, one per (case, repeat), in (case_id, repeat) order."""
    rows = await ask_pages(bus, "eval_case_results", {"run_id": run_id},
                           after=lambda r: {"after_case": r["case_id"], "after_repeat": r["repeat"]})
    return [_result(r) for r in rows]


async def baseline_run(bus: Bus, release: str, suite: str) -> str | None:
    """The latest completed run of `suite` for `release`, or None."""
    return await ask(bus, "baseline_run", {"release": release, "suite": suite}, into=str | None)


async def stored_event_id(bus: Bus, run_id: str) -> str | None:
    """The EvalCompleted id stored with a run's summary row, or None if it was never stored."""
    return await ask(bus, "eval_run_event_id", {"run_id": run_id}, into=str | None)


async def recorded_events(bus: Bus, app: str, release: str, since: str) -> list[dict[str, Any]]:
    """Inference events with a prompt and response for app/release (since a time), most recent first."""
    args: dict[str, Any] = {"app": app, "release": release}
    if since:
        at = datetime.fromisoformat(since)
        args["since"] = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)  # naive times are UTC
    return await ask_pages(bus, "recorded_events", args,
                           after=lambda r: {"before_us": r["time_us"], "before_id": r["id"]})


async def insert_run(store: Store, row: Sequence[Any], run_id: str) -> None:
    """The run's summary row (idempotent per run)."""
    await store.ainsert_rows("eval_runs", RUN_COLUMNS, [list(row)], token=f"eval-run-{run_id}")
