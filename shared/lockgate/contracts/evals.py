"""Eval requests and results."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from lockgate.contracts.bounds import Artifacts, Id, Short, check_bounds
from lockgate.contracts.envelope import Event
from lockgate.contracts.names import Name, OptName


class MetricInterval(msgspec.Struct, frozen=True, kw_only=True):
    """An aggregate with its confidence interval (None bounds: not estimable from this sample)."""

    estimate: float
    low: float | None = None
    high: float | None = None
    confidence: float = 0.95
    method: str = ""
    n: int = 0


class BaselineComparison(msgspec.Struct, frozen=True, kw_only=True):
    """Candidate vs baseline on the same cases: paired difference with its interval and test."""

    metric: str
    candidate: float
    baseline: float
    diff: float
    diff_low: float | None = None
    diff_high: float | None = None
    p_value: float | None = None
    effect_size: float | None = None
    test: str = ""
    n_pairs: int = 0
    warning: str = ""


# The longest an eval's call waits for an answer (EvalRequested.timeout_s): an endpoint that never answers holds a
# run's slot at most this long per attempt.
MAX_CALL_TIMEOUT_S = 600.0


class EvalRequested(Event, frozen=True, kw_only=True, tag="lockgate.eval.requested"):
    """Run the suite artifact `suite` against `endpoint` for `release`."""

    run_id: Id
    release: Name
    suite: Id
    endpoint: Short
    model: Short = ""
    baseline: OptName = ""
    policy: Id = ""
    concurrency: int = 8
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_CALL_TIMEOUT_S)] = 30.0  # seconds per call
    artifacts: Artifacts = {}
    cache: bool = True  # False: call the endpoint and the judge afresh (the response cache is neither read nor written)
    # `lockgate eval rerun`: this run repeats stored run `rerun_of` with the cache off; its result is an
    # EvalReran on its own subject, which no gate acts on, and it records no lineage
    rerun_of: Id = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bounds(self)


class ReleaseBinding(msgspec.Struct, frozen=True, kw_only=True):
    """A release name's binding as the evaluator read it when a run started, before any call: what the run
    evaluated. The gatekeeper passes a run only while the release is still bound exactly so."""

    registered: bool = False  # False: the name was bound to nothing; the run evaluated what its request named
    bundle: str = ""  # the bound bundle's content hash, without its author (lockgate.evalruns.binding_of)
    artifacts: dict[str, str] = {}  # its artifact versions, `kind/name` -> hash


class EvalCompleted(Event, frozen=True, kw_only=True, tag="lockgate.eval.completed"):
    """Aggregates of a finished eval run; per-case rows are in `eval_cases`."""

    run_id: str
    release: Name
    suite: str
    baseline: OptName = ""
    policy: str = ""
    status: str = "completed"
    n_cases: int = 0
    n_errors: int = 0
    metrics: dict[str, float] = {}
    error: str = ""
    intervals: dict[str, MetricInterval] = {}
    baseline_run: str = ""
    comparisons: dict[str, BaselineComparison] = {}
    warnings: list[str] = []
    artifacts: dict[str, str] = {}
    # candidate/baseline - 1 with its CI, where the evaluator bootstrapped the ratio itself (latency, cost):
    # relative rules (mode: relative) use it instead of dividing the difference by the baseline's point value.
    ratios: dict[str, MetricInterval] = {}
    # What the run ran on, to reproduce it: Python, lockgate and package versions (hash), OS, CPU/GPU,
    # seeds, and the model, endpoint and sampling parameters it called (lockgate.provenance.environment).
    # `hash`: the content hash of the rest, under which the evaluator registered it as an `environment` artifact
    # (absent from a result made before it did).
    environment: dict[str, str] = {}
    # The release's binding when the run started (`artifacts` above are its artifacts when it was registered).
    # None: an evaluator that did not say, whose result the gate blocks.
    binding: ReleaseBinding | None = None


class EvalReran(Event, frozen=True, kw_only=True, tag="lockgate.eval.reran"):
    """A rerun of a stored eval run (`lockgate eval rerun`): its aggregates and intervals beside the stored
    run's, recomputed from the stored cases by the same code. Never gated, never stored as an eval run."""

    run_id: str
    rerun_of: str
    release: Name
    suite: str
    status: str = "completed"
    n_cases: int = 0
    n_errors: int = 0
    error: str = ""
    metrics: dict[str, float] = {}
    intervals: dict[str, MetricInterval] = {}
    stored_metrics: dict[str, float] = {}
    stored_intervals: dict[str, MetricInterval] = {}
    stored_cases: int = 0
    environment: dict[str, str] = {}
    warnings: list[str] = []


class EvalCaseResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one (case, repeat) of a run: output, scores, latency, or the error."""

    case_id: str
    repeat: int = 0
    input: str = ""
    expected: str = ""  # as text: strings as-is, anything else as JSON
    output: str = ""
    scores: dict[str, float] = {}
    latency_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    details: dict[str, Any] = {}  # scorer details the scores cannot hold: judge replies, cache hits


class EvalCasesRecorded(Event, frozen=True, kw_only=True, tag="lockgate.eval.cases"):
    """Cases of a run finished since the last batch; the sink stores each (run, case, repeat) once."""

    run_id: str
    release: str
    cases: list[EvalCaseResult]


class EvalProgress(msgspec.Struct, frozen=True, kw_only=True):
    """A core-NATS progress tick of a running eval (not persisted; at most ~10 a second)."""

    run_id: str
    done: int
    total: int
    errors: int = 0
