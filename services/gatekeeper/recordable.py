"""A decision is signed only as every reader will decode it again (probe p68 F1; no I/O)."""

from __future__ import annotations

import math

import msgspec

from lockgate.codec import Codec, encode
from lockgate.contracts import GateDecided, RuleResult
from lockgate.errors import InvalidEvent

_decided: Codec[GateDecided] = Codec(GateDecided)
_FLOATS = ("threshold", "observed", "low", "high", "baseline")  # RuleResult's numbers; only `threshold` is required


def recordable(decision: GateDecided) -> GateDecided:
    """`decision` if it decodes again from what it encodes to; else a BLOCK saying why, its rules that hold a number
    JSON cannot carry made ERROR rules without it (with no rules at all, should that still not decode).

    JSON has no infinity: one is written `null`. A rule derived from an infinite policy margin (a slice's
    `-max_regression`) had a threshold of -inf, the gatekeeper signed and stored the BLOCK it decided, and that value
    was no decision to anyone: the router, both watches, `decision()` and `gate verify` refused it, approvers could not
    reject over it, and every reader kept acting on the PASS before it (probe p68 F1)."""
    why = _undecodable(decision)
    if not why:
        return decision
    bad = [f"{r.rule}: {', '.join(f'{f} {getattr(r, f)}' for f in _unfinite(r))}" for r in decision.rules
           if _unfinite(r)]
    what = f" (rule {'; rule '.join(bad)})" if bad else ""
    block = msgspec.structs.replace(
        decision, decision="BLOCK", review_required="", rules=[_carried(r) for r in decision.rules],
        reason=f"the gatekeeper's {decision.decision} could not be recorded as made: it does not decode again ({why})"
               f"{what}; BLOCK instead: every number of the policy {decision.policy or '(none)'} must be finite and "
               f"within a float's range; fix it and run the eval again. {decision.reason}".rstrip())
    return block if not _undecodable(block) else msgspec.structs.replace(block, rules=[])


def _undecodable(decision: GateDecided) -> str:
    """Why `decision` does not decode from its own encoding ("" when it does)."""
    try:
        _decided.decode(encode(decision))
    except InvalidEvent as exc:
        return exc.message
    return ""


def _unfinite(rule: RuleResult) -> list[str]:
    return [f for f in _FLOATS if (v := getattr(rule, f)) is not None and not math.isfinite(v)]


def _carried(rule: RuleResult) -> RuleResult:
    """`rule` as an ERROR without its numbers JSON cannot carry (a threshold of 0, the others none)."""
    fields = _unfinite(rule)
    if not fields:
        return rule
    cleared = {f: 0.0 if f == "threshold" else None for f in fields}
    return msgspec.structs.replace(
        rule, **cleared, verdict="ERROR",
        hint=f"{', '.join(fields)} not a finite number (JSON cannot carry it): fix the policy; {rule.hint}".rstrip("; "),
        explanation=f"{rule.rule} cannot be recorded: its {', '.join(fields)} is not a finite number.")
