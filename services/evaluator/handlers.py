"""NATS edge of the evaluator: EvalRequested in; eval rows, EvalCompleted and LineageRun out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from typing import Any

import aiohttp
from lockgate import artifacts
from lockgate.bus import Delivery
from lockgate.contracts import EvalCompleted, EvalRequested, LineageRun
from lockgate.errors import ConfigError, NotFound, Retryable
from lockgate.ids import uuid7
from lockgate.service import ServiceContext
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.evaluator import domain, runner

log = logging.getLogger("lockgate.evaluator")

RUN_COLUMNS = ("run_id", "release", "suite", "baseline", "policy", "status", "n_cases", "n_errors",
               "metrics", "error", "time", "event_id")
CASE_BATCH = 5000


class EvaluatorStopping(Retryable):
    """The evaluator stopped mid-run; the request is redelivered rather than half-recorded."""


@contextlib.asynccontextmanager
async def heartbeat(delivery: Delivery, interval_s: float) -> AsyncIterator[None]:
    """Tell JetStream the message is still being worked on, so a long eval outlives ack_wait."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(interval_s)  # a timer, not synchronisation
            if delivery.in_progress is not None:
                with contextlib.suppress(Exception):  # a missed beat only risks a redelivery
                    await delivery.in_progress()

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class EvalHandlers:
    """Runs one eval per EvalRequested; the message is acked only once results are stored and published."""

    def __init__(self, ctx: ServiceContext, tracer: trace.Tracer) -> None:
        self.ctx = ctx
        self.tracer = tracer
        self._session: aiohttp.ClientSession | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self._closing = False

    def session(self) -> aiohttp.ClientSession:
        """The pooled HTTP session (created on first use, inside the running loop)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        return self._session

    async def close(self) -> None:
        """Cancel running evals (they will be redelivered), then close the HTTP pool."""
        self._closing = True
        for task in list(self._inflight):
            task.cancel()
        for task in list(self._inflight):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()

    async def on_requested(self, req: EvalRequested, delivery: Delivery) -> None:
        """Run the eval with a heartbeat; a stop mid-run nacks so another instance picks it up."""
        if self._closing:
            raise EvaluatorStopping(f"evaluator is stopping; eval {req.run_id} will be redelivered")
        task = asyncio.create_task(self._run(req, delivery))
        self._inflight.add(task)
        try:
            async with heartbeat(delivery, max(0.1, self.ctx.settings.ack_wait_s / 3)):
                await task
        except asyncio.CancelledError:
            if self._closing and task.cancelled():
                raise EvaluatorStopping(f"evaluator stopped during eval {req.run_id}; it will be redelivered") from None
            raise
        finally:
            self._inflight.discard(task)

    async def _run(self, req: EvalRequested, delivery: Delivery) -> None:
        with self.tracer.start_as_current_span(
            "evaluator.run", context=delivery.trace_context, kind=SpanKind.CONSUMER,
            attributes={"lockgate.run_id": req.run_id, "lockgate.release": req.release, "lockgate.suite": req.suite},
        ) as span:
            if delivery.deliveries > 1 and await self._republish_finished(req):
                return
            try:
                suite, cases, inputs = await self._load(req)
                policy = runner.CallPolicy(timeout_s=max(0.1, req.timeout_s))
                call = partial(runner.complete, self.session(), req.endpoint, req.model or suite.model,
                               policy=policy)
                results = await runner.run_cases(suite, cases, call, concurrency=req.concurrency)
            except (ConfigError, NotFound) as exc:
                # Never silent: a suite that cannot run still yields a (failed) result the gate blocks on.
                span.set_attribute("lockgate.status", "failed")
                await self._finish(req, status="failed", error=exc.message, results=[], metrics={}, inputs=[])
                return
            metrics = domain.aggregate(suite, results)
            error = domain.failure_summary(results)
            span.set_attribute("lockgate.cases", len(results))
            await self._finish(req, status="failed" if error else "completed", error=error, results=results,
                               metrics=metrics, inputs=inputs)

    async def _load(self, req: EvalRequested) -> tuple[domain.Suite, tuple[domain.Case, ...], list[str]]:
        if not req.endpoint:
            raise ConfigError("EvalRequested.endpoint is empty; give the base URL of an OpenAI-compatible API")
        suite = domain.parse_suite(await artifacts.load_structured(self.ctx.bus, req.suite))
        if not (req.model or suite.model):
            raise ConfigError(f"no model to evaluate: set EvalRequested.model or 'model' in suite {suite.name!r}")
        inputs = [req.suite]
        if isinstance(suite.dataset, str):
            rows = await artifacts.load_structured(self.ctx.bus, suite.dataset)
            cases = domain.parse_cases(rows, where=f"dataset {suite.dataset}")
            inputs.append(suite.dataset)
        else:
            cases = suite.dataset
        for case in cases:  # template errors fail the run up front, before any call
            domain.render(suite, case)
        return suite, cases, inputs

    async def _finish(
        self, req: EvalRequested, *, status: str, error: str, results: list[domain.CaseResult],
        metrics: dict[str, float], inputs: list[str],
    ) -> None:
        now = datetime.now(UTC)
        n_errors = sum(1 for r in results if r.error)
        rows = domain.case_rows(req.run_id, req.release, results, now)
        for i, batch in enumerate(domain.chunks(rows, CASE_BATCH)):
            await self.ctx.store.ainsert_rows("eval_cases", domain.CASE_COLUMNS, batch,
                                              token=f"eval-cases-{req.run_id}-{i}")
        done = EvalCompleted(
            run_id=req.run_id, release=req.release, suite=req.suite, baseline=req.baseline, policy=req.policy,
            status=status, n_cases=len(results), n_errors=n_errors, metrics=metrics, error=error,
            tenant=req.tenant, source="evaluator",
        )
        run_row = [req.run_id, req.release, req.suite, req.baseline, req.policy, status, len(results), n_errors,
                   metrics, error, now, done.id]
        await self.ctx.store.ainsert_rows("eval_runs", RUN_COLUMNS, [run_row], token=f"eval-run-{req.run_id}")
        await self._publish(done, inputs)
        if status == "failed":
            log.warning("eval %s for %s failed: %s", req.run_id, req.release, error)

    async def _publish(self, done: EvalCompleted, inputs: list[str]) -> None:
        s = self.ctx.bus.subjects
        await self.ctx.bus.publish(s.eval_completed, done, msg_id=f"eval-completed-{done.run_id}")
        if inputs:
            lineage = LineageRun(run_id=done.run_id, kind="eval", release=done.release, inputs=inputs,
                                 outputs=[done.run_id], tenant=done.tenant, source="evaluator")
            await self.ctx.bus.publish(s.lineage_run, lineage, msg_id=f"lineage-eval-{done.run_id}")

    async def _republish_finished(self, req: EvalRequested) -> bool:
        """On redelivery after the rows were stored, publish the stored result instead of re-running."""
        rows = await self.ctx.store.arows(
            f"SELECT {', '.join(RUN_COLUMNS)} FROM eval_runs WHERE run_id = {{run_id:String}} LIMIT 1",
            {"run_id": req.run_id},
        )
        if not rows:
            return False
        row = rows[0]
        done = EvalCompleted(
            id=row["event_id"] or uuid7(),
            run_id=row["run_id"], release=row["release"], suite=row["suite"], baseline=row["baseline"],
            policy=row["policy"], status=row["status"], n_cases=row["n_cases"], n_errors=row["n_errors"],
            metrics=dict(row["metrics"]), error=row["error"], tenant=req.tenant, source="evaluator",
        )
        inputs: list[str] = []
        if done.n_cases:
            with contextlib.suppress(ConfigError, NotFound):
                inputs = (await self._load(req))[2]
        await self._publish(done, inputs)
        return True
