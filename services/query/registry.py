"""The named read-only queries, looked up by name and called with arguments checked against their
signature, whether the request came over NATS or from the CLI's offline path (`--clickhouse`)."""

from __future__ import annotations

import functools
import importlib
import inspect
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec

from lockgate.errors import ConfigError
from lockgate.store import Store

# A row count as the queries pass it to ClickHouse (`LIMIT {limit:UInt32}`): a negative or larger one was
# sent on and came back as ClickHouse's parse error, under the kind StoreUnavailable (retryable).
Limit = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
# The times ClickHouse's DateTime holds (the queries compare with DateTime and DateTime64 columns).
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2106, 2, 7, 6, 28, 15, tzinfo=UTC)

# name -> (module, function). Modules are imported on use so one broken family never breaks the rest.
_PKG = "lockgate.services.query"
QUERIES: dict[str, tuple[str, str]] = {
    # operators (CLI, Grafana, scripts)
    "recent_traces": ("traces", "recent_traces"),
    "traces_for_release": ("traces", "traces_for_release"),
    "trace": ("traces", "trace"),
    "traces_ahead": ("traces", "traces_ahead"),
    "dead_letters": ("traces", "dead_letters"),
    "dead_letter_counts": ("traces", "dead_letter_counts"),
    "decisions": ("decisions", "decisions"),
    "eval_runs": ("evals", "eval_runs"),
    "eval_cases": ("evals", "eval_cases"),
    "eval_run": ("evals", "eval_run"),
    "drift_reports": ("drift", "drift_reports"),
    "online_scores": ("scores", "online_scores"),
    "rollout_history": ("rollouts", "rollout_history"),
    "analysis_runs": ("rollouts", "analysis_runs"),
    "cost_rollup": ("cost", "cost_rollup"),
    "lineage": ("lineage", "lineage"),
    "serving_history": ("history", "serving_history"),
    "lineage_export": ("provenance", "lineage_export"),
    "sql": ("operator_sql", "readonly_sql"),
    "audit_log": ("audit", "audit_log"),
    # services (the evaluator resumes and compares runs; the gatekeeper reads its audit log)
    "eval_case_results": ("evals", "eval_case_results"),
    "baseline_run": ("evals", "baseline_run"),
    "eval_run_event_id": ("evals", "eval_run_event_id"),
    "recorded_events": ("evals", "recorded_events"),
    "consecutive_errors": ("decisions", "consecutive_errors"),
    "release_artifacts": ("decisions", "release_artifacts"),
    "artifact_names": ("provenance", "artifact_names"),  # the lineage recorder's live OpenLineage events
    "served_events": ("served", "served_events"),  # a starting router's canary evidence
    "budget_spend": ("cost", "budget_spend"),  # a router seeding a new budget counter with the period's spend
}


def resolve(name: str) -> Callable[..., Any]:
    """The function behind a query name."""
    if name not in QUERIES:
        raise ConfigError(f"unknown query {name!r}; known: {', '.join(sorted(QUERIES))}")
    module, func = QUERIES[name]
    return getattr(importlib.import_module(f"{_PKG}.{module}"), func)


@functools.cache
def _parameters(name: str) -> dict[str, tuple[Any, bool]]:
    func = resolve(name)
    hints = typing.get_type_hints(func, include_extras=True)  # keeps the bounds of Annotated types (Limit)
    params = list(inspect.signature(func).parameters.values())[1:]  # the first is the store
    return {p.name: (hints.get(p.name, Any), p.default is inspect.Parameter.empty) for p in params}


def arguments(name: str, args: Any) -> dict[str, Any]:
    """`args` checked and converted to the query's parameter types (a JSON string becomes a datetime)."""
    params = _parameters(name)
    if not isinstance(args, dict):
        raise ConfigError(f"query {name!r} takes its arguments as an object, not {type(args).__name__}")
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise ConfigError(f"query {name!r} has no argument {', '.join(map(repr, unknown))}; "
                          f"it takes {', '.join(params) or 'none'}")
    missing = [p for p, (_, required) in params.items() if required and p not in args]
    if missing:
        raise ConfigError(f"query {name!r} needs {', '.join(map(repr, missing))}")
    out = {}
    for key, value in args.items():
        try:
            out[key] = msgspec.convert(value, params[key][0], strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"query {name!r} argument {key!r}: {exc}") from None
        if isinstance(out[key], datetime):
            # Naive times are UTC. Every query sees an aware one, as the rows it reads are (Store): a naive
            # one compared with them raised TypeError, and a query that echoes it answered it with no zone.
            t = out[key] = out[key].astimezone(UTC) if out[key].tzinfo else out[key].replace(tzinfo=UTC)
            if not EARLIEST <= t <= LATEST:
                raise ConfigError(f"query {name!r} argument {key!r}: {value} is outside the times lockgate stores "
                                  f"({EARLIEST:%Y-%m-%d} to {LATEST:%Y-%m-%d})")
    return out


def run(store: Store, name: str, args: dict[str, Any]) -> Any:
    """Run a named query with checked keyword arguments."""
    func = resolve(name)
    return func(store, **arguments(name, args))

