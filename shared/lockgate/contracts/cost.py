"""Cost records and budget alerts."""

from __future__ import annotations

from datetime import datetime

from lockgate.contracts.envelope import Event


class CostRecord(Event, frozen=True, kw_only=True, tag="lockgate.cost.record"):
    """Spend of one (app, deployment, model) group within one batch of inference events."""

    app: str
    deployment: str
    model: str
    calls: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost_usd: float
    unpriced_calls: int = 0
    price_book: str = ""
    window_start: datetime
    window_end: datetime
