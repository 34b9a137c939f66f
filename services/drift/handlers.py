"""NATS edge of the drift monitor: inference batches and online scores in, drift reports published (the sink
stores them, the gatekeeper judges them by a release's drift policy)."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

import msgspec
import nats.js.errors

from lockgate.bus import Delivery
from lockgate.contracts import DriftReport, InferenceEvent, InferenceScored, RolloutState
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.drift import domain, text
from lockgate.subjects import token

_SEEN_MAX = 4096
_snapshots = msgspec.json.Decoder(domain.Snapshot)
log = logging.getLogger("lockgate.drift")


class DriftHandlers:
    """Feeds the in-memory monitor; announces each report it yields."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        s = ctx.settings
        self.monitor = domain.DriftMonitor(s.drift_reference_size, s.drift_window_size, s.drift_psi_threshold)
        self.events = Progress()
        self.reports = Progress()
        self.resets = Progress()
        # Reports computed but not yet published (a failed emit is retried on redelivery),
        # and recently observed message tokens, so a redelivered message is not counted twice.
        self._pending: list[DriftReport] = []
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._restored = False

    async def _restore(self) -> None:
        """Load saved windows before the first event, so a restart keeps its reference."""
        if self._restored:
            return
        if self.monitor.embedder is None:  # a local model takes seconds to load: off the event loop
            embedder = await asyncio.to_thread(text.default_embedder)
            self.monitor.embedder, self.monitor.dim = embedder, embedder.dim
            log.info("text drift embeds with %s", embedder.name)
        kv = await self.ctx.bus.kv(self.ctx.bus.subjects.kv_drift)
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        for key in keys:
            try:
                snap = _snapshots.decode((await kv.get(key)).value)
            except (nats.js.errors.KeyNotFoundError, msgspec.DecodeError) as exc:
                log.warning("ignoring unreadable drift windows %s: %s", key, exc)
                continue
            self.monitor.windows[snap.deployment] = domain.restore(snap, self.monitor.reference_size,
                                                                   self.monitor.window_size, self.monitor.dim)
        self._restored = True

    async def _save(self, deployments: set[str]) -> None:
        """Persist the windows of deployments that reported or just completed their reference."""
        kv = await self.ctx.bus.kv(self.ctx.bus.subjects.kv_drift)
        for deployment in deployments:
            w = self.monitor.windows.get(deployment)
            if w is not None:
                await kv.put(token(deployment), msgspec.json.encode(domain.snapshot(deployment, w)))

    async def on_inference(self, value: list[InferenceEvent] | InferenceEvent, delivery: Delivery) -> None:
        """Observe a message's events once; emit any reports that came due."""
        await self._observe(value if isinstance(value, list) else [value], delivery)

    async def on_scores(self, value: InferenceScored, delivery: Delivery) -> None:
        """An online score of a sampled event (the evaluator's): a row of score features."""
        await self._observe([value], delivery)

    async def _observe(self, events: list[InferenceEvent] | list[InferenceScored], delivery: Delivery) -> None:
        await self._restore()
        # Shadow calls answered nobody: they are the candidate's, not the deployment's traffic.
        events = [e for e in events if e.variant != "shadow"]
        token = delivery.msg_id or f"{delivery.subject}-seq-{delivery.stream_seq}"
        if token not in self._seen:
            before = {d: w.ref_n for d, w in self.monitor.windows.items()}
            reports = self.monitor.observe_events(events)
            self._pending += reports
            self._seen[token] = None
            if len(self._seen) > _SEEN_MAX:
                self._seen.popitem(last=False)
            filled = {d for d, w in self.monitor.windows.items()
                      if w.ref_n == w.reference_size and before.get(d, 0) < w.reference_size}
            await self._save(filled | {r.deployment for r in reports})
            await self.events.bump(len(events))
        while self._pending:
            await self._emit(self._pending[0])
            self._pending.pop(0)

    async def on_rollout(self, state: RolloutState, delivery: Delivery) -> None:
        """A promotion makes the new traffic the reference; an abort ends the canary's window."""
        if state.phase == "aborted":
            self.monitor.end_rollout(state.deployment)
        if state.phase == "promoted":
            await self._restore()
            self.monitor.reset(state.deployment)
            kv = await self.ctx.bus.kv(self.ctx.bus.subjects.kv_drift)
            await kv.delete(token(state.deployment))
            await self.resets.bump()

    async def _emit(self, report: DriftReport) -> None:
        await self.ctx.bus.publish(self.ctx.bus.subjects.drift(report.deployment), report)
        await self.reports.bump()
