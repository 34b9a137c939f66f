"""Named read-only queries, so the CLI can ask a running stack over NATS (chDB is one-process)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from lockgate.errors import ConfigError
from lockgate.store import Store

# name -> (module, function). Modules are imported on use so one missing family never breaks the rest.
QUERIES: dict[str, tuple[str, str]] = {
    "recent_traces": ("lockgate.queries.traces", "recent_traces"),
    "traces_for_release": ("lockgate.queries.traces", "traces_for_release"),
    "trace": ("lockgate.queries.traces", "trace"),
    "dead_letters": ("lockgate.queries.traces", "dead_letters"),
    "decisions": ("lockgate.queries.decisions", "decisions"),
    "eval_runs": ("lockgate.queries.evals", "eval_runs"),
    "eval_cases": ("lockgate.queries.evals", "eval_cases"),
    "drift_reports": ("lockgate.queries.drift", "drift_reports"),
    "cost_rollup": ("lockgate.queries.cost", "cost_rollup"),
    "lineage": ("lockgate.queries.lineage", "lineage"),
    "sql": ("lockgate.queries.registry", "readonly_sql"),
}


def resolve(name: str) -> Callable[..., Any]:
    """The function behind a query name."""
    if name not in QUERIES:
        raise ConfigError(f"unknown query {name!r}; known: {', '.join(sorted(QUERIES))}")
    module, func = QUERIES[name]
    return getattr(importlib.import_module(module), func)


def run(store: Store, name: str, args: dict[str, Any]) -> Any:
    """Run a named query with keyword arguments."""
    return resolve(name)(store, **args)


def readonly_sql(store: Store, query: str) -> list[dict[str, Any]]:
    """Plain SQL for operators, executed with readonly=1 so it cannot change data."""
    return store.rows(f"{query.rstrip().rstrip(';')} SETTINGS readonly = 1")
