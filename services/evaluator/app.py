"""Evaluator wiring: a durable consumer on `eval.requested`, and two on inference events (online evaluation)."""

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
        # deployment's document declares (which may be applied at any time, so the consumers always run).
        # Two lanes: the answers routers served (a canary's evidence) and applications' own events, each its own
        # ordered consumer, so no application's flood holds the served answers' scores behind it (probe p55 F1:
        # another tenant's 40,000 events took a canary's scores from 0.2 s to 27-73 s and paused its rollout).
        # `served` first: on a home made before, whose `online` read both, its consumer exists before `online` is
        # narrowed, so the served answers `online` had not taken yet are kept for it (consumers start in order).
        self.online = OnlineEval(ctx)
        for subject, purpose in ((s.served_all, "served"), (s.inference_sent, "online")):
            consume(ctx.bus, self.consumers, subject=subject, stream="inference",
                    durable=s.durable("evaluator", purpose), wire_type=list[InferenceEvent] | InferenceEvent,
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
