"""Lineage recorder wiring: one durable consumer per lineage-bearing subject."""

from __future__ import annotations

import contextlib
from typing import Any

from lockgate.bus import consume
from lockgate.contracts import (
    EvalCompleted,
    EvalRequested,
    GateDecided,
    LineageRun,
    ReleaseRegistered,
    RolloutState,
)
from lockgate.server.service import Service, ServiceContext
from lockgate.services.lineage.applied_handler import AppliedState
from lockgate.services.lineage.handlers import LineageHandlers
from lockgate.services.lineage.live_handler import LiveLineage


class Lineage(Service):
    """Derives the lineage graph from artifact, release, run, eval, gate and rollout events."""

    name = "lineage"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.live = LiveLineage(ctx) if ctx.settings.openlineage_url else None
        self.handlers = LineageHandlers(ctx, self.live)
        self.applied = AppliedState(ctx)  # the applied state's only writer (`lockgate apply` asks)
        self._applies: Any = None
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
        if self.live is not None:  # an eval run's START is posted when it is requested
            consume(ctx.bus, self.consumers, subject=s.eval_requested, stream="events",
                    durable=s.durable("lineage", "eval_start"), wire_type=EvalRequested, origin="lineage",
                    handler=self.live.on_requested, batch_size=64, ack_wait_s=ctx.settings.ack_wait_s)

    async def start(self) -> None:
        """Take apply requests (one queue group: each is recorded once), and start posting OpenLineage
        events, when configured."""
        s = self.ctx.bus.subjects
        self._applies = await self.ctx.bus.nc.subscribe(s.gitops_apply_all, queue=s.gitops_group,
                                                        cb=self.applied.on_request)
        if self.live is not None:
            self.live.start()

    async def stop(self) -> None:
        """Finish the apply being recorded, send the OpenLineage events still queued, then stop."""
        if self._applies is not None:
            with contextlib.suppress(Exception):
                await self._applies.drain()
            self._applies = None
        if self.live is not None:
            await self.live.close()
        await super().stop()


def create(ctx: ServiceContext) -> Lineage:
    """Build the lineage recorder."""
    return Lineage(ctx)
