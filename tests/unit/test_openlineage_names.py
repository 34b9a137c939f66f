"""How an OpenLineage event names an artifact version (probe p29 F1): by the key its release bound; else by the
first registration of the event's tenant, only if made at or before the event; else by its hash. And how
`lineage DATASET` prints an outcome's metrics with their intervals (probe p29 F5)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lockgate.cli.lineage import metric_cells
from lockgate.provenance import openlineage as ol

T = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
NS = "lockgate://lg"
REGS = {
    "sha256:m": {"default": {"kind": "tool", "name": "approved-by-security", "time": T + timedelta(minutes=5)},
                 "other": {"kind": "model_config", "name": "gitshop", "time": T - timedelta(days=1)}},
    # as the query service sends it over NATS: an ISO string, naive (UTC)
    "sha256:d": {"default": {"kind": "dataset", "name": "qa-cases", "time": "2026-12-01T08:59:59.999999"}},
}


@pytest.mark.parametrize(("tenant", "at", "expected"), [
    ("default", T, {"sha256:d": {"kind": "dataset", "name": "qa-cases"}}),  # the tool came later
    ("default", T + timedelta(minutes=5), {"sha256:d": {"kind": "dataset", "name": "qa-cases"},
                                           "sha256:m": {"kind": "tool", "name": "approved-by-security"}}),
    ("other", T, {"sha256:m": {"kind": "model_config", "name": "gitshop"}}),
    ("nobody", T, {}),
    ("default", "2026-12-01T08:59:59.999998", {}),  # a microsecond before the dataset's registration
])
def test_names_are_the_tenants_first_registration_at_or_before_the_event(tenant: str, at: Any,
                                                                         expected: dict[str, Any]) -> None:
    assert dict(ol.NamesAt(REGS, tenant, at)) == expected


def test_a_bound_key_names_its_input_and_a_later_registration_renames_nothing() -> None:
    names = ol.NamesAt(REGS, "default", T + timedelta(hours=1))  # by now the tool is registered too
    release = {"release": "shop-v1", "app": "shop", "time": T, "artifacts": {"model_config/shop-sim-stable": "sha256:m"}}
    assert [d["name"] for d in ol.release_event(release, names, NS)["inputs"]] == ["model_config/shop-sim-stable"]
    run = {"run_id": "run-1", "release": "shop-v1", "suite": "sha256:s", "status": "completed", "time": T}
    event = ol.eval_event(run, ["sha256:s", "sha256:d"], release, names, NS)
    assert [d["name"] for d in event["inputs"]] == ["artifact/sha256:s", "dataset/qa-cases",
                                                    "model_config/shop-sim-stable"]
    # Bytes a release bound under two keys are two datasets of one version, each under the key that bound it.
    twice = {**release, "artifacts": {"model_config/a": "sha256:m", "tool/b": "sha256:m"}}
    assert [d["name"] for d in ol.eval_event(run, [], twice, names, NS)["inputs"]] == [
        "artifact/sha256:s", "model_config/a", "tool/b"]


def test_the_export_names_each_event_as_of_its_own_time_and_release_tenant() -> None:
    export = {
        "registrations": REGS,
        "releases": {"shop-v1": {"app": "shop", "tenant": "other", "artifacts": {}}},
        "evals": [{"run_id": "run-1", "release": "shop-v1", "suite": "sha256:s", "status": "completed",
                   "time": T, "policy": ""}],
        "run_inputs": {"run-1": ["sha256:s", "sha256:m", "sha256:d"]},
    }
    [event] = ol.events(export, NS)
    assert [d["name"] for d in event["inputs"]] == ["artifact/sha256:s", "model_config/gitshop", "artifact/sha256:d"]


def test_metric_cells_show_each_interval() -> None:
    intervals = {"accuracy": {"estimate": 0.82, "low": 0.74, "high": 0.88}, "cost": {"estimate": 0.5, "low": None}}
    assert metric_cells({"accuracy": 0.82, "cost": 0.5, "n": 3.0}, intervals) == (
        "accuracy 0.82 [0.74, 0.88]; cost 0.5 [?, ?]; n 3")
