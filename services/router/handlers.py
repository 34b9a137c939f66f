"""NATS edge of the router: gate decisions, drift reports and live inference events in, route changes
out (via Rollouts)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.msg import Msg

from lockgate.bus import Delivery, Handler
from lockgate.contracts import DriftReport, GateDecided, InferenceEvent, InferenceScored
from lockgate.errors import SignatureError
from lockgate.services.router.rollouts import Rollouts

_inference = msgspec.json.Decoder(list[InferenceEvent] | InferenceEvent)
_scored = msgspec.json.Decoder(InferenceScored)
_SEEN_MAX = 4096


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


def drift_handler(rollouts: Rollouts) -> Handler:
    """Handler for `drift.>`: a DRIFT covering a live canary aborts it; persistence errors retry via nack."""

    async def handle(report: DriftReport, delivery: Delivery) -> None:
        await rollouts.on_drift(report)

    return handle


def evidence_callback(rollouts: Rollouts) -> Callable[[Msg], Awaitable[None]]:
    """Core-NATS callback for `inference.>`: every replica sees every event (no queue group), so all
    replicas measure the same evidence. Duplicate publishes (same Nats-Msg-Id) are counted once;
    undecodable messages are the sink's to dead-letter, here they are only skipped."""
    seen: OrderedDict[str, None] = OrderedDict()

    async def on_message(msg: Msg) -> None:
        if not rollouts.analysing():
            return  # no canary under analysis: not worth decoding
        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        if msg_id:
            if msg_id in seen:
                return
            seen[msg_id] = None
            if len(seen) > _SEEN_MAX:
                seen.popitem(last=False)
        try:
            value = _inference.decode(msg.data)
        except msgspec.DecodeError:
            return
        rollouts.observe(value if isinstance(value, list) else [value])

    return on_message


def scores_callback(rollouts: Rollouts) -> Callable[[Msg], Awaitable[None]]:
    """Core-NATS callback for `eval.scores.>`: online scores of sampled live answers, kept as analysis
    evidence (every replica sees all; a redelivered score has the same Nats-Msg-Id and counts once)."""
    seen: OrderedDict[str, None] = OrderedDict()

    async def on_message(msg: Msg) -> None:
        if not rollouts.analysing():
            return
        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        if msg_id:
            if msg_id in seen:
                return
            seen[msg_id] = None
            if len(seen) > _SEEN_MAX:
                seen.popitem(last=False)
        try:
            rollouts.observe_scores([_scored.decode(msg.data)])
        except msgspec.DecodeError:
            return

    return on_message
