"""Evaluator wiring: one durable consumer on `eval.requested`."""

from __future__ import annotations

from lockgate.bus import consume
from lockgate.contracts import EvalRequested, InferenceEvent
from lockgate.limits import EventLimits
from lockgate.server.service import Service, ServiceContext
from lockgate.services.evaluator.handlers import EvalHandlers
from lockgate.services.evaluator.online_handler import OnlineEval
from lockgate.services.evaluator.slots import FairSlots, shared_fairly

# Requests pulled per run slot: those beyond the slots wait in the evaluator (held in flight) for a slot of their
# tenant's, so a tenant at its share does not keep another tenant's request in the stream behind its own.
PULLED_PER_SLOT = 4


class Evaluator(Service):
    """Runs eval suites against candidate endpoints and publishes `eval.completed`."""

    name = "evaluator"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.handlers = EvalHandlers(ctx, self.tracer)
        s, settings = ctx.bus.subjects, ctx.settings
        # eval_workers runs side by side (requests are independent, so not ordered), at most eval_tenant_runs of one
        # tenant's: one tenant's slow runs always leave a slot to another's.
        self.slots = FairSlots(settings.eval_workers, settings.eval_tenant_runs or settings.eval_workers - 1)
        # batch_size 1: an eval is long, so each instance pulls one at a time and siblings share the rest.
        consume(ctx.bus, self.consumers, subject=s.eval_requested, stream="events",
                durable=s.durable("evaluator", "requests"), wire_type=EvalRequested, origin="evaluator",
                handler=shared_fairly(self.handlers.on_requested, self.slots, settings.ack_wait_s), batch_size=1,
                max_workers=settings.eval_workers * PULLED_PER_SLOT, ordered=False, ack_wait_s=settings.ack_wait_s)
        # Online evaluation of sampled live traffic: at the global online_eval_sample, or at the rates a
        # deployment's document declares (which may be applied at any time, so the consumer always runs).
        self.online = OnlineEval(ctx)
        consume(ctx.bus, self.consumers, subject=s.inference_all, stream="inference",
                durable=s.durable("evaluator", "online"), wire_type=list[InferenceEvent] | InferenceEvent,
                origin="evaluator", handler=self.online.on_inference, ack_wait_s=ctx.settings.ack_wait_s,
                # The sink records what the edge refuses; a bad message costs this consumer a failed decode.
                limits=EventLimits.from_settings(ctx.settings), records_refusals=False)

    async def stop(self) -> None:
        """Release requests waiting for a slot and cancel in-flight evals (both redelivered later), stop the online
        judge, and close the HTTP pools."""
        self.slots.close()
        await self.handlers.close()
        await self.online.close()
        await super().stop()


def create(ctx: ServiceContext) -> Evaluator:
    """Build the evaluator."""
    return Evaluator(ctx)
