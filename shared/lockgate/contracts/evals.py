"""Eval requests and results."""

from __future__ import annotations

from lockgate.contracts.envelope import Event


class EvalRequested(Event, frozen=True, kw_only=True, tag="lockgate.eval.requested"):
    """Run the suite artifact `suite` against `endpoint` for `release`."""

    run_id: str
    release: str
    suite: str
    endpoint: str
    model: str = ""
    baseline: str = ""
    policy: str = ""
    concurrency: int = 8
    timeout_s: float = 30.0


class EvalCompleted(Event, frozen=True, kw_only=True, tag="lockgate.eval.completed"):
    """Aggregates of a finished eval run; per-case rows are in `eval_cases`."""

    run_id: str
    release: str
    suite: str
    baseline: str = ""
    policy: str = ""
    status: str = "completed"
    n_cases: int = 0
    n_errors: int = 0
    metrics: dict[str, float] = {}
    error: str = ""
