"""Budget events: the router refused (or, failing open, let through) traffic because of a budget."""

from __future__ import annotations

from typing import Literal

from lockgate.contracts.envelope import Event
from lockgate.contracts.names import Name, OptName


class BudgetEvent(Event, frozen=True, kw_only=True, tag="lockgate.budget"):
    """A budget stopped traffic: over its limit, its store unreachable, or its counter unreadable.

    Published on `lg.budget.<tenant>` by the router replica that refused, at most once per counter
    and reason every few seconds; `denied` counts the requests refused since the previous event.
    """

    reason: Literal["over_budget", "store_unavailable", "counter_unreadable"]
    budget: str
    counter: str  # the KV key charged: budget, split value (key, app, tenant) and period
    period: Literal["day", "month"]
    period_id: str  # "2026-12-03" or "2026-12"
    app: Name
    key_id: str = ""
    deployment: OptName = ""
    model: str = ""
    limit_usd: float | None = None
    limit_tokens: int | None = None
    leased_usd: float = 0.0  # what replicas held or had spent of this counter when it refused
    leased_tokens: int = 0
    requested_usd: float = 0.0  # the refused request's reservation
    requested_tokens: int = 0
    denied: int = 1
    fail_open: bool = False  # true: the store was unreachable and the request went through anyway
    replica: str = ""
