"""The shipped Grafana dashboard's SQL, run on chDB as the ClickHouse data source runs it ($__timeFilter expanded as
the plugin does), over a store holding tenant default's served rows of shop-web and an application's forged rows of
tenant acme naming shop-web: a canary event of a 60 s latency, a drift report of PSI 5 and calls of 62.5 USD.
The panels an operator watches to promote or abort by hand read the routers' served rows only, each labelled with
its tenant; spend by deployment is split by tenant and app.

Found by a probe (p73, F2): "Requests by variant" and "Latency p95 (ms) by variant" read every inference event,
"Drift PSI by feature" every drift report and "Spend (USD) by deployment" grouped the ledger by deployment alone, so
another tenant's spans naming shop-web drew a canary arm, its latency, its drift and its spend on shop-web's panels."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lockgate.store import Store

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "lockgate.json"


def _panels() -> dict[str, str]:
    """Each panel's title and its one query's SQL."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert all(len(p["targets"]) == 1 for p in panels)
    return {p["title"]: p["targets"][0]["rawSql"] for p in panels}


def _run(store: Store, sql: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """`sql` as the ClickHouse data source sends it: `$__timeFilter(c)` is `c >= toDateTime(s) AND c <= toDateTime(e)`."""
    expanded = re.sub(r"\$__timeFilter\((\w+)\)",
                      lambda m: f"{m[1]} >= toDateTime({int(start.timestamp())}) AND "
                                f"{m[1]} <= toDateTime({int(end.timestamp())})", sql)
    assert "$" not in expanded, expanded
    return store.rows(expanded)


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def forged(store: Store, now: datetime) -> Store:
    """default's served rows of shop-web, and acme's forged unserved rows naming shop-web."""
    t = now - timedelta(minutes=5)
    store.insert_rows("inference_events",
                      ["id", "time", "tenant", "app", "deployment", "release", "variant", "latency_ms", "served"],
                      [("e1", t, "default", "shop", "shop-web", "shop-v2-rc1", "stable", 100.0, True),
                       ("e2", t, "acme", "evil", "shop-web", "shop-v2-rc2", "canary", 60_000.0, False)], token=None)
    store.insert_rows("drift_reports", ["id", "time", "tenant", "app", "deployment", "feature", "psi", "served"],
                      [("d1", t, "default", "shop", "shop-web", "output_tokens", 0.01, True),
                       ("d2", t, "acme", "evil", "shop-web", "output_tokens", 5.0, False)], token=None)
    store.insert_rows("cost_ledger", ["event_id", "time", "tenant", "app", "deployment", "cost_usd", "priced"],
                      [("e1", t, "default", "shop", "shop-web", 0.14, True),
                       ("e2", t, "acme", "evil", "shop-web", 62.5, True)], token=None)
    return store


def test_every_panel_runs_and_the_rollout_panels_read_served_rows_of_their_tenant(forged: Store,
                                                                                  now: datetime) -> None:
    panels = _panels()
    got = {title: _run(forged, sql, now - timedelta(hours=6), now) for title, sql in panels.items()}

    requests = got["Requests by variant"]
    assert [(r.get("tenant"), r.get("deployment"), r["variant"], r["requests"]) for r in requests] == [
        ("default", "shop-web", "stable", 1)]
    latency = got["Latency p95 (ms) by variant"]
    assert [(r.get("tenant"), r.get("deployment"), r["variant"], r["p95"]) for r in latency] == [
        ("default", "shop-web", "stable", 100.0)]
    drift = got["Drift PSI by feature"]
    assert [(r["series"], r["psi"]) for r in drift] == [("default shop-web output_tokens", 0.01)]
    # Spend keeps every sender's calls, each in a row of its own tenant and app: never added to shop-web's.
    spend = got["Spend (USD) by deployment"]
    assert {(r["tenant"], r["app"], r["deployment"]): r["usd"] for r in spend} == {
        ("default", "shop", "shop-web"): 0.14, ("acme", "evil", "shop-web"): 62.5}
    # The decision and rollout tables are lockgate's own writes; they run too (no rows stored here).
    assert got["Gate decisions"] == [] and got["Rollouts"] == []
