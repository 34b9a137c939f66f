"""Evaluator wiring: one durable consumer on `eval.requested`."""

from __future__ import annotations

from lockgate.bus import consume
from lockgate.contracts import EvalRequested, InferenceEvent
from lockgate.limits import EventLimits
from lockgate.server.service import Service, ServiceContext
from lockgate.services.evaluator.handlers import EvalHandlers
from lockgate.services.evaluator.online_handler import OnlineEval


class Evaluator(Service):
    """Runs eval suites against candidate endpoints and publishes `eval.completed`."""

    name = "evaluator"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.handlers = EvalHandlers(ctx, self.tracer)
        s = ctx.bus.subjects
        # batch_size 1: an eval is long, so each instance pulls one at a time and siblings share the rest;
        # max_workers lets one instance still run a few evals side by side (requests are independent,
        # so not ordered).
        consume(ctx.bus, self.consumers, subject=s.eval_requested, stream="events",
                durable=s.durable("evaluator", "requests"), wire_type=EvalRequested, origin="evaluator",
                handler=self.handlers.on_requested, batch_size=1, max_workers=4, ordered=False,
                ack_wait_s=ctx.settings.ack_wait_s)
        # Online evaluation of sampled live traffic: at the global online_eval_sample, or at the rates a
        # deployment's document declares (which may be applied at any time, so the consumer always runs).
        self.online = OnlineEval(ctx)
        consume(ctx.bus, self.consumers, subject=s.inference_all, stream="inference",
                durable=s.durable("evaluator", "online"), wire_type=list[InferenceEvent] | InferenceEvent,
                origin="evaluator", handler=self.online.on_inference, ack_wait_s=ctx.settings.ack_wait_s,
                # The sink records what the edge refuses; a bad message costs this consumer a failed decode.
                limits=EventLimits.from_settings(ctx.settings), records_refusals=False)

    async def stop(self) -> None:
        """Cancel in-flight evals (redelivered later), stop the online judge, and close the HTTP pools."""
        await self.handlers.close()
        await self.online.close()
        await super().stop()


def create(ctx: ServiceContext) -> Evaluator:
    """Build the evaluator."""
    return Evaluator(ctx)
