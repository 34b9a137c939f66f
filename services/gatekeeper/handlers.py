"""NATS edge of the gatekeeper: EvalCompleted in; GateDecided on the bus, in KV and in the audit log."""

from __future__ import annotations

import json
import logging

import msgspec
import nats.errors
import nats.js.errors
from lockgate import artifacts
from lockgate.bus import Delivery
from lockgate.codec import encode
from lockgate.contracts import EvalCompleted, GateDecided
from lockgate.errors import BusUnavailable, ConfigError, NotFound
from lockgate.service import ServiceContext
from lockgate.subjects import token
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.gatekeeper import domain

log = logging.getLogger("lockgate.gatekeeper")

DECISION_COLUMNS = ("id", "time", "release", "action", "actor", "decision", "eval_run", "policy", "baseline",
                    "rules", "reason", "signature", "key_id", "tenant")


class GateHandlers:
    """Decides a release from its eval result; every path ends in a published decision."""

    def __init__(self, ctx: ServiceContext, tracer: trace.Tracer) -> None:
        self.ctx = ctx
        self.tracer = tracer

    async def on_eval_completed(self, done: EvalCompleted, delivery: Delivery) -> None:
        """Judge the eval by its policy, then record and announce the decision."""
        with self.tracer.start_as_current_span(
            "gatekeeper.decide", context=delivery.trace_context, kind=SpanKind.CONSUMER,
            attributes={"lockgate.release": done.release, "lockgate.run_id": done.run_id},
        ) as span:
            policy, policy_error = await self._policy(done)
            outcome = domain.decide_eval(policy, policy_error, done)
            span.set_attribute("lockgate.decision", outcome.decision)
            decision = GateDecided(
                id=domain.decision_id(done.id), release=done.release, decision=outcome.decision, rules=list(outcome.rules), eval_run=done.run_id,
                policy=done.policy, baseline=done.baseline, reason=outcome.reason,
                artifacts={k: v for k, v in (("eval_suite", done.suite), ("policy", done.policy)) if v},
                tenant=done.tenant, source="gatekeeper",
            )
            await self._record(decision)
            if outcome.decision != "PASS":
                log.info("release %s blocked: %s", done.release, outcome.reason)

    async def _policy(self, done: EvalCompleted) -> tuple[domain.Policy | None, str]:
        """The parsed policy, or None and why not (the gate then fails closed)."""
        if not done.policy:
            return None, f"eval run {done.run_id} names no policy; the gate fails closed"
        try:
            return domain.parse_policy(await artifacts.load_structured(self.ctx.bus, done.policy)), ""
        except (ConfigError, NotFound) as exc:
            return None, f"policy {done.policy} is unusable: {exc.message}"
        except ValueError as exc:  # stored bytes that are not JSON at all
            return None, f"policy {done.policy} is unusable: not JSON or YAML ({exc})"

    async def _record(self, decision: GateDecided) -> None:
        # Audit row first, KV second, event last: a retry after any failure repeats the rest, and
        # the deterministic token / msg id keep the repeat from showing up twice.
        key = f"gate-{decision.eval_run or decision.id}"
        rules = json.dumps([msgspec.to_builtins(r) for r in decision.rules])
        row = [decision.id, decision.time, decision.release, "decided", "gatekeeper", decision.decision, decision.eval_run, decision.policy,
               decision.baseline, rules, decision.reason, decision.signature, decision.key_id, decision.tenant]
        await self.ctx.store.ainsert_rows("gate_decisions", DECISION_COLUMNS, [row], token=key)
        s = self.ctx.bus.subjects
        try:
            kv = await self.ctx.bus.kv(s.kv_gates)
            await kv.put(token(decision.release), encode(decision))
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot write decision for {decision.release} to KV {s.kv_gates}: {exc!r}") from None
        await self.ctx.bus.publish(s.gate_decided(decision.release), decision, msg_id=key)
