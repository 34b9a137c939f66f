"""NATS edge of the router: gate decisions in, route changes out (via Rollouts)."""

from __future__ import annotations

from lockgate.bus import Delivery, Handler
from lockgate.contracts import GateDecided
from lockgate.errors import SignatureError
from lockgate.services.router.rollouts import Rollouts


def gate_handler(rollouts: Rollouts) -> Handler:
    """Handler for `gate.decided.>`: verify, then apply to matching canaries; persistence errors retry via nack."""

    async def handle(decision: GateDecided, delivery: Delivery) -> None:
        # SignatureError ("signature invalid: ...") sends the decision to the DLQ instead of acting on it.
        await rollouts.verifier.verify(decision)
        expected = rollouts.ctx.bus.subjects.gate_decided(decision.release)
        if delivery.subject != expected:
            raise SignatureError(f"decision {decision.id} for {decision.release!r} arrived on {delivery.subject}, "
                                 f"not {expected}: refusing it")
        await rollouts.on_decision(decision)

    return handle
