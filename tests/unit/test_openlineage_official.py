"""Every kind of RunEvent lockgate emits (eval runs START, COMPLETE and FAIL; gate decisions; releases;
rollouts START, RUNNING, COMPLETE and ABORT, one run per attempt) fits the official OpenLineage model of the
`openlineage-python` client, strictly; and the checker refuses events the spec forbids."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from openlineage.client.event_v2 import RunEvent

from lockgate.provenance import openlineage as ol
from tests.openlineage_spec import SpecViolation, check

T = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
NS = "lockgate://lg"
ARTS = {"sha256:s": {"kind": "eval_suite", "name": "qa"}, "sha256:d": {"kind": "dataset", "name": "qa-cases"},
        "sha256:pol": {"kind": "policy", "name": "gate"}}
EVAL = {"run_id": "run-7", "release": "shop-v2", "suite": "sha256:s", "status": "completed", "n_cases": 40,
        "n_errors": 1, "metrics": {"exact_match": 0.9}, "environment": {"python": "3.11", "seed": "0"}, "time": T}
RELEASE = {"artifacts": {"prompt/answer": "sha256:p", "model_config/sim": "sha256:m"}}


def _events() -> list[dict[str, Any]]:
    failed = {**EVAL, "run_id": "run-8", "status": "failed", "error": "boom", "metrics": {}}
    rollout = {"deployment": "web", "stable_release": "shop-v1", "canary_release": "shop-v2", "time": T,
               "started_at": 1764579600.25}
    again = {**rollout, "started_at": 1764583200.5}  # a second attempt of the same canary release
    return [
        ol.eval_start_event(EVAL, ["sha256:d"], RELEASE, ARTS, NS),
        ol.eval_event(EVAL, ["sha256:d"], RELEASE, ARTS, NS),
        ol.eval_event(failed, [], RELEASE, ARTS, NS),
        ol.decision_event({"id": "dec-1", "release": "shop-v2", "decision": "PASS", "action": "decided",
                           "policy": "sha256:pol", "eval_run": "run-7", "time": T}, EVAL, ARTS, NS),
        ol.release_event({"release": "shop-v2", "app": "shop", "parent": "shop-v1", "time": T, **RELEASE}, ARTS, NS),
        ol.rollout_event({**rollout, "id": "c1", "phase": "idle", "began": True}, NS),
        ol.rollout_event({**rollout, "id": "c2", "canary_weight": 50.0, "phase": "progressing", "step": 3}, NS),
        ol.rollout_event({**rollout, "id": "c3", "canary_weight": 0.0, "phase": "promoted", "step": 4}, NS),
        # The promoted release rolled back: a change after the attempt ended, which the router ties to none.
        ol.rollout_event({**rollout, "id": "c4", "stable_release": "shop-v1", "phase": "aborted", "step": 4,
                          "started_at": 0.0}, NS),
        ol.rollout_event({**again, "id": "c5", "phase": "idle", "began": True}, NS),
        ol.rollout_event({**again, "id": "c6", "phase": "aborted"}, NS),
    ]


@pytest.mark.parametrize("index", range(11))
def test_every_event_kind_fits_the_official_model(index: int) -> None:
    event = _events()[index]
    typed = check(event)
    assert isinstance(typed, RunEvent)
    assert typed.eventType.value in ("START", "RUNNING", "COMPLETE", "FAIL", "ABORT")


def test_start_and_end_of_one_run_share_the_run_id_and_job() -> None:
    start, done = _events()[:2]
    assert (start["eventType"], done["eventType"]) == ("START", "COMPLETE")
    assert start["run"]["runId"] == done["run"]["runId"] and start["job"] == done["job"]

def test_each_rollout_attempt_is_one_run_and_nothing_follows_its_end() -> None:
    # Before (probe p23 F9): one run per deployment and release, so both attempts and the rollback were one run
    # (START, RUNNING, COMPLETE, ABORT, OTHER, ABORT).
    rollout = _events()[5:11]
    runs = [e["run"]["runId"] for e in rollout]
    assert [e["eventType"] for e in rollout] == ["START", "RUNNING", "COMPLETE", "COMPLETE", "START", "ABORT"]
    assert runs[0] == runs[1] == runs[2] and runs[4] == runs[5] and len(set(runs)) == 3
    assert rollout[3]["job"] == rollout[0]["job"]  # the rollback is a run of the same job, complete at once


@pytest.mark.parametrize(("time", "expected"), [
    (T, "2026-12-01T09:00:00Z"),
    (T.replace(tzinfo=None), "2026-12-01T09:00:00Z"),  # a naive datetime from ClickHouse is UTC
    ("2026-12-01T09:00:00.250000", "2026-12-01T09:00:00.250000Z"),  # the query service's rows: ISO strings
    ("2026-12-01 09:00:00", "2026-12-01T09:00:00Z"),
    ("2026-12-01T11:00:00+02:00", "2026-12-01T09:00:00Z"),
])
def test_event_time_is_rfc3339_in_utc_whether_the_row_holds_a_datetime_or_a_string(time: Any, expected: str) -> None:
    event = ol.eval_event({**EVAL, "time": time}, ["sha256:d"], RELEASE, ARTS, NS)
    assert event["eventTime"] == expected
    check(event)


def _broken(change: Any) -> dict[str, Any]:
    event = copy.deepcopy(_events()[1])
    change(event)
    return event


@pytest.mark.parametrize(("what", "change", "message"), [
    ("no producer", lambda e: e.pop("producer"), "producer is required"),
    ("bad eventType", lambda e: e.update(eventType="DONE"), "'DONE' is not one of"),
    ("runId not a UUID", lambda e: e["run"].update(runId="run-7"), "Run refused it"),
    ("eventTime without a time", lambda e: e.update(eventTime="2026-12-01"), "not an RFC 3339 date-time"),
    ("eventTime without an offset", lambda e: e.update(eventTime="2026-12-05T11:18:54.260872"),
     "not an RFC 3339 date-time with an offset"),
    ("unknown key on the event", lambda e: e.update(status="ok"), "status not in the spec's RunEvent"),
    ("unknown key on the run", lambda e: e["run"].update(id="x"), "id not in the spec's Run"),
    ("unknown key on the job", lambda e: e["job"].update(kind="x"), "kind not in the spec's Job"),
    ("unknown key on a dataset", lambda e: e["inputs"][0].update(uri="x"), "uri not in the spec's InputDataset"),
    ("job without a name", lambda e: e["job"].pop("name"), "name required"),
    ("custom facet without _producer", lambda e: e["run"]["facets"]["lockgate_eval"].pop("_producer"),
     "has no _producer"),
    ("custom facet off its schema", lambda e: e["run"]["facets"]["lockgate_eval"].update(nCases="many"),
     "is not of type 'integer'"),
    ("unknown facet", lambda e: e["run"]["facets"].update(mine={"_producer": "x", "_schemaURL": "y"}),
     "neither a standard facet"),
    ("standard facet of another version", lambda e: e["job"]["facets"]["jobType"].update(
        _schemaURL="https://openlineage.io/spec/facets/1-0-0/JobTypeJobFacet.json"), "serialises it differently"),
])
def test_a_broken_event_is_refused(what: str, change: Any, message: str) -> None:
    with pytest.raises(SpecViolation, match=message):
        check(_broken(change))
