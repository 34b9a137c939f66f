"""Pure gate logic: threshold policies, rule evaluation and the decision (no I/O)."""

from __future__ import annotations

import hashlib
import math
import operator
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lockgate.contracts import EvalCompleted, RuleResult
from lockgate.contracts.gates import Decision
from lockgate.errors import PolicyError

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq,
}
NoData = Literal["fail", "pass"]


@dataclass(frozen=True)
class Rule:
    """`metric op threshold`, e.g. exact_match >= 0.8."""

    name: str
    metric: str
    op: str
    threshold: float


@dataclass(frozen=True)
class Policy:
    """A threshold policy. Missing metrics fail the gate unless `no_data` is "pass"."""

    name: str
    rules: tuple[Rule, ...]
    no_data: NoData = "fail"


def parse_policy(raw: Any) -> Policy:
    """Validate a policy document (parsed YAML/JSON) or raise PolicyError naming the field."""
    if not isinstance(raw, Mapping):
        raise PolicyError(f"policy: expected a mapping at the top level, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError("policy.name: required, a non-empty string")
    no_data = raw.get("no_data", "fail")
    if no_data not in ("fail", "pass"):
        raise PolicyError(f"policy.no_data: expected 'fail' or 'pass', got {no_data!r}")
    rules = raw.get("rules")
    if not isinstance(rules, list) or not rules:
        raise PolicyError("policy.rules: required, a non-empty list of {name, metric, op, threshold}")
    parsed = tuple(_parse_rule(r, i) for i, r in enumerate(rules))
    names = [r.name for r in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PolicyError(f"policy.rules: rule names must be unique; repeated: {', '.join(dupes)}")
    return Policy(name=name, rules=parsed, no_data=no_data)


def _parse_rule(raw: Any, i: int) -> Rule:
    at = f"policy.rules[{i}]"
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{at}: expected a mapping, got {type(raw).__name__}")
    metric = raw.get("metric")
    if not isinstance(metric, str) or not metric:
        raise PolicyError(f"{at}.metric: required, a non-empty string")
    op = raw.get("op")
    if op not in OPS:
        raise PolicyError(f"{at}.op: expected one of {', '.join(OPS)}, got {op!r}")
    threshold = raw.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise PolicyError(f"{at}.threshold: expected a finite number, got {threshold!r}")
    name = raw.get("name", f"{metric} {op} {threshold:g}")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{at}.name: expected a non-empty string, got {name!r}")
    return Rule(name=name, metric=metric, op=op, threshold=float(threshold))


def evaluate_rule(rule: Rule, metrics: Mapping[str, float]) -> RuleResult:
    """One rule against observed metrics: PASS, FAIL, or NO_DATA (metric missing or NaN)."""
    observed = metrics.get(rule.metric)
    if observed is None or not math.isfinite(observed):
        return RuleResult(rule=rule.name, metric=rule.metric, op=rule.op, threshold=rule.threshold,
                          observed=None, verdict="NO_DATA",
                          hint=f"{rule.metric} was not measured; known metrics: {', '.join(sorted(metrics)) or 'none'}")
    ok = OPS[rule.op](observed, rule.threshold)
    hint = (f"{rule.metric} = {observed:.4g} {rule.op} {rule.threshold:.4g}" if ok
            else f"{rule.metric} = {observed:.4g}, needs {rule.op} {rule.threshold:.4g}")
    return RuleResult(rule=rule.name, metric=rule.metric, op=rule.op, threshold=rule.threshold,
                      observed=observed, verdict="PASS" if ok else "FAIL", hint=hint)


@dataclass(frozen=True)
class Outcome:
    """The decision, each rule's result and a one-line reason."""

    decision: Decision
    rules: tuple[RuleResult, ...]
    reason: str


def decide(policy: Policy, metrics: Mapping[str, float]) -> Outcome:
    """PASS only if every rule passes (NO_DATA counts as a failure unless no_data is "pass")."""
    results = tuple(evaluate_rule(r, metrics) for r in policy.rules)
    failing = [r for r in results if r.verdict == "FAIL" or (r.verdict == "NO_DATA" and policy.no_data == "fail")]
    if not failing:
        return Outcome("PASS", results, f"all {len(results)} rules of policy {policy.name!r} passed")
    detail = "; ".join(f"{r.rule}: {r.hint}" for r in failing)
    return Outcome("BLOCK", results, f"{len(failing)} of {len(results)} rules failed: {detail}")


def decide_eval(policy: Policy | None, policy_error: str, done: EvalCompleted) -> Outcome:
    """The gate's outcome for a finished eval; a failed run or an unusable policy blocks (fail closed)."""
    if done.status != "completed":
        # Rules still shown when possible: "error_rate = 1" explains more than the status alone.
        rules = decide(policy, done.metrics).rules if policy is not None else ()
        return Outcome("BLOCK", rules, f"eval run {done.run_id} {done.status}: {done.error or 'no error given'}")
    if policy is None:
        return Outcome("BLOCK", (), policy_error or "no policy to judge the eval by")
    return decide(policy, done.metrics)


def decision_id(eval_event_id: str) -> str:
    """A UUIDv7-shaped id derived from the eval event, so a redelivered eval yields the same decision id.

    The 48-bit time comes from the eval event's UUIDv7 (keeping ids time-ordered); the rest is a hash.
    """
    digest = hashlib.sha256(f"gate:{eval_event_id}".encode()).digest()
    try:
        ms = uuid.UUID(eval_event_id).int >> 80
    except ValueError:
        ms = int.from_bytes(digest[:6], "big")
    value = ms << 80 | 0x7 << 76 | (int.from_bytes(digest[6:8], "big") & 0xFFF) << 64
    value |= 0b10 << 62 | int.from_bytes(digest[8:16], "big") & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))
