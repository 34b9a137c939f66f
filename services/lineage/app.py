"""Lineage recorder wiring: one durable consumer per lineage-bearing subject."""

from __future__ import annotations

from lockgate.bus import consume
from lockgate.contracts import (
    EvalCompleted,
    GateDecided,
    LineageRun,
    ReleaseRegistered,
    RolloutState,
)
from lockgate.server.service import Service, ServiceContext
from lockgate.services.lineage.handlers import LineageHandlers


class Lineage(Service):
    """Derives the lineage graph from artifact, release, run, eval, gate and rollout events."""

    name = "lineage"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.handlers = LineageHandlers(ctx)
        s = ctx.bus.subjects
        # The events stream also carries drift and cost records, so subscribe per subject
        # rather than decode (and dead-letter) everything on the stream. Artifacts add no edge.
        wiring = [
            (s.release_registered, "release", ReleaseRegistered),
            (s.lineage_run, "run", LineageRun),
            (s.eval_completed, "eval", EvalCompleted),
            (s.gate_decided_all, "gate", GateDecided),
            (s.rollout_all, "rollout", RolloutState),
        ]
        for subject, purpose, wire_type in wiring:
            consume(ctx.bus, self.consumers, subject=subject, stream="events", durable=s.durable("lineage", purpose),
                    wire_type=wire_type, origin="lineage", handler=self.handlers.on_event,
                    batch_size=64, ack_wait_s=ctx.settings.ack_wait_s)


def create(ctx: ServiceContext) -> Lineage:
    """Build the lineage recorder."""
    return Lineage(ctx)
