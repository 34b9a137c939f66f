"""Drift reports: the latest reports, one dict each with its per-feature rows."""

from __future__ import annotations

from typing import Any

import msgspec

from lockgate.contracts import FeatureDrift
from lockgate.services.query.registry import Limit
from lockgate.store import Store

# A row's per-feature columns are the FeatureDrift fields; the rest describe the report.
_FEATURE_FIELDS = tuple(f.name for f in msgspec.structs.fields(FeatureDrift))
TEXT_TEST = "embedding_mean_distance"


def _named(feature: dict[str, Any]) -> dict[str, Any]:
    """A feature's `ks_stat`/`ks_pvalue` (the v1 contract's names, kept on the bus and in the table for the readers
    of v1) under the name of the test they hold: `chi2_stat`/`chi2_pvalue` for a categorical feature (named
    `feature:category`), none for a text, whose pair is its `statistic`/`p_value` again. Before, `lockgate drift
    --json` gave a category's chi-squared statistic as `ks_stat` (probe). Old rows read alike: the pair held the
    same test then."""
    if ":" in feature["feature"]:
        feature["chi2_stat"], feature["chi2_pvalue"] = feature.pop("ks_stat"), feature.pop("ks_pvalue")
    elif feature.get("test") == TEXT_TEST:
        del feature["ks_stat"], feature["ks_pvalue"]
    return feature


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
        rep["features"].append(_named({k: r[k] for k in _FEATURE_FIELDS}))
        rep["drifted"] = rep["drifted"] or bool(r["drifted"])
    return list(reports.values())
