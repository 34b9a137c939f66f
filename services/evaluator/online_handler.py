"""Bus edge of online evaluation: inference events in, `eval.scores.<deployment>` out."""

from __future__ import annotations

from lockgate.bus import Delivery
from lockgate.contracts import InferenceEvent
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.evaluator import online


class OnlineEval:
    """Scores a sampled share of live inference events; the rollout analysis reads the scores as metrics."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.rate = ctx.settings.online_eval_sample
        self.names = online.check(ctx.settings.online_eval_scorers)
        self.scored = Progress()  # events scored and published (tests await it)

    async def on_inference(self, value: list[InferenceEvent] | InferenceEvent, delivery: Delivery) -> None:
        """Score the sampled events of one message and publish each one's scores (a failed publish
        nacks the message: scores are idempotent by the scored event's id)."""
        bus = self.ctx.bus
        n = 0
        for event in value if isinstance(value, list) else [value]:
            result = online.score(event, self.names, self.rate)
            if result is not None:
                await bus.publish(bus.subjects.eval_scores(result.deployment or result.app), result,
                                  msg_id=f"scored-{result.event_id}")
                n += 1
        await self.scored.bump(n)
