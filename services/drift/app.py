"""Drift monitor wiring: inference events and rollout promotions."""

from __future__ import annotations

from lockgate.bus import consume
from lockgate.contracts import InferenceEvent, InferenceScored, RolloutState
from lockgate.limits import EventLimits
from lockgate.server.service import Service, ServiceContext
from lockgate.services.drift.handlers import DriftHandlers


class Drift(Service):
    """Watches inference events and online scores for drift; publishes `drift.<deployment>` reports (the sink stores them)."""

    name = "drift"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.handlers = DriftHandlers(ctx)
        s, bus = ctx.bus.subjects, ctx.bus
        consume(bus, self.consumers, subject=s.inference_all, stream="inference", durable=s.durable("drift", "inference"),
                wire_type=list[InferenceEvent] | InferenceEvent, origin="drift",
                handler=self.handlers.on_inference, batch_size=64, ack_wait_s=ctx.settings.ack_wait_s,
                # The sink records what the edge refuses; a bad message costs this consumer a failed decode.
                limits=EventLimits.from_settings(ctx.settings), records_refusals=False)
        # Online scores of sampled live traffic (the evaluator's), as score features.
        consume(bus, self.consumers, subject=s.eval_scores_all, stream="events", durable=s.durable("drift", "scores"),
                wire_type=InferenceScored, origin="drift", handler=self.handlers.on_scores,
                batch_size=64, ack_wait_s=ctx.settings.ack_wait_s)
        consume(bus, self.consumers, subject=s.rollout_all, stream="events", durable=s.durable("drift", "rollout"),
                wire_type=RolloutState, origin="drift", handler=self.handlers.on_rollout,
                ack_wait_s=ctx.settings.ack_wait_s)

    async def start(self) -> None:
        """Save the windows every few seconds, so a restart (even a crash) resumes them."""
        await super().start()
        self.spawn(self.handlers.run_snapshots(), "snapshots")

    async def stop(self) -> None:
        """A clean stop saves what changed since the last snapshot."""
        try:
            await self.handlers.save()
        finally:
            await super().stop()


def create(ctx: ServiceContext) -> Drift:
    """Build the drift monitor."""
    return Drift(ctx)
