"""Cost rollups over the ledger, grouped by an allow-listed set of dimensions."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from lockgate.errors import UnknownDimension
from lockgate.store import Store

# Only these expressions ever reach SQL; `by` names are keys, never interpolated themselves.
DIMENSIONS: dict[str, str] = {
    "tenant": "tenant",
    "app": "app",
    "deployment": "deployment",
    "release": "release",
    "model": "model",
    "price_book": "price_book",
    "day": "toDate(time)",
    "hour": "toStartOfHour(time)",
    "month": "toStartOfMonth(time)",
}

__all__ = ["DIMENSIONS", "UnknownDimension", "cost_rollup"]


def cost_rollup(
    store: Store,
    by: Sequence[str] = ("tenant", "app", "deployment", "day"),
    since: datetime | None = None,
    tenant: str | None = None,
) -> list[dict[str, Any]]:
    """Calls, tokens and cost_usd per group, most expensive first."""
    bad = [b for b in by if b not in DIMENSIONS]
    if bad:
        raise UnknownDimension(f"cannot group cost by {', '.join(map(repr, bad))}; choose from {', '.join(DIMENSIONS)}")
    dims = list(dict.fromkeys(by))
    select = [f"{DIMENSIONS[d]} AS {d}" for d in dims]
    conds, params = [], {}
    if since is not None:
        conds.append("time >= {since:DateTime64(6, 'UTC')}")
        params["since"] = since
    if tenant is not None:
        conds.append("tenant = {tenant:String}")
        params["tenant"] = tenant
    sql = (
        f"SELECT {''.join(f'{s}, ' for s in select)}count() AS calls, sum(input_tokens) AS input_tokens, "
        "sum(output_tokens) AS output_tokens, sum(cached_tokens) AS cached_tokens, "
        # input_tokens and output_tokens below are the aliases of the sums above.
        "input_tokens + output_tokens AS tokens, sum(cost_usd) AS cost_usd, "
        "countIf(NOT priced) AS unpriced_calls FROM cost_ledger"
        + (f" WHERE {' AND '.join(conds)}" if conds else "")
        + (f" GROUP BY {', '.join(dims)}" if dims else "")
        + " ORDER BY cost_usd DESC" + (f", {', '.join(dims)}" if dims else "")
    )
    return store.rows(sql, params)
