"""Pure eval logic: the suite document, prompt rendering, scoring and aggregation (no I/O)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from lockgate.contracts import EvalCaseResult
from lockgate.documents import ArtifactHash, NonEmpty, NonNegative, at, convert, reroot
from lockgate.errors import ConfigError, LockgateError
from lockgate.ids import content_hash
from lockgate.services.evaluator.scorers import ASYNC_SCORERS, check_scorer, get_scorer
from lockgate.textbound import STRIPPED_BYTES, TEXT_BYTES, TRUNCATED, cut, marker
from lockgate.textbound import size as text_size


class SuiteError(ConfigError):
    """An eval suite or its dataset is malformed; the message names the path."""


class ScorerSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One scorer of a suite, with its weight in the overall score."""

    name: str
    weight: NonNegative = 1.0
    params: dict[str, Any] = {}
    threshold: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None  # pass mark per case; None: a perfect 1.0

    @property
    def pass_mark(self) -> float:
        """The score a case needs on this scorer to count as passed."""
        return 1.0 if self.threshold is None else self.threshold


# A case id's bound, checked where a dataset is decoded: the id is a case's key in every result, log line and error of
# its run, kept whole where its texts are cut, so a dataset row's id of 1.1 MB made the case's result 2 MB even as an
# unpublishable error, over a bus message, and the run was dead-lettered (probe p58 F2). An integer id is an int64.
CASE_ID_MAX = 1024
CaseId = Annotated[str, msgspec.Meta(max_length=CASE_ID_MAX)] | Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class Case(msgspec.Struct, frozen=True, kw_only=True):
    """One dataset row: template variables (`vars`, or the shorthand `input`) and the expected answer.

    Unlike the suite and policy, extra columns are allowed: real datasets carry metadata (source,
    tags, slice labels) beside the fields an eval reads."""

    expected: Any
    vars: dict[str, Any] | None = None  # always a mapping once decoded: `input` is folded into it
    id: CaseId = ""  # "": the row's position in the dataset
    input: str | None = None
    tags: tuple[str, ...] | str = ()  # slice labels (a suite's `slices: [tags]`); one tag may be a string
    meta: dict[str, Any] = {}  # fields a suite may slice on that the prompt does not use

    def __post_init__(self) -> None:
        if isinstance(self.tags, str):
            msgspec.structs.force_setattr(self, "tags", (self.tags,))
        if self.input is not None:
            if self.vars is not None:
                raise ValueError("give 'vars' or 'input', not both")
            msgspec.structs.force_setattr(self, "vars", {"input": self.input})
            msgspec.structs.force_setattr(self, "input", None)
        elif self.vars is None:
            raise ValueError("needs 'vars' (a mapping) or 'input' (a string)")
        if not isinstance(self.id, str):
            msgspec.structs.force_setattr(self, "id", str(self.id))


Dataset = Annotated[tuple[Case, ...], msgspec.Meta(min_length=1)]


def _numbered(cases: tuple[Case, ...], path: str) -> tuple[Case, ...]:
    """Rows without an id take their position; ids must be unique (results are keyed by them)."""
    seen: set[str] = set()
    for i, case in enumerate(cases):
        if case.id == "":
            msgspec.structs.force_setattr(case, "id", str(i))
        if case.id in seen:
            raise at(f"{path}[{i}].id", f"duplicate case id {case.id!r}")
        seen.add(case.id)
    return cases


class Prompt(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The user message template (str.format over a case's vars) and an optional system message."""

    template: str
    system: str = ""

    def __post_init__(self) -> None:
        if not self.template.strip():
            raise ValueError("template must not be blank")


class CallTask(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", tag="call"):
    """Outputs come from calling the endpoint under evaluation."""

    @property
    def type(self) -> Literal["call"]:
        """The task's tag."""
        return "call"


class RecordedTask(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", tag="recorded"):
    """Outputs come from inference events already recorded for app/release (since a time)."""

    app: NonEmpty
    release: NonEmpty
    since: str = ""

    def __post_init__(self) -> None:
        if self.since:
            try:
                datetime.fromisoformat(self.since)
            except ValueError:
                raise ValueError(f"since: expected an ISO-8601 time, got {self.since!r}") from None

    @property
    def type(self) -> Literal["recorded"]:
        """The task's tag."""
        return "recorded"


class CalibrationSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where each case's confidence comes from, which scorer decides correctness, and the ECE bins."""

    confidence: str  # "logprobs", or "field:<name>" of a JSON output
    scorer: str = ""  # "": the suite's first scorer
    bins: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10

    def __post_init__(self) -> None:
        if self.confidence != "logprobs" and not self.json_field.strip():
            raise ValueError(f"confidence: expected 'logprobs' or 'field:<name>', got {self.confidence!r}")

    @property
    def json_field(self) -> str:
        """The JSON field holding the confidence ("" for logprobs)."""
        return self.confidence.removeprefix("field:") if self.confidence.startswith("field:") else ""


class SliceSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Report every metric per slice: by `tags`, by a field's value (in vars or meta), or in numeric
    `buckets` of a field (of its length, for text)."""

    key: NonEmpty
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError("buckets must be increasing edges, e.g. [100, 500]")


# The slowest pace a suite may ask for (rate_limit_rps): below it, waiting for the next token alone would hold a run's
# slot for hours (one call a second at 1e-6 waits 11 days).
MIN_RATE_RPS = 0.01


class Suite(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An eval suite. `dataset` is an artifact hash or inline cases."""

    name: str
    prompt: Prompt
    dataset: ArtifactHash | Dataset
    # `- exact_match` is short for `- {name: exact_match}`; every item is a ScorerSpec once decoded
    scorers: Annotated[tuple[str | ScorerSpec, ...], msgspec.Meta(min_length=1)]
    model: str = ""
    repeats: Annotated[int, msgspec.Meta(ge=1, le=100)] = 1
    margin: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.05
    power: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.8  # of the sample-size warning (as the gate's `power`)
    rate_limit_rps: NonNegative = 0.0  # 0: unlimited
    task: CallTask | RecordedTask = CallTask()
    price_book: Annotated[str, msgspec.Meta(pattern="^(sha256:|$)")] = ""  # "": the configured price book
    calibration: CalibrationSpec | None = None
    # `- lang` is short for `- {key: lang}`; every item is a SliceSpec once decoded
    slices: tuple[str | SliceSpec, ...] = ()

    def __post_init__(self) -> None:
        if 0 < self.rate_limit_rps < MIN_RATE_RPS:
            raise at("$.rate_limit_rps", f"Expected 0 (unlimited) or at least {MIN_RATE_RPS:g} calls a second, got "
                                         f"{self.rate_limit_rps:g}")
        msgspec.structs.force_setattr(self, "slices", tuple(SliceSpec(key=s) if isinstance(s, str) else s
                                                            for s in self.slices))
        # Checks across fields and against the scorer registry; paths are written out (this is the root).
        specs: list[ScorerSpec] = []
        for i, item in enumerate(self.scorers):
            spec = ScorerSpec(name=item) if isinstance(item, str) else item
            where = f"$.scorers[{i}]"
            try:
                get_scorer(spec.name)
            except LockgateError as exc:
                raise at(where if isinstance(item, str) else f"{where}.name", exc.message) from None
            if any(s.name == spec.name for s in specs):
                raise at(where, f"scorer {spec.name!r} is listed twice")
            try:
                check_scorer(spec.name, spec.params)
            except msgspec.ValidationError as exc:
                raise ValueError(reroot(f"{where}.params", exc)) from None
            except LockgateError as exc:
                raise at(where, exc.message) from None
            specs.append(spec)
        if not any(s.weight > 0 for s in specs):
            raise at("$.scorers", "at least one scorer needs a weight above 0")
        msgspec.structs.force_setattr(self, "scorers", tuple(specs))
        if not isinstance(self.dataset, str):
            _numbered(self.dataset, "$.dataset")
        cal = self.calibration
        if cal is not None:
            names = [s.name for s in specs]
            if not cal.scorer:
                msgspec.structs.force_setattr(cal, "scorer", names[0])
            elif cal.scorer not in names:
                raise at("$.calibration.scorer",
                         f"expected one of the suite's scorers ({', '.join(names)}), got {cal.scorer!r}")
            if cal.confidence == "logprobs" and self.task.type == "recorded":
                raise at("$.calibration.confidence", "'logprobs' needs task type 'call' (recorded outputs carry "
                                                     "no logprobs); use 'field:<name>'")

    @property
    def template(self) -> str:
        """The user message template."""
        return self.prompt.template

    @property
    def system(self) -> str:
        """The system message ("" for none)."""
        return self.prompt.system


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


# A case's `details` key marking it answered from the eval cache (runner.py), and the run metric counting them.
CACHED = "cached"
N_CACHED = "n_cached"


def _bucket(key: str, value: Any, edges: tuple[float, ...]) -> str | None:
    x = value if isinstance(value, int | float) and not isinstance(value, bool) else len(str(value))
    if not math.isfinite(x):
        return None
    if x < edges[0]:
        return f"{key}<{edges[0]:g}"
    for lo, hi in zip(edges, edges[1:], strict=False):
        if lo <= x < hi:
            return f"{key}{lo:g}-{hi:g}"
    return f"{key}>={edges[-1]:g}"


def slice_labels(suite: Suite, case: Case) -> tuple[str, ...]:
    """The slices a case belongs to under the suite's `slices` ("lang=de", "tag=hard", "input<100")."""
    out: list[str] = []
    for spec in suite.slices:
        assert isinstance(spec, SliceSpec)
        if spec.key == "tags":
            out.extend(f"tag={t}" for t in case.tags)
            continue
        value = (case.vars or {}).get(spec.key, case.meta.get(spec.key))
        if value is None:
            continue
        label = _bucket(spec.key, value, spec.buckets) if spec.buckets else f"{spec.key}={value}"
        if label is not None:
            out.append(label)
    return tuple(out)


def parse_suite(raw: Any, *, name: str = "suite") -> Suite:
    """Decode a suite document (already parsed from YAML/JSON) or raise SuiteError naming the path."""
    return convert(raw, Suite, name=name, error=SuiteError)


def parse_cases(rows: Any, *, where: str = "dataset") -> tuple[Case, ...]:
    """Decode dataset rows ({id?, vars: {...} | input: str, expected}) into Cases, or SuiteError naming the path."""
    cases = convert(rows, Dataset, name=where, error=SuiteError)
    try:
        return _numbered(cases, "$")
    except ValueError as exc:
        raise SuiteError(f"{where}: {exc}") from None


def render(suite: Suite, case: Case, *, where: str = "suite.prompt.template") -> list[dict[str, str]]:
    """OpenAI chat messages for one case; an error names `where` the template comes from, the case, and the
    missing variable."""
    try:
        user = suite.template.format_map(case.vars)
    except KeyError as exc:
        raise SuiteError(
            f"{where}: case {case.id!r}: template variable {{{exc.args[0]}}} is not in its vars "
            f"({', '.join(sorted(case.vars)) or 'none'})"
        ) from None
    except (ValueError, IndexError, AttributeError) as exc:
        raise SuiteError(f"{where}: cannot render for case {case.id!r}: {exc}") from None
    messages = [{"role": "system", "content": suite.system}] if suite.system else []
    messages.append({"role": "user", "content": user})
    return messages


class PromptError(ConfigError):
    """A release's prompt artifact cannot render the eval's cases; the message names the artifact."""


class PromptArtifact(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A `prompt/*` artifact as an eval renders it: a system message and a user message template, each optional
    (one at least). A text artifact is a system message alone."""

    system: str = ""
    template: str = ""


def bound_prompt(artifacts: Mapping[str, str], release: str) -> tuple[str, str] | None:
    """The release's one `prompt/*` entry (`prompt/name`, hash) an eval renders every case with; None when it binds
    none (the suite's prompt renders). PromptError when it binds several: which one its application sends is not
    said, and judging one would name the others as judged."""
    found = sorted((k, h) for k, h in artifacts.items() if k.startswith("prompt/"))
    if len(found) > 1:
        raise PromptError(f"release {release!r} binds {len(found)} prompt artifacts ({', '.join(k for k, _ in found)}): "
                          "an eval renders every case with the release's prompt, so a release binds one "
                          "prompt/* artifact (its system message and template)")
    return found[0] if found else None


def with_prompt(suite: Suite, where: str, data: bytes) -> tuple[Suite, str]:
    """`suite` rendering with the release's prompt artifact `where` (`prompt/name=sha256:...`, stored as `data`):
    the artifact's system message (none when it gives none) and its template, or the suite's template when it
    gives none (a system prompt alone leaves how each case is asked to the suite); and where its template comes
    from, as a render error names it. PromptError naming `where` when `data` is no prompt."""
    try:
        raw: Any = json.loads(data)
    except ValueError:  # stored as registered: a .txt or .md prompt
        try:
            raw = data.decode()
        except UnicodeDecodeError:
            raise PromptError(f"prompt artifact {where} is neither JSON nor UTF-8 text") from None
    art = PromptArtifact(system=raw) if isinstance(raw, str) else \
        convert(raw, PromptArtifact, name=f"prompt artifact {where}", error=PromptError)
    if not art.system.strip() and not art.template.strip():
        raise PromptError(f"prompt artifact {where} gives neither a system message nor a template: give "
                          "{system, template} (either may be left out), or text, which is a system message")
    if not art.template.strip():
        return msgspec.structs.replace(suite, prompt=Prompt(template=suite.template, system=art.system)), \
            "suite.prompt.template"
    return msgspec.structs.replace(suite, prompt=Prompt(template=art.template, system=art.system)), \
        f"prompt artifact {where}"


def unread(artifacts: Mapping[str, str], *, suite: str, dataset: str, policy: str) -> list[str]:
    """The release's artifacts (`kind/name=hash`) a run did not read: its prompt and model config are read (the
    cases are rendered with the one and sent to the other), its `eval_suite/*`, `dataset/*` and `policy/*` only
    when they are the suite, dataset and policy of the run, anything else (a tool) never."""
    used = {"eval_suite": suite, "dataset": dataset, "policy": policy}
    out = []
    for key, digest in sorted(artifacts.items()):
        kind = key.partition("/")[0]
        if kind in ("prompt", "model_config") or used.get(kind) == digest:
            continue
        out.append(f"{key}={digest}")
    return out


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


def case_scores(suite: Suite, r: CaseResult) -> dict[str, float | None]:
    """One row's score per scorer plus the weighted `score`; an errored row scores 0 everywhere.

    A scorer that failed on an answered row (an unreadable judge reply, a judge timeout) left no score:
    that value is missing (None), not 0, and so is the row's weighted `score`.
    """
    if r.error:
        out: dict[str, float | None] = {spec.name: 0.0 for spec in suite.scorers}
        out["score"] = 0.0
        return out
    out = {spec.name: r.scores.get(spec.name) for spec in suite.scorers}
    total_weight = sum(s.weight for s in suite.scorers)
    weighted = [(s.weight, out[s.name]) for s in suite.scorers if s.weight > 0]
    out["score"] = None if any(v is None for _, v in weighted) else \
        sum(w * v for w, v in weighted) / total_weight  # type: ignore[operator,misc]
    return out


def passes(suite: Suite, r: CaseResult) -> dict[str, bool | None]:
    """Per scorer: did this row reach the scorer's pass mark (threshold, or 1.0)? None: the score is missing."""
    if r.error:
        return {spec.name: False for spec in suite.scorers}
    return {spec.name: None if spec.name not in r.scores else r.scores[spec.name] >= spec.pass_mark
            for spec in suite.scorers}


def measured(suite: Suite, results: Sequence[CaseResult], name: str
             ) -> tuple[list[CaseResult], list[float]]:
    """The rows with a value of `name` (a scorer or `score`) and those values; missing rows are left out."""
    return _present(results, lambda r: case_scores(suite, r)[name])


def passed(suite: Suite, results: Sequence[CaseResult], name: str) -> tuple[list[CaseResult], list[bool]]:
    """The rows with a pass/fail on scorer `name` and those outcomes; missing rows are left out."""
    return _present(results, lambda r: passes(suite, r)[name])


T = TypeVar("T")


def _present(results: Sequence[CaseResult], get: Callable[[CaseResult], T | None]) -> tuple[list[CaseResult], list[T]]:
    pairs = [(r, v) for r in results if (v := get(r)) is not None]
    return [r for r, _ in pairs], [v for _, v in pairs]


def missing_shares(suite: Suite, results: Sequence[CaseResult]) -> dict[str, float]:
    """`<scorer>_missing` (and `score_missing`): the share of answered rows without that score, where any is.

    A gate reads these to tell a broken measurement from a regression.
    """
    answered = [r for r in results if not r.error]
    if not answered:
        return {}
    out: dict[str, float] = {}
    for name in [s.name for s in suite.scorers] + ["score"]:
        gone = sum(1 for r in answered if case_scores(suite, r)[name] is None)
        if gone or name in ASYNC_SCORERS:
            out[f"{name}_missing"] = gone / len(answered)
    return out


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
    for name in [s.name for s in suite.scorers] + ["score"]:
        _, values = measured(suite, results, name)
        if values:
            metrics[name] = sum(values) / len(values)
    for spec in suite.scorers:
        _, ok = passed(suite, results, spec.name)
        if ok:
            metrics[f"{spec.name}_pass_rate"] = sum(ok) / len(ok)
    metrics.update(failure_counts(suite, results))
    metrics.update(missing_shares(suite, results))
    agreement = [r.scores[JUDGE_AGREEMENT] for r in results if JUDGE_AGREEMENT in r.scores]
    if agreement:
        metrics[JUDGE_AGREEMENT] = sum(agreement) / len(agreement)
    errors = sum(1 for r in results if r.error)
    metrics["error_rate"] = errors / n
    # Answered from the eval cache: answer, scores and latency are the call's that filled it (an earlier run's).
    if cached := sum(1 for r in results if not r.error and r.details.get(CACHED)):
        metrics[N_CACHED] = float(cached)
    latencies = [r.latency_ms for r in results if not r.error]
    if latencies:
        metrics["latency_p50_ms"] = percentile(latencies, 50)
        metrics["latency_p95_ms"] = percentile(latencies, 95)
    if costs is not None:
        metrics["cost_usd_total"] = float(sum(costs))
        metrics["cost_usd_per_case"] = float(sum(costs)) / n
    return metrics


JUDGE_AGREEMENT = "llm_judge_agreement"


def is_count(metric: str) -> bool:
    """Counts and shares (`n`, `n_cases`, `n_cached`, `<scorer>_failures`, `<scorer>_missing`) are facts about this
    run, not estimates: they have no interval."""
    metric = metric.split("[", 1)[0]  # a slice's count is a count too: n_cases[lang=de]
    return metric in ("n", "n_cases", N_CACHED) or metric.endswith(("_failures", "_missing"))


def failure_counts(suite: Suite, results: Sequence[CaseResult]) -> dict[str, float]:
    """`n_cases` answered and, per scorer, `<scorer>_failures`: answered cases with a row below the pass mark.

    Counted by case (repeats of one case are one trial) and over answered rows only: a timeout is an
    error (error_rate), not a leak, so a zero-tolerance rule on a harm scorer is not tripped by it.
    """
    answered = [r for r in results if not r.error]
    out = {"n_cases": float(len({r.case_id for r in answered}))}
    for spec in suite.scorers:
        failed = {r.case_id for r in answered if spec.name in r.scores and r.scores[spec.name] < spec.pass_mark}
        out[f"{spec.name}_failures"] = float(len(failed))
    return out


def expected_text(expected: Any) -> str:
    """Expected value as stored in `eval_cases` (strings as-is, anything else as JSON)."""
    return expected if isinstance(expected, str) else json.dumps(expected, sort_keys=True)


# A case's `details` key marking it not run because its run passed the evaluator's time limit (the error says so).
NOT_RUN = "not_run"


def failure_summary(results: Sequence[CaseResult]) -> str:
    """Why a run failed: it passed its time limit, or no call succeeded ("" if neither)."""
    if cut := next((r for r in results if r.details.get(NOT_RUN)), None):
        return f"{sum(1 for r in results if r.details.get(NOT_RUN))} of {len(results)} cases not run: {cut.error}"
    if not results or any(not r.error for r in results):
        return ""
    return f"all {len(results)} calls failed; first error: {results[0].error}"


# A case's result as one bus message may carry it, encoded: well under the outbox's BATCH_BYTES (what one message of
# facts carries, itself under NATS' 1 MB max_payload), so a case whose texts were cut still shares its batch.
FACT_BYTES = 512 * 1024
# What each text of a case result keeps (`textbound`, as the router's served events): the scores were taken on the
# whole answer before the cut.
FACT_TEXT_BYTES = TEXT_BYTES


def case_fact(r: CaseResult) -> EvalCaseResult:
    """One case as published for `eval_cases` (the expected value as text), its input, expected and output each cut
    to FACT_TEXT_BYTES, the cut named in `details` under TRUNCATED with each text's size before it."""
    sizes: dict[str, int] = {}

    def kept(name: str, text: str) -> str:
        short = cut(text, FACT_TEXT_BYTES)
        if short is not text:
            sizes[name] = text_size(text)
        return short

    texts = {"input": kept("input", r.input), "expected": kept("expected", expected_text(r.expected)),
             "output": kept("output", r.output)}
    details = dict(r.details)
    if sizes:
        details[TRUNCATED] = marker(sizes)
    return EvalCaseResult(case_id=r.case_id, repeat=r.repeat, **texts, scores=dict(r.scores), latency_ms=r.latency_ms,
                          input_tokens=r.input_tokens, output_tokens=r.output_tokens, error=r.error, details=details)


# What the details of a case stored as unpublishable keep, encoded. With its texts in STRIPPED_BYTES and its id in
# CASE_ID_MAX characters, the case is then a few tens of KiB whatever its details held (many long keys too), far
# under FACT_BYTES: before (probe p58 F2), every short value was kept under keys of any length and number.
STRIPPED_DETAILS_BYTES = 16 * 1024
# Kept first: what a resume checks (the binding the case was asked under) and the flags the summary counts.
_DETAILS_FIRST = ("binding", CACHED, NOT_RUN)


def _short_details(details: Mapping[str, Any]) -> dict[str, Any]:
    """The short entries of `details` (numbers, flags, texts of STRIPPED_BYTES or less), those of _DETAILS_FIRST
    first, as many as fit STRIPPED_DETAILS_BYTES encoded."""
    kept: dict[str, Any] = {}
    room = STRIPPED_DETAILS_BYTES
    for key in sorted(details, key=lambda k: k not in _DETAILS_FIRST):
        value = details[key]
        if not (isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= STRIPPED_BYTES)):
            continue
        cost = len(msgspec.json.encode(key)) + len(msgspec.json.encode(value)) + 2  # `:` and `,`
        if cost <= room:
            kept[key] = value
            room -= cost
    return kept


def unpublishable(r: CaseResult, size: int) -> CaseResult:
    """The case as an error when its result is `size` bytes encoded, over FACT_BYTES even with its texts cut (JSON
    escapes, a long judge reply in its details): its answer is left out and its input and expected kept in
    STRIPPED_BYTES each, so that this case alone fails, never the run's batch (probe p52 F1)."""
    expected = expected_text(r.expected)
    sizes = {name: text_size(text) for name, text, kept in (("input", r.input, STRIPPED_BYTES),
                                                            ("expected", expected, STRIPPED_BYTES), ("output", r.output, 0))
             if text_size(text) > kept}
    details = _short_details(r.details)
    details[TRUNCATED] = marker(sizes)
    return replace(r, input=cut(r.input, STRIPPED_BYTES), expected=cut(expected, STRIPPED_BYTES),
                   output="", scores={}, details=details,
                   error=f"its result is {size:,} bytes encoded with each text cut to {FACT_TEXT_BYTES:,} bytes, more "
                         f"than the {FACT_BYTES:,} one case may take in a bus message: its answer was not stored")


def fact_case(c: EvalCaseResult) -> CaseResult:
    """One published case as the run's result (its expected value as text, as `eval_cases` stores it)."""
    return CaseResult(case_id=c.case_id, repeat=c.repeat, input=c.input, expected=c.expected, output=c.output,
                      scores=dict(c.scores), latency_ms=c.latency_ms, input_tokens=c.input_tokens,
                      output_tokens=c.output_tokens, error=c.error, details=dict(c.details))


def cases_digest(results: Sequence[CaseResult]) -> str:
    """The digest of a run's cases as a comparison with them reads them (each case's scores, latency, tokens and
    error), whatever their order: the evaluator records it as the run completes, and checks against it the query
    service's answer for those cases when another run compares with them. Numbers as their repr, so one NaN or
    infinity digests too (and a store's answer carrying it as null does not match)."""
    rows = sorted([r.case_id, r.repeat, sorted([k, _number(v)] for k, v in r.scores.items()), _number(r.latency_ms),
                   r.input_tokens, r.output_tokens, r.error] for r in results)
    return content_hash(rows)


def _number(v: object) -> str:
    return repr(float(v)) if isinstance(v, int | float) else repr(v)


def finished(published: Sequence[CaseResult]) -> list[CaseResult]:
    """The cases a run has answered, one per (case, repeat), from those it published (oldest first): the first
    published one wins, since the sink keeps the first it stores."""
    out: dict[tuple[str, int], CaseResult] = {}
    for r in published:
        out.setdefault((r.case_id, r.repeat), r)
    return list(out.values())
