"""Wiring of the router service."""

from __future__ import annotations

from lockgate.bus import consume
from lockgate.contracts import DriftReport, GateDecided
from lockgate.server.service import Service, ServiceContext
from lockgate.services.router.handlers import drift_handler, gate_handler
from lockgate.services.router.server import RouterService


def create(ctx: ServiceContext) -> Service:
    """Build the router and subscribe it to gate decisions."""
    svc = RouterService(ctx)
    consume(
        ctx.bus,
        svc.consumers,
        subject=ctx.bus.subjects.gate_decided_all,
        stream="events",
        durable=ctx.bus.subjects.durable("router", "gates"),
        wire_type=GateDecided,
        origin="router",
        handler=gate_handler(svc.rollouts),
        batch_size=1,  # decisions are rare and must act within milliseconds
        ack_wait_s=ctx.settings.ack_wait_s,
    )
    # Drift reports abort a live canary whose traffic drifted (progress.on_drift).
    consume(ctx.bus, svc.consumers, subject=ctx.bus.subjects.drift_all, stream="events",
            durable=ctx.bus.subjects.durable("router", "drift"), wire_type=DriftReport, origin="router",
            handler=drift_handler(svc.rollouts), batch_size=1, ack_wait_s=ctx.settings.ack_wait_s)
    return svc
