"""Drift reports."""

from __future__ import annotations

from datetime import datetime

import msgspec

from lockgate.contracts.envelope import Event


class FeatureDrift(msgspec.Struct, frozen=True, kw_only=True):
    """Drift of one feature between the reference and current windows."""

    feature: str
    psi: float
    ks_stat: float
    ks_pvalue: float
    reference_mean: float
    current_mean: float
    drifted: bool


class DriftReport(Event, frozen=True, kw_only=True, tag="lockgate.drift.report"):
    """Per-deployment drift over the current window."""

    deployment: str
    app: str = ""
    window_start: datetime
    window_end: datetime
    reference_n: int
    current_n: int
    features: list[FeatureDrift]
    drifted: bool
