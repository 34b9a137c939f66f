"""Pure eval logic: suite validation, prompt rendering, scoring and aggregation (no I/O)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lockgate.contracts import EvalCaseResult
from lockgate.errors import ConfigError, LockgateError
from lockgate.services.evaluator.scorers import ASYNC_SCORERS, check_scorer, get_scorer


class SuiteError(ConfigError):
    """An eval suite or its dataset is malformed; the message names the field."""


@dataclass(frozen=True)
class ScorerSpec:
    """One scorer of a suite, with its weight in the overall score."""

    name: str
    weight: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict)
    threshold: float | None = None  # pass mark per case; None means a perfect 1.0

    @property
    def pass_mark(self) -> float:
        """The score a case needs on this scorer to count as passed."""
        return 1.0 if self.threshold is None else self.threshold


@dataclass(frozen=True)
class Case:
    """One dataset row: template variables and the expected answer."""

    id: str
    vars: Mapping[str, Any]
    expected: Any


@dataclass(frozen=True)
class TaskSpec:
    """Where outputs come from: `call` the endpoint, or `recorded` inference events of app/release."""

    type: str = "call"
    app: str = ""
    release: str = ""
    since: str = ""


@dataclass(frozen=True)
class CalibrationSpec:
    """Where each case's confidence comes from, which scorer decides correctness, and the ECE bins."""

    confidence: str  # "logprobs", or "field:<name>" of a JSON output
    scorer: str
    bins: int = 10

    @property
    def json_field(self) -> str:
        """The JSON field holding the confidence ("" for logprobs)."""
        return self.confidence.removeprefix("field:") if self.confidence.startswith("field:") else ""


@dataclass(frozen=True)
class Suite:
    """A validated eval suite. `dataset` is an artifact hash or inline cases."""

    name: str
    template: str
    scorers: tuple[ScorerSpec, ...]
    dataset: str | tuple[Case, ...]
    system: str = ""
    model: str = ""
    repeats: int = 1
    margin: float = 0.05
    rate_limit_rps: float = 0.0  # 0: unlimited
    task: TaskSpec = TaskSpec()
    price_book: str = ""  # artifact hash of a price book; "" uses the configured one
    calibration: CalibrationSpec | None = None


@dataclass(frozen=True)
class CaseResult:
    """The outcome of one (case, repeat): output, scores, latency, or the error."""

    case_id: str
    repeat: int
    input: str
    expected: Any
    output: str = ""
    scores: Mapping[str, float] = field(default_factory=dict)
    latency_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)  # judge replies, cache hits


def _need(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in raw:
        raise SuiteError(f"{where}: missing required field '{key}'")
    value = raw[key]
    if not isinstance(value, kind):
        raise SuiteError(f"{where}.{key}: expected {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", dict: "a mapping", list: "a list", int: "an integer", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def parse_suite(raw: Any) -> Suite:
    """Validate a suite document (already parsed from YAML/JSON) or raise SuiteError naming the field."""
    if not isinstance(raw, Mapping):
        raise SuiteError(f"suite: expected a mapping at the top level, got {type(raw).__name__}")
    name = _need(raw, "name", str, "suite")
    prompt = _need(raw, "prompt", dict, "suite")
    template = _need(prompt, "template", str, "suite.prompt")
    if not template.strip():
        raise SuiteError("suite.prompt.template: must not be empty")
    system = prompt.get("system") or ""
    if not isinstance(system, str):
        raise SuiteError(f"suite.prompt.system: expected a string, got {type(system).__name__}")
    model = raw.get("model") or ""
    if not isinstance(model, str):
        raise SuiteError(f"suite.model: expected a string, got {type(model).__name__}")
    dataset = _need(raw, "dataset", (str, list), "suite")
    if isinstance(dataset, str):
        if not dataset.startswith("sha256:"):
            raise SuiteError(f"suite.dataset: expected an artifact hash 'sha256:...', got {dataset!r}")
        parsed_dataset: str | tuple[Case, ...] = dataset
    else:
        parsed_dataset = parse_cases(dataset, where="suite.dataset")
    repeats = raw.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or not 1 <= repeats <= 100:
        raise SuiteError(f"suite.repeats: expected an integer from 1 to 100, got {repeats!r}")
    margin = raw.get("margin", 0.05)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 < margin < 1:
        raise SuiteError(f"suite.margin: expected a number between 0 and 1 (exclusive), got {margin!r}")
    rps = raw.get("rate_limit_rps", 0) or 0
    if isinstance(rps, bool) or not isinstance(rps, int | float) or rps < 0:
        raise SuiteError(f"suite.rate_limit_rps: expected a number >= 0 (0 = unlimited), got {rps!r}")
    price_book = raw.get("price_book") or ""
    if not isinstance(price_book, str) or (price_book and not price_book.startswith("sha256:")):
        raise SuiteError(f"suite.price_book: expected an artifact hash 'sha256:...', got {price_book!r}")
    scorers = _parse_scorers(_need(raw, "scorers", list, "suite"))
    task = _parse_task(raw.get("task"))
    return Suite(
        name=name, template=template, system=system, model=model, dataset=parsed_dataset,
        scorers=scorers, repeats=repeats, margin=float(margin),
        rate_limit_rps=float(rps), task=task, price_book=price_book,
        calibration=_parse_calibration(raw.get("calibration"), scorers, task),
    )


def _parse_calibration(raw: Any, scorers: tuple[ScorerSpec, ...], task: TaskSpec) -> CalibrationSpec | None:
    if raw is None:
        return None
    where = "suite.calibration"
    if not isinstance(raw, Mapping):
        raise SuiteError(f"{where}: expected a mapping with 'confidence', got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"confidence", "scorer", "bins"})
    if unknown:
        raise SuiteError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                         "allowed: confidence, scorer, bins")
    source = _need(raw, "confidence", str, where)
    if source != "logprobs" and not (source.startswith("field:") and source.removeprefix("field:").strip()):
        raise SuiteError(f"{where}.confidence: expected 'logprobs' or 'field:<name>', got {source!r}")
    if source == "logprobs" and task.type == "recorded":
        raise SuiteError(f"{where}.confidence: 'logprobs' needs task type 'call' (recorded outputs carry no "
                         "logprobs); use 'field:<name>'")
    names = [s.name for s in scorers]
    scorer = raw.get("scorer", names[0])
    if scorer not in names:
        raise SuiteError(f"{where}.scorer: expected one of the suite's scorers ({', '.join(names)}), got {scorer!r}")
    bins = raw.get("bins", 10)
    if not isinstance(bins, int) or isinstance(bins, bool) or not 1 <= bins <= 100:
        raise SuiteError(f"{where}.bins: expected an integer from 1 to 100, got {bins!r}")
    return CalibrationSpec(confidence=source, scorer=scorer, bins=bins)


def _parse_task(raw: Any) -> TaskSpec:
    if raw is None:
        return TaskSpec()
    if not isinstance(raw, Mapping):
        raise SuiteError(f"suite.task: expected a mapping with 'type', got {type(raw).__name__}")
    kind = raw.get("type", "call")
    if kind == "call":
        return TaskSpec()
    if kind != "recorded":
        raise SuiteError(f"suite.task.type: expected 'call' or 'recorded', got {kind!r}")
    app = _need(raw, "app", str, "suite.task")
    release = _need(raw, "release", str, "suite.task")
    since = raw.get("since") or ""
    if not isinstance(since, str):
        since = since.isoformat() if hasattr(since, "isoformat") else str(since)
    if since:
        try:
            datetime.fromisoformat(since)
        except ValueError:
            raise SuiteError(f"suite.task.since: expected an ISO-8601 time, got {since!r}") from None
    return TaskSpec(type="recorded", app=app, release=release, since=since)


def _parse_scorers(raw: list[Any]) -> tuple[ScorerSpec, ...]:
    if not raw:
        raise SuiteError("suite.scorers: at least one scorer is required")
    out = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"suite.scorers[{i}]"
        if isinstance(item, str):  # shorthand: `- exact_match`
            item = {"name": item}
        if not isinstance(item, Mapping):
            raise SuiteError(f"{where}: expected a mapping with 'name', got {type(item).__name__}")
        name = _need(item, "name", str, where)
        try:
            get_scorer(name)
        except LockgateError as exc:
            raise SuiteError(f"{where}.name: {exc.message}") from None
        if name in seen:
            raise SuiteError(f"{where}.name: scorer {name!r} is listed twice")
        seen.add(name)
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
            raise SuiteError(f"{where}.weight: expected a number >= 0, got {weight!r}")
        params = item.get("params") or {}
        if not isinstance(params, Mapping):
            raise SuiteError(f"{where}.params: expected a mapping, got {type(params).__name__}")
        threshold = item.get("threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                      or not 0 <= threshold <= 1):
            raise SuiteError(f"{where}.threshold: expected a number from 0 to 1, got {threshold!r}")
        try:
            check_scorer(name, params)
        except LockgateError as exc:
            raise SuiteError(f"{where}: {exc.message}") from None
        out.append(ScorerSpec(name=name, weight=float(weight), params=dict(params),
                              threshold=None if threshold is None else float(threshold)))
    if not any(s.weight > 0 for s in out):
        raise SuiteError("suite.scorers: at least one scorer needs a weight above 0")
    return tuple(out)


def parse_cases(rows: Sequence[Any], *, where: str = "dataset") -> tuple[Case, ...]:
    """Validate dataset rows ({id?, vars: {...} | input: str, expected}) into Cases."""
    if not isinstance(rows, list | tuple):
        raise SuiteError(f"{where}: expected a list of cases (JSONL lines), got {type(rows).__name__}")
    if not rows:
        raise SuiteError(f"{where}: the dataset has no cases")
    cases = []
    ids: set[str] = set()
    for i, row in enumerate(rows):
        at = f"{where}[{i}]"
        if not isinstance(row, Mapping):
            raise SuiteError(f"{at}: expected a mapping, got {type(row).__name__}")
        if "vars" in row:
            variables = row["vars"]
            if not isinstance(variables, Mapping):
                raise SuiteError(f"{at}.vars: expected a mapping, got {type(variables).__name__}")
        elif "input" in row:
            if not isinstance(row["input"], str):
                raise SuiteError(f"{at}.input: expected a string, got {type(row['input']).__name__}")
            variables = {"input": row["input"]}
        else:
            raise SuiteError(f"{at}: needs 'vars' (a mapping) or 'input' (a string)")
        if "expected" not in row:
            raise SuiteError(f"{at}: missing required field 'expected'")
        case_id = str(row.get("id", i))
        if case_id in ids:
            raise SuiteError(f"{at}.id: duplicate case id {case_id!r}")
        ids.add(case_id)
        cases.append(Case(id=case_id, vars=dict(variables), expected=row["expected"]))
    return tuple(cases)


def render(suite: Suite, case: Case) -> list[dict[str, str]]:
    """OpenAI chat messages for one case; a missing template variable names the case."""
    try:
        user = suite.template.format_map(case.vars)
    except KeyError as exc:
        raise SuiteError(
            f"case {case.id!r}: template variable {{{exc.args[0]}}} is not in its vars "
            f"({', '.join(sorted(case.vars)) or 'none'})"
        ) from None
    except (ValueError, IndexError, AttributeError) as exc:
        raise SuiteError(f"suite.prompt.template: cannot render for case {case.id!r}: {exc}") from None
    messages = [{"role": "system", "content": suite.system}] if suite.system else []
    messages.append({"role": "user", "content": user})
    return messages


def score(suite: Suite, output: str, expected: Any, *, case_id: str = "") -> dict[str, float]:
    """Every suite scorer's score for one output, clamped to [0, 1]; a scorer failure is a SuiteError."""
    out = {}
    for spec in suite.scorers:
        if spec.name in ASYNC_SCORERS:  # scored by the runner, which can make calls
            continue
        try:
            value = float(get_scorer(spec.name)(output, expected, spec.params))
        except Exception as exc:
            detail = exc.message if isinstance(exc, LockgateError) else repr(exc)
            raise SuiteError(f"scorer {spec.name!r} failed on case {case_id!r}: {detail}") from None
        out[spec.name] = 0.0 if math.isnan(value) else min(1.0, max(0.0, value))
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def case_scores(suite: Suite, r: CaseResult) -> dict[str, float]:
    """One row's score per scorer plus the weighted `score`; an errored row scores 0 everywhere."""
    out = {spec.name: r.scores.get(spec.name, 0.0) for spec in suite.scorers}
    total_weight = sum(s.weight for s in suite.scorers)
    out["score"] = sum(s.weight * out[s.name] for s in suite.scorers) / total_weight
    return out


def passes(suite: Suite, r: CaseResult) -> dict[str, bool]:
    """Per scorer: did this row reach the scorer's pass mark (threshold, or 1.0)?"""
    return {spec.name: (not r.error) and r.scores.get(spec.name, 0.0) >= spec.pass_mark for spec in suite.scorers}


def aggregate(suite: Suite, results: Sequence[CaseResult], costs: Sequence[float] | None = None) -> dict[str, float]:
    """Run metrics: per-scorer mean and pass rate, weighted `score`, latency p50/p95, `error_rate`, cost, `n`.

    An errored case scores 0 on every scorer, so a flaky endpoint cannot look accurate by
    answering only the easy cases. Latency is over successful calls only; when none
    succeeded the latency metrics are absent (a gate then sees NO_DATA, not a fake 0).
    """
    n = len(results)
    metrics: dict[str, float] = {"n": float(n)}
    if n == 0:
        return metrics
    rows = [case_scores(suite, r) for r in results]
    for spec in suite.scorers:
        metrics[spec.name] = sum(row[spec.name] for row in rows) / n
        metrics[f"{spec.name}_pass_rate"] = sum(passes(suite, r)[spec.name] for r in results) / n
    metrics["score"] = sum(row["score"] for row in rows) / n
    agreement = [r.scores[JUDGE_AGREEMENT] for r in results if JUDGE_AGREEMENT in r.scores]
    if agreement:
        metrics[JUDGE_AGREEMENT] = sum(agreement) / len(agreement)
    errors = sum(1 for r in results if r.error)
    metrics["error_rate"] = errors / n
    latencies = [r.latency_ms for r in results if not r.error]
    if latencies:
        metrics["latency_p50_ms"] = percentile(latencies, 50)
        metrics["latency_p95_ms"] = percentile(latencies, 95)
    if costs is not None:
        metrics["cost_usd_total"] = float(sum(costs))
        metrics["cost_usd_per_case"] = float(sum(costs)) / n
    return metrics


JUDGE_AGREEMENT = "llm_judge_agreement"


def expected_text(expected: Any) -> str:
    """Expected value as stored in `eval_cases` (strings as-is, anything else as JSON)."""
    return expected if isinstance(expected, str) else json.dumps(expected, sort_keys=True)


def failure_summary(results: Sequence[CaseResult]) -> str:
    """Why a run failed when no call succeeded ("" if any did)."""
    if not results or any(not r.error for r in results):
        return ""
    return f"all {len(results)} calls failed; first error: {results[0].error}"


def case_fact(r: CaseResult) -> EvalCaseResult:
    """One case as published for `eval_cases` (the expected value as text)."""
    return EvalCaseResult(case_id=r.case_id, repeat=r.repeat, input=r.input, expected=expected_text(r.expected),
                          output=r.output, scores=dict(r.scores), latency_ms=r.latency_ms,
                          input_tokens=r.input_tokens, output_tokens=r.output_tokens, error=r.error,
                          details=dict(r.details))
