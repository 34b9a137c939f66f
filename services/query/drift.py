"""Drift reports: the latest reports, one dict each with its per-feature rows."""

from __future__ import annotations

from typing import Any

import msgspec

from lockgate.contracts import FeatureDrift
from lockgate.services.query.registry import Limit
from lockgate.store import Store

# A row's per-feature columns are the FeatureDrift fields; the rest describe the report.
_FEATURE_FIELDS = tuple(f.name for f in msgspec.structs.fields(FeatureDrift))


def drift_reports(store: Store, deployment: str | None = None, limit: Limit = 50,
                  tenant: str | None = None) -> list[dict[str, Any]]:
    """Newest first: {id, time, tenant, deployment, app, window_*, reference_n, current_n, drifted, features}; a
    report's tenant is whose events it compares (each tenant's windows of a deployment are its own)."""
    conds = [c for c, on in (("deployment = {d:String}", deployment), ("tenant = {t:String}", tenant)) if on]
    where = f"WHERE {' AND '.join(conds)}" if conds else ""
    rows = store.rows(
        "SELECT * FROM drift_reports WHERE id IN ("
        f" SELECT id FROM drift_reports {where} GROUP BY id ORDER BY max(time) DESC LIMIT {{n:UInt32}}"
        ") ORDER BY time DESC, id, feature",
        {"d": deployment or "", "t": tenant or "", "n": max(0, int(limit))},
    )
    reports: dict[str, dict[str, Any]] = {}
    for r in rows:
        rep = reports.get(r["id"])
        if rep is None:
            rep = reports[r["id"]] = {k: v for k, v in r.items() if k not in _FEATURE_FIELDS}
            rep["drifted"] = False
            rep["features"] = []
        rep["features"].append({k: r[k] for k in _FEATURE_FIELDS})
        rep["drifted"] = rep["drifted"] or bool(r["drifted"])
    return list(reports.values())
