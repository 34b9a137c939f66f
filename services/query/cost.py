"""Cost rollups over the ledger, grouped by an allow-listed set of dimensions."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from lockgate.contracts.inference import ADMITTED_AT
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

# Names unique only within a tenant: an app is a tenant's (its keys and subjects name both), and an event names
# any deployment and release it likes, its own tenant's or not. Grouped without the tenant, another tenant's calls
# naming `shop-v2-rc2` or `shop-web` were added to the spend of the tenant that owns it (probes p6 and p73: five
# spans of acme's app took shop-web from 0.14 to 62.64 USD); so they are grouped with their tenant.
WITHIN_TENANT = ("app", "deployment", "release")
# Names a sender's claim within its own tenant and app: a ledger entry's tenant and app are its sender's key's (or
# NATS user's), its deployment and release are whatever the event says. Grouped without the app, any app of the
# tenant added its calls to another app's release (a probe took `shop-v2-rc2` from 0.06 to 360 USD with app
# `other`'s key); so each is grouped with its app too, and another app's calls naming it are that app's row.
WITHIN_APP = ("deployment", "release")

__all__ = ["DIMENSIONS", "WITHIN_APP", "WITHIN_TENANT", "UnknownDimension", "budget_spend", "cost_rollup", "groups"]


def groups(by: Sequence[str]) -> list[str]:
    """The dimensions a rollup asked for `by` groups by: each once, the app just before the first deployment or
    release if it is not among them, and the tenant first if an app, a deployment or a release is among them and it
    is not."""
    dims = list(dict.fromkeys(by))
    if "app" not in dims:
        first = next((i for i, d in enumerate(dims) if d in WITHIN_APP), None)
        if first is not None:
            dims.insert(first, "app")
    if "tenant" not in dims and any(d in WITHIN_TENANT for d in dims):
        dims.insert(0, "tenant")
    return dims


# One row per ledger entry, or per hour and group of the rollup (migration 005), in the same columns.
_LEDGER = ("SELECT time, tenant, app, deployment, release, model, price_book, 1 AS calls, input_tokens, "
           "output_tokens, cached_tokens, cost_usd, toUInt64(NOT priced) AS unpriced_calls FROM cost_ledger")
_HOURLY = ("SELECT toDateTime64(hour, 6, 'UTC') AS time, tenant, app, deployment, release, model, price_book, calls, "
           "input_tokens, output_tokens, cached_tokens, cost_usd, unpriced_calls FROM cost_hourly")


def _next_hour(t: datetime) -> datetime:
    hour = t.replace(minute=0, second=0, microsecond=0)
    return hour if hour == t else hour + timedelta(hours=1)


def cost_rollup(
    store: Store,
    by: Sequence[str] = ("tenant", "app", "deployment", "day"),
    since: datetime | None = None,
    tenant: str | None = None,
) -> list[dict[str, Any]]:
    """Calls, tokens and cost_usd per group, most expensive first; grouped by app, deployment or release, by tenant
    too (first), and by deployment or release, by app too, whether asked or not.

    Whole hours come from the hourly rollup, which every dimension derives from; only the part of
    an hour before it (when `since` is not on the hour) is read from the ledger itself."""
    bad = [b for b in by if b not in DIMENSIONS]
    if bad:
        raise UnknownDimension(f"cannot group cost by {', '.join(map(repr, bad))}; choose from {', '.join(DIMENSIONS)}")
    dims = groups(by)
    select = [f"{DIMENSIONS[d]} AS {d}" for d in dims]
    common, params = [], {}
    if tenant is not None:
        common.append("tenant = {tenant:String}")
        params["tenant"] = tenant
    hourly, legs = list(common), []
    if since is not None:
        # The rollup's hours are UTC hours (a +05:30 "hour" would split one).
        since = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
        params["since"], params["hour"] = since, _next_hour(since)
        hourly.append("hour >= {hour:DateTime('UTC')}")
        if params["hour"] != since:
            ledger = [*common, "time >= {since:DateTime64(6, 'UTC')}", "time < {hour:DateTime64(6, 'UTC')}"]
            legs.append(f"{_LEDGER} WHERE {' AND '.join(ledger)}")
    legs.insert(0, _HOURLY + (f" WHERE {' AND '.join(hourly)}" if hourly else ""))
    sql = (
        f"SELECT {''.join(f'{s}, ' for s in select)}sum(calls) AS calls, sum(input_tokens) AS input_tokens, "
        "sum(output_tokens) AS output_tokens, sum(cached_tokens) AS cached_tokens, "
        # input_tokens and output_tokens below are the aliases of the sums above.
        "input_tokens + output_tokens AS tokens, sum(cost_usd) AS cost_usd, "
        f"sum(unpriced_calls) AS unpriced_calls FROM ({' UNION ALL '.join(legs)})"
        + (f" GROUP BY {', '.join(dims)}" if dims else "")
        + " ORDER BY cost_usd DESC" + (f", {', '.join(dims)}" if dims else "")
    )
    return store.rows(sql, params)


# The served events of a scope and time span: a request a router served is the only spend a budget counter counts
# (an application's own events of calls it made elsewhere are in the ledger too), and the event holds the API key.
# A router's shadow copies are among them (sent on the same subject, with the caller's key), as the live counters
# count them (shadow.py reserves each on the caller's budgets: probe p60 F1).
# A call admitted before the span (`ADMITTED_AT`; an event without it, by its own time) is not in it, though it ended
# there: its admission counted it in the period before, on that period's counter (probe p88 F2: a request admitted
# before midnight and ended after was counted on both days' counters).
_SERVED = ("SELECT tenant, app, id FROM inference_events WHERE served AND time >= {since:DateTime64(6, 'UTC')} "
           "AND time < {until:DateTime64(6, 'UTC')} "
           f"AND ifNull(parseDateTime64BestEffortOrNull(attributes['{ADMITTED_AT}'], 6, 'UTC'), time) >= "
           "{since:DateTime64(6, 'UTC')}")


def budget_spend(store: Store, since: datetime, until: datetime, tenant: str = "", app: str = "",
                 key: str = "") -> dict[str, Any]:
    """What the ledger booked for requests the routers served from `since` to `until` (excluded) of a tenant, app
    and API key id (each empty for any): `usd`, `tokens` (input and output) and `calls`. A router seeds a new
    budget counter with it (the period's spend before the counter existed)."""
    scope, params = [], {"since": since, "until": until}
    for column, value in (("tenant", tenant), ("app", app)):
        if value:
            scope.append(f"{column} = {{{column}:String}}")
            params[column] = value
    served = " AND ".join([_SERVED, *scope, *(["key_id = {key:String}"] if key else [])])
    if key:
        params["key"] = key
    where = " AND ".join(["time >= {since:DateTime64(6, 'UTC')}", "time < {until:DateTime64(6, 'UTC')}", *scope,
                          f"(tenant, app, event_id) IN ({served})"])
    rows = store.rows("SELECT sum(cost_usd) AS usd, sum(input_tokens + output_tokens) AS tokens, count() AS calls "
                      f"FROM cost_ledger WHERE {where}", params)
    row = rows[0] if rows else {}
    return {"usd": float(row.get("usd") or 0.0), "tokens": int(row.get("tokens") or 0),
            "calls": int(row.get("calls") or 0)}
