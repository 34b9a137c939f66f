"""NATS edge of the router: gate decisions, drift reports and live inference events in, route changes
out (via Rollouts)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.msg import Msg

from lockgate.bus import Delivery, Handler
from lockgate.contracts import DriftReport, GateDecided, InferenceEvent, InferenceScored
from lockgate.errors import LockgateError, SignatureError
from lockgate.services.router import progress
from lockgate.services.router.rollouts import Rollouts

log = logging.getLogger("lockgate.router")

_inference = msgspec.json.Decoder(list[InferenceEvent] | InferenceEvent)
_scored = msgspec.json.Decoder(InferenceScored)
_drift = msgspec.json.Decoder(DriftReport)
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


def _evidence(rollouts: Rollouts, take: Callable[[bytes], None]) -> Callable[[Msg], Awaitable[None]]:
    """A core-NATS callback feeding analysis evidence: every replica sees every message (no queue
    group), so all replicas measure the same evidence. Duplicate publishes (same Nats-Msg-Id) count
    once; undecodable messages are the sink's to dead-letter, here they are only skipped."""
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
            take(msg.data)
        except (msgspec.DecodeError, UnicodeDecodeError):  # not evidence (the durable consumers dead-letter it)
            return

    return on_message


def evidence_callback(rollouts: Rollouts) -> Callable[[Msg], Awaitable[None]]:
    """For `inference.*.router`: the events of requests the routers served (`subjects.served`)."""

    def take(data: bytes) -> None:
        value = _inference.decode(data)
        rollouts.observe(value if isinstance(value, list) else [value])

    return _evidence(rollouts, take)


def drift_callback(rollouts: Rollouts) -> Callable[[Msg], Awaitable[None]]:
    """For `drift.>`: drift reports as analysis evidence on every replica (the durable consumer that acts
    on them reaches one replica per report)."""
    return _evidence(rollouts, lambda data: rollouts.observe_drift(_drift.decode(data)))


def scores_callback(rollouts: Rollouts) -> Callable[[Msg], Awaitable[None]]:
    """For `eval.scores.>`: online scores of sampled live answers."""
    return _evidence(rollouts, lambda data: rollouts.observe_scores([_scored.decode(data)]))


async def replay_drift(rollouts: Rollouts) -> int:
    """At start, after subscribing to live reports: the drift reports each deployment under analysis got since its
    rollout started (`progress.drift_replay`), as evidence, so a replica that (re)starts mid-rollout does not
    hold its drift metric WAITING until the monitor's next report. Returns how many were taken. An unreadable
    message is skipped and a stream that cannot be read ends the replay, both logged: the start goes on, and
    evidence then comes from live reports only."""
    bus = rollouts.ctx.bus
    stream, taken = bus.subjects.streams["events"].name, 0
    try:
        for deployment, since in progress.drift_replay(rollouts.routes.values(), time.time()).items():
            async for seq, subject, data in bus.stored_since(stream, bus.subjects.drift(deployment), since):
                try:
                    report = _drift.decode(data)
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec checks UTF-8 with Python's codec
                    log.warning("drift replay skipped unreadable message %d of %s on %s: %s", seq, stream, subject,
                                exc)
                    continue
                rollouts.observe_drift(report)
                taken += 1
    except LockgateError as exc:
        log.warning("drift replay stopped after %d reports (evidence comes from live reports): %s", taken, exc)
    return taken
