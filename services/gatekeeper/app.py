"""Gatekeeper wiring: one durable consumer on `eval.completed`."""

from __future__ import annotations

from lockgate.bus import consume
from lockgate.contracts import EvalCompleted
from lockgate.service import Service, ServiceContext

from services.gatekeeper.handlers import GateHandlers


class Gatekeeper(Service):
    """Turns eval results into PASS/BLOCK decisions under threshold policies."""

    name = "gatekeeper"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.handlers = GateHandlers(ctx, self.tracer)
        s = ctx.bus.subjects
        consume(ctx.bus, self.router, subject=s.eval_completed, stream="events",
                durable=s.durable("gatekeeper", "evals"), wire_type=EvalCompleted, origin="gatekeeper",
                handler=self.handlers.on_eval_completed, ack_wait_s=ctx.settings.ack_wait_s)


def create(ctx: ServiceContext) -> Gatekeeper:
    """Build the gatekeeper."""
    return Gatekeeper(ctx)
