"""`lockgate lineage REF --at T` answers lineage as it was over a rollout that changed twice, and
`lockgate lineage export --format openlineage` turns eval runs and gate decisions into RunEvents that
fit the official OpenLineage model (the `openlineage-python` client's classes, tests/openlineage_spec.py)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.contracts import EvalCompleted, GateAudited, LineageRun, RolloutState, RuleResult
from tests.helpers import sink_stored
from tests.integration.test_aliases import lockgate
from tests.openlineage_spec import check

pytestmark = pytest.mark.timeout(120)


def _upstream_releases(settings: Settings, at: datetime | None) -> set[str]:
    result = lockgate(settings, "lineage", "web", "--json", *(["--at", at.isoformat()] if at else []))
    assert result.exit_code == 0, result.output
    view = json.loads(result.output)
    return {e["src"] for e in view["upstream"] if e["relation"] == "rolled_out"}


async def test_lineage_at_a_time_over_a_rollout_that_changed_twice(
        run_services: Any, bus: Bus, settings: Settings) -> None:
    svcs = await run_services("sink", "query", "lineage")
    t = datetime.now(UTC) + timedelta(hours=1)
    for name in ("rel-1", "rel-2"):
        art = await artifacts.register(bus, "prompt", f"{name}-p", {"template": name})
        await artifacts.register_release(bus, name, "shop", {f"prompt/{name}-p": art.hash})
    for i, change in enumerate([
        {"stable_release": "rel-1", "phase": "idle"},
        {"stable_release": "rel-1", "canary_release": "rel-2", "canary_weight": 25.0, "phase": "progressing"},
        {"stable_release": "rel-2", "phase": "promoted"},
    ]):
        await bus.publish(bus.subjects.rollout("web"), RolloutState(time=t + timedelta(hours=i), deployment="web",
                                                                   **change))
    await sink_stored(svcs["sink"].handlers, lineage_edges=5)

    assert await asyncio.to_thread(_upstream_releases, settings, t - timedelta(minutes=1)) == set()
    assert await asyncio.to_thread(_upstream_releases, settings, t + timedelta(minutes=30)) == {"rel-1"}
    assert await asyncio.to_thread(_upstream_releases, settings, t + timedelta(minutes=90)) == {"rel-1", "rel-2"}
    assert await asyncio.to_thread(_upstream_releases, settings, None) == {"rel-1", "rel-2"}
    # As of before the release was registered, it used nothing yet.
    before = await asyncio.to_thread(lockgate, settings, "lineage", "rel-1", "--json", "--at",
                                     (t - timedelta(hours=2)).isoformat())
    assert before.exit_code == 0 and json.loads(before.output)["upstream"] == []
    bad = await asyncio.to_thread(lockgate, settings, "lineage", "rel-1", "--at", "soon")
    assert bad.exit_code == 2 and "not an ISO 8601 time" in bad.output


class _Collector:
    """An OpenLineage HTTP endpoint on loopback that keeps what it was sent."""

    def __init__(self, into: list[dict[str, Any]]) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                into.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(201)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v1/lineage"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_openlineage_export_of_eval_runs_and_gate_decisions(
        run_services: Any, bus: Bus, settings: Settings) -> None:
    svcs = await run_services("sink", "query", "lineage")
    suite = await artifacts.register(bus, "eval_suite", "qa", {"name": "qa"})
    data = await artifacts.register(bus, "dataset", "qa-cases", [{"id": "c1", "input": "q"}])
    prompt = await artifacts.register(bus, "prompt", "answer", {"template": "{{q}}"})
    model = await artifacts.register(bus, "model_config", "sim", {"model": "m", "endpoint": "default"})
    policy = await artifacts.register(bus, "policy", "gate", {"rules": []})
    await artifacts.register_release(bus, "shop-v2", "shop", {"prompt/answer": prompt.hash,
                                                              "model_config/sim": model.hash})
    done = EvalCompleted(run_id="run-7", release="shop-v2", suite=suite.hash, policy=policy.hash, n_cases=40,
                         metrics={"exact_match": 0.9, "latency_ms_p95": 120.5})
    await bus.publish(bus.subjects.eval_completed, done)
    await bus.publish(bus.subjects.lineage_run, LineageRun(run_id="run-7", kind="eval", release="shop-v2",
                                                           inputs=[suite.hash, data.hash], outputs=["run-7"]))
    failed = EvalCompleted(run_id="run-8", release="shop-v2", suite=suite.hash, status="failed", error="boom")
    await bus.publish(bus.subjects.eval_completed, failed)
    await bus.publish(bus.subjects.gate_audit, GateAudited(
        release="shop-v2", action="decided", actor="gatekeeper", decision="PASS", eval_run="run-7",
        policy=policy.hash, rules=[RuleResult(rule="q", metric="exact_match", op=">=", threshold=0.8,
                                              observed=0.9, verdict="PASS")]))
    await bus.publish(bus.subjects.rollout("web"), RolloutState(deployment="web", stable_release="shop-v1",
                                                               canary_release="shop-v2", canary_weight=10.0,
                                                               phase="progressing", started_at=1764579600.5,
                                                               began=True))
    await sink_stored(svcs["sink"].handlers, eval_runs=2, gate_decisions=1, lineage_runs=1, releases=1,
                      rollout_events=1)

    received: list[dict[str, Any]] = []
    server = _Collector(received)
    try:
        result = await asyncio.to_thread(lockgate, settings, "lineage", "export", "--format", "openlineage",
                                         "--release", "shop-v2", "--url", server.url)
    finally:
        server.close()
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(events) == 5 and received == events  # the HTTP transport posted each one
    gone = await asyncio.to_thread(lockgate, settings, "lineage", "export", "--release", "shop-v2", "--url", server.url)
    assert gone.exit_code == 1 and "cannot send OpenLineage events" in gone.output.splitlines()[-1]
    keyed = await asyncio.to_thread(lockgate, settings, "lineage", "export", "--release", "shop-v2",
                                    "--url", f"{server.url}?api-key=OLKEYCANARY0123")
    assert keyed.exit_code == 1 and "OLKEYCANARY" not in keyed.output  # a CI log keeps what the CLI prints
    release_ev = next(e for e in events if e["job"]["name"] == "release/shop")
    assert {d["name"] for d in release_ev["inputs"]} == {"prompt/answer", "model_config/sim"}
    assert release_ev["outputs"][0]["name"] == "release/shop-v2"
    rollout_ev = next(e for e in events if e["job"]["name"] == "rollout/web")
    assert rollout_ev["eventType"] == "START"  # the canary's first change
    assert rollout_ev["run"]["facets"]["lockgate_rollout"]["weights"] == {"shop-v1": 90.0, "shop-v2": 10.0}
    # The CLI read these rows over NATS from the query service, whose times are strings: each eventTime is still
    # RFC 3339 with its offset (before, `2026-12-05T11:18:54.260872`, which Marquez refuses).
    assert all(e["eventTime"].endswith("Z") for e in events), [e["eventTime"] for e in events]
    for event in events:
        check(event)  # the official model, strictly (tests/openlineage_spec.py)
    by_job = {e["job"]["name"]: e for e in events if e["eventType"] == "COMPLETE"}
    run = by_job["eval/qa"]
    assert {d["name"] for d in run["inputs"]} == {"eval_suite/qa", "dataset/qa-cases", "prompt/answer",
                                                  "model_config/sim"}
    assert {d["facets"]["version"]["datasetVersion"] for d in run["inputs"]} == {
        suite.hash, data.hash, prompt.hash, model.hash}
    [result_ds] = run["outputs"]
    assert result_ds["name"] == "eval_result/run-7" and result_ds["outputFacets"]["outputStatistics"]["rowCount"] == 40
    assert run["run"]["facets"]["lockgate_eval"]["metrics"] == {"exact_match": 0.9, "latency_ms_p95": 120.5}
    gate = by_job["gate/shop-v2"]
    quality = gate["inputs"][0]["inputFacets"]["dataQualityMetrics"]
    assert quality["rowCount"] == 40 and set(quality["columnMetrics"]) == {"exact_match", "latency_ms_p95"}
    assert gate["run"]["facets"]["parent"]["run"]["runId"] == run["run"]["runId"]
    assert gate["run"]["facets"]["lockgate_decision"]["decision"] == "PASS"
    [fail] = [e for e in events if e["eventType"] == "FAIL"]
    assert fail["run"]["facets"]["errorMessage"]["message"] == "boom"

    # Data to outcomes: the dataset's lineage lists every eval run that used it, with metrics and decision.
    view = json.loads((await asyncio.to_thread(lockgate, settings, "lineage", data.hash, "--json")).output)
    assert [(o["run_id"], o["decision"], o["metrics"]["exact_match"]) for o in view["outcomes"]] == [
        ("run-7", "PASS", 0.9)]
    by_prompt = json.loads((await asyncio.to_thread(lockgate, settings, "lineage", prompt.hash, "--json")).output)
    assert {o["run_id"] for o in by_prompt["outcomes"]} == {"run-7", "run-8"}  # through the release
    table = await asyncio.to_thread(lockgate, settings, "lineage", data.hash)
    assert "eval outcomes that used it" in table.output and "run-7" in table.output

    schemas = json.loads((await asyncio.to_thread(lockgate, settings, "lineage", "export", "--facet-schemas")).output)
    own = run["run"]["facets"]["lockgate_eval"]
    assert own["_schemaURL"] == schemas["lockgate_eval"]["$id"]
    assert set(schemas["lockgate_eval"]["required"]) <= set(own)
