"""Gate policies: the parsed shape and validation that names the offending field (no I/O)."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from lockgate.errors import PolicyError

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq,
}
NoData = Literal["fail", "pass"]
Kind = Literal["absolute", "relative", "non_inferiority"]


@dataclass(frozen=True)
class Rule:
    """One check on one metric. `kind` picks the fields that matter (see docs in parse_policy)."""

    name: str
    metric: str
    op: str = ">="
    threshold: float = 0.0
    kind: Kind = "absolute"
    use_interval: bool = True
    # relative: the candidate must improve by >= change (min_change) or regress by <= change (max_regression)
    change_kind: Literal["min_change", "max_regression"] = "max_regression"
    change: float = 0.0
    mode: Literal["absolute", "relative"] = "absolute"
    better: Literal["higher", "lower"] = "higher"
    margin: float = 0.0
    hard: bool = False
    dry_run: bool = False
    no_data: NoData | None = None  # None: the policy's setting


@dataclass(frozen=True)
class Limits:
    """How many non-passing rules a decision tolerates before it stops being PASS."""

    max_failures: int = 0
    max_inconclusive: int = 0
    max_consecutive_errors: int = 3


@dataclass(frozen=True)
class ReviewTrigger:
    """`metric_moved: GLOB, by: X` or `artifact_changed: GLOB`: a human must approve when it fires."""

    kind: Literal["metric_moved", "artifact_changed"]
    pattern: str
    by: float = 0.0


@dataclass(frozen=True)
class Policy:
    """A gate policy. Missing metrics fail the gate unless `no_data` is "pass"."""

    name: str
    rules: tuple[Rule, ...]
    no_data: NoData = "fail"
    version: str = ""
    limits: Limits = Limits()
    review: tuple[ReviewTrigger, ...] = ()


def _num(raw: Any, at: str, *, minimum: float | None = None) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise PolicyError(f"{at}: expected a finite number, got {raw!r}")
    if minimum is not None and raw < minimum:
        raise PolicyError(f"{at}: expected a number >= {minimum:g}, got {raw!r}")
    return float(raw)


def _int(raw: Any, at: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise PolicyError(f"{at}: expected a whole number >= 0, got {raw!r}")
    return raw


def _choice(raw: Any, at: str, choices: tuple[str, ...]) -> Any:
    if raw not in choices:
        raise PolicyError(f"{at}: expected one of {', '.join(repr(c) for c in choices)}, got {raw!r}")
    return raw


def _flag(raw: Mapping[str, Any], key: str, at: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise PolicyError(f"{at}.{key}: expected true or false, got {value!r}")
    return value


def _mapping(raw: Any, at: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{at}: expected a mapping, got {type(raw).__name__}")
    return raw


def parse_policy(raw: Any) -> Policy:
    """Validate a policy document (parsed YAML/JSON) or raise PolicyError naming the field."""
    if not isinstance(raw, Mapping):
        raise PolicyError(f"policy: expected a mapping at the top level, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError("policy.name: required, a non-empty string")
    version = raw.get("version", "")
    if not isinstance(version, str | int | float) or isinstance(version, bool):
        raise PolicyError(f"policy.version: expected a string, got {version!r}")
    no_data = raw.get("no_data", "fail")
    if no_data not in ("fail", "pass"):
        raise PolicyError(f"policy.no_data: expected 'fail' or 'pass', got {no_data!r}")
    rules = raw.get("rules")
    if not isinstance(rules, list) or not rules:
        raise PolicyError("policy.rules: required, a non-empty list of {name, metric, op, threshold}")
    use_interval = _flag(raw, "use_interval", "policy", True)
    parsed = tuple(_parse_rule(r, i, use_interval) for i, r in enumerate(rules))
    names = [r.name for r in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PolicyError(f"policy.rules: rule names must be unique; repeated: {', '.join(dupes)}")
    return Policy(name=name, rules=parsed, no_data=no_data, version=str(version),
                  limits=_parse_limits(raw.get("limits", {})), review=_parse_review(raw.get("review")))


def _parse_limits(raw: Any) -> Limits:
    lim = _mapping(raw, "policy.limits")
    unknown = sorted(set(lim) - {"max_failures", "max_inconclusive", "max_consecutive_errors"})
    if unknown:
        raise PolicyError(f"policy.limits.{unknown[0]}: unknown limit; known: max_failures, max_inconclusive, "
                          "max_consecutive_errors")
    d = Limits()
    return Limits(**{k: _int(lim.get(k, getattr(d, k)), f"policy.limits.{k}")
                     for k in ("max_failures", "max_inconclusive", "max_consecutive_errors")})


def _parse_review(raw: Any) -> tuple[ReviewTrigger, ...]:
    if raw is None:
        return ()
    when = _mapping(raw, "policy.review").get("require_when")
    if not isinstance(when, list) or not when:
        raise PolicyError("policy.review.require_when: required, a non-empty list of "
                          "{metric_moved: GLOB, by: NUMBER} or {artifact_changed: GLOB}")
    out = []
    for i, item in enumerate(when):
        at = f"policy.review.require_when[{i}]"
        t = _mapping(item, at)
        if "metric_moved" in t:
            pattern = t["metric_moved"]
            by = _num(t.get("by"), f"{at}.by", minimum=0)
            kind = "metric_moved"
        elif "artifact_changed" in t:
            pattern, by, kind = t["artifact_changed"], 0.0, "artifact_changed"
        else:
            raise PolicyError(f"{at}: expected a metric_moved or artifact_changed key, got {sorted(t)}")
        if not isinstance(pattern, str) or not pattern:
            raise PolicyError(f"{at}.{kind}: expected a non-empty glob such as 'safety.*', got {pattern!r}")
        out.append(ReviewTrigger(kind=kind, pattern=pattern, by=by))
    return tuple(out)


def _parse_rule(raw: Any, i: int, use_interval: bool = True) -> Rule:
    at = f"policy.rules[{i}]"
    r = _mapping(raw, at)
    metric = r.get("metric")
    if not isinstance(metric, str) or not metric:
        raise PolicyError(f"{at}.metric: required, a non-empty string")
    common: dict[str, Any] = {"metric": metric, "hard": _flag(r, "hard", at, False),
                              "dry_run": _flag(r, "dry_run", at, False)}
    if "no_data" in r:
        common["no_data"] = _choice(r["no_data"], f"{at}.no_data", ("fail", "pass"))
    kinds = [k for k in ("relative", "non_inferiority") if k in r]
    if len(kinds) > 1:
        raise PolicyError(f"{at}: a rule is either relative or non_inferiority, not both")
    if kinds == ["relative"]:
        rule = _relative(r["relative"], f"{at}.relative", common)
    elif kinds == ["non_inferiority"]:
        ni = _mapping(r["non_inferiority"], f"{at}.non_inferiority")
        rule = Rule(name="", kind="non_inferiority", margin=_num(ni.get("margin"), f"{at}.non_inferiority.margin",
                                                                  minimum=0),
                    better=_choice(ni.get("better", "higher"), f"{at}.non_inferiority.better", ("higher", "lower")),
                    **common)
    else:
        op = r.get("op")
        if op not in OPS:
            raise PolicyError(f"{at}.op: expected one of {', '.join(OPS)}, got {op!r}")
        threshold = _num(r.get("threshold"), f"{at}.threshold")
        rule = Rule(name=f"{metric} {op} {threshold:g}", op=op, threshold=threshold,
                    use_interval=_flag(r, "use_interval", at, use_interval), **common)
    name = r.get("name", rule.name or f"{metric} {rule.kind}")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{at}.name: expected a non-empty string, got {name!r}")
    return replace(rule, name=name)


def _relative(raw: Any, at: str, common: dict[str, Any]) -> Rule:
    rel = _mapping(raw, at)
    keys = [k for k in ("min_change", "max_regression") if k in rel]
    if len(keys) != 1:
        raise PolicyError(f"{at}: expected exactly one of min_change or max_regression, got {sorted(rel)}")
    key = keys[0]
    change = _num(rel[key], f"{at}.{key}", minimum=0 if key == "max_regression" else None)
    return Rule(name="", kind="relative", change_kind=key, change=change,
                mode=_choice(rel.get("mode", "absolute"), f"{at}.mode", ("absolute", "relative")),
                better=_choice(rel.get("better", "higher"), f"{at}.better", ("higher", "lower")), **common)
