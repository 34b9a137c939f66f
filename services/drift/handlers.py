"""NATS edge of the drift monitor: inference batches in, drift reports stored and published."""

from __future__ import annotations

from collections import OrderedDict

from lockgate.bus import Delivery
from lockgate.contracts import DriftReport, InferenceEvent, RolloutState
from lockgate.service import Progress, ServiceContext
from services.drift import domain

_SEEN_MAX = 4096


class DriftHandlers:
    """Feeds the in-memory monitor; persists and announces each report it yields."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        s = ctx.settings
        self.monitor = domain.DriftMonitor(s.drift_reference_size, s.drift_window_size, s.drift_psi_threshold)
        self.events = Progress()
        self.reports = Progress()
        self.resets = Progress()
        # Reports computed but not yet stored and published (a failed emit is retried on redelivery),
        # and recently observed message tokens, so a redelivered message is not counted twice.
        self._pending: list[DriftReport] = []
        self._seen: OrderedDict[str, None] = OrderedDict()

    async def on_inference(self, value: list[InferenceEvent] | InferenceEvent, delivery: Delivery) -> None:
        """Observe a message's events once; emit any reports that came due."""
        events = value if isinstance(value, list) else [value]
        token = delivery.msg_id or f"seq-{delivery.stream_seq}"
        if token not in self._seen:
            self._pending += self.monitor.observe_events(events)
            self._seen[token] = None
            if len(self._seen) > _SEEN_MAX:
                self._seen.popitem(last=False)
            await self.events.bump(len(events))
        while self._pending:
            await self._emit(self._pending[0])
            self._pending.pop(0)

    async def on_rollout(self, state: RolloutState, delivery: Delivery) -> None:
        """A promotion makes the new traffic the reference."""
        if state.phase == "promoted":
            self.monitor.reset(state.deployment)
            await self.resets.bump()

    async def _emit(self, report: DriftReport) -> None:
        await self.ctx.store.ainsert_rows("drift_reports", domain.REPORT_COLUMNS, domain.report_rows(report),
                                          token=report.id)
        await self.ctx.bus.publish(self.ctx.bus.subjects.drift(report.deployment), report)
        await self.reports.bump()
