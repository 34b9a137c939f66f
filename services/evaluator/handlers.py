"""NATS edge of the evaluator: EvalRequested in; case facts, EvalCompleted and LineageRun out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from lockgate.bus import Delivery
from lockgate.contracts import EvalRequested
from lockgate.errors import ConfigError, NotFound, Retryable
from lockgate.evalruns import EvalRun, record_request
from lockgate.server.service import ServiceContext
from lockgate.services.evaluator import runner
from lockgate.services.evaluator.execution import Execution, load_error

log = logging.getLogger("lockgate.evaluator")
# On stop, cases in flight get this long to finish (and be stored) before they are cancelled.
DRAIN_S = 10.0


class EvaluatorStopping(Retryable):
    """The evaluator stopped mid-run; the request is redelivered and resumes from the cases it published."""


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
    """Runs one eval per EvalRequested; the message is acked only once its results are published."""

    def __init__(self, ctx: ServiceContext, tracer: trace.Tracer) -> None:
        self.ctx = ctx
        self.tracer = tracer
        self._session: aiohttp.ClientSession | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self.stopping = asyncio.Event()

    def session(self) -> aiohttp.ClientSession:
        """The pooled HTTP session (created on first use, inside the running loop)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        return self._session

    async def close(self) -> None:
        """Stop starting cases, let in-flight ones finish and be stored, then close the HTTP pool."""
        self.stopping.set()
        if self._inflight:
            _, late = await asyncio.wait(list(self._inflight), timeout=DRAIN_S)
            for task in late:
                task.cancel()
            for task in late:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._session is not None:
            await self._session.close()

    async def on_requested(self, req: EvalRequested, delivery: Delivery) -> None:
        """Run the eval with a heartbeat; a stop mid-run nacks so it resumes here or on another instance."""
        if self.stopping.is_set():
            raise EvaluatorStopping(f"evaluator is stopping; eval {req.run_id} will be redelivered")
        # Recorded before the run, so the gatekeeper knows this run was requested when its result lands, with the
        # release as bound at the first delivery: every delivery evaluates that, never the release as bound now.
        run = await record_request(self.ctx.bus, req)
        task = asyncio.create_task(self._run(run, delivery))
        self._inflight.add(task)
        try:
            async with heartbeat(delivery, max(0.1, self.ctx.settings.ack_wait_s / 3)):
                await task
        except (asyncio.CancelledError, runner.Stopped):
            if self.stopping.is_set():
                raise EvaluatorStopping(f"evaluator stopped during eval {req.run_id}; it will resume") from None
            raise
        finally:
            self._inflight.discard(task)

    async def _run(self, run: EvalRun, delivery: Delivery) -> None:
        req = run.request
        with self.tracer.start_as_current_span(
            "evaluator.run", context=delivery.trace_context, kind=SpanKind.CONSUMER,
            attributes={"lockgate.run_id": req.run_id, "lockgate.release": req.release, "lockgate.suite": req.suite},
        ) as span:
            ex = Execution(self.ctx, self.session(), self.stopping)
            # A redelivery after the run row was stored re-publishes the same event (recomputed, no calls).
            event_id = await ex.stored_event_id(req.run_id) if delivery.deliveries > 1 else None
            # What the run evaluates is the release as bound when it started (its record), on every delivery.
            binding = run.binding
            try:
                loaded = await ex.load(run)
            except (ConfigError, NotFound) as exc:
                span.set_attribute("lockgate.status", "failed")
                if req.rerun_of:
                    await ex.rerun(req, None, load_error(exc))
                else:
                    await ex.finish(req, load_error(exc), [], binding, event_id)
                return
            outcome = await ex.execute(req, loaded, run.cases_after)
            span.set_attribute("lockgate.cases", len(outcome.results))
            span.set_attribute("lockgate.status", outcome.status)
            if req.rerun_of:  # never an EvalCompleted: a rerun must not move any gate
                await ex.rerun(req, loaded, outcome)
                return
            await ex.finish(req, outcome, loaded.inputs, binding, event_id)
