"""The lineage recorder's live OpenLineage events without a stack: what each bus event means, in the
official model, and the bookkeeping that keeps a run's START first and sends it once."""

from __future__ import annotations

from datetime import UTC, datetime

from lockgate.contracts import EvalCompleted, EvalRequested, GateDecided, ReleaseRegistered, RolloutState
from lockgate.services.lineage.live import Names, RunTracker, run_events
from tests.openlineage_spec import check

NS = "lockgate://lg"
T = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
NAMES = Names(artifacts={"sha256:s": {"kind": "eval_suite", "name": "qa"}, "sha256:d": {"kind": "dataset",
                                                                                       "name": "qa-cases"}},
              release_artifacts={"prompt/answer": "sha256:p"}, inputs=["sha256:s", "sha256:d"])


def test_each_bus_event_maps_to_official_run_events() -> None:
    req = EvalRequested(run_id="run-1", release="v2", suite="sha256:s", endpoint="http://x/v1", time=T)
    done = EvalCompleted(run_id="run-1", release="v2", suite="sha256:s", n_cases=3, metrics={"acc": 1.0}, time=T)
    failed = EvalCompleted(run_id="run-2", release="v2", suite="sha256:s", status="failed", error="boom", time=T)
    [start] = run_events(req, NAMES, NS)
    [end] = run_events(done, NAMES, NS)
    [fail] = run_events(failed, NAMES, NS)
    assert (start["eventType"], end["eventType"], fail["eventType"]) == ("START", "COMPLETE", "FAIL")
    assert start["run"]["runId"] == end["run"]["runId"] and start["job"]["name"] == end["job"]["name"] == "eval/qa"
    others = [
        *run_events(GateDecided(release="v2", decision="PASS", rules=[], eval_run="run-1", time=T), NAMES, NS),
        *run_events(ReleaseRegistered(release="v2", app="shop", artifacts={"prompt/answer": "sha256:p"}, time=T),
                    NAMES, NS),
        *run_events(RolloutState(deployment="web", stable_release="v1", canary_release="v2", canary_weight=10.0,
                                 phase="idle", started_at=1764579600.25, began=True, time=T), NAMES, NS),
    ]
    assert [e["eventType"] for e in others] == ["COMPLETE", "COMPLETE", "START"]
    for event in (start, end, fail, *others):
        check(event)


def test_an_end_without_its_start_gets_one_first_and_a_late_start_is_not_sent() -> None:
    tracker = RunTracker(capacity=2)
    start = {"run": {"runId": "a"}, "eventType": "START"}
    end = {"run": {"runId": "a"}, "eventType": "COMPLETE"}
    assert tracker.order([end], {"a": start}) == [start, end]
    assert tracker.order([start], {}) == []  # the run already ended
    b_start, b_end = {"run": {"runId": "b"}, "eventType": "START"}, {"run": {"runId": "b"}, "eventType": "FAIL"}
    assert tracker.order([b_start], {}) == [b_start]
    assert tracker.order([b_start], {}) == []  # sent once
    assert tracker.order([b_end], {"b": b_start}) == [b_end]
    tracker.order([{"run": {"runId": "c"}, "eventType": "START"}], {})
    assert len(tracker._state) == 2  # bounded: the oldest run is forgotten


def test_nothing_of_a_run_is_sent_after_its_end() -> None:
    # Probe p29 F7: a release announced twice was posted as two COMPLETEs of one run.
    tracker = RunTracker()
    start, running = {"run": {"runId": "a"}, "eventType": "START"}, {"run": {"runId": "a"}, "eventType": "RUNNING"}
    end, release = {"run": {"runId": "a"}, "eventType": "COMPLETE"}, {"run": {"runId": "r"}, "eventType": "COMPLETE"}
    assert not tracker.knows("a")
    assert tracker.order([start, running, end], {}) == [start, running, end]
    assert tracker.order([end, running, {**end, "eventType": "FAIL"}], {"a": start}) == []
    assert tracker.order([release], {}) == [release] and tracker.order([release], {}) == []
    assert tracker.knows("a") and tracker.knows("r")
