"""The whole loop on a real nats-server and chDB, all six services and the sink in one runtime:
register -> eval -> gate -> router shift -> inference events -> drift + cost -> rows in ClickHouse."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from lockgate.config import Settings
from lockgate.errors import NotFound
from lockgate.server.apikeys import bootstrap
from lockgate.server.runtime import Runtime
from lockgate.services.query import traces as trace_queries
from lockgate_dev.demo import (
    APP,
    BAD,
    BASELINE,
    DEPLOYMENT,
    GOOD,
    demo_sim_config,
    run_demo,
    write_demo_gates,
)
from lockgate_dev.sim import SimServer
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(240)


async def test_release_goes_through_the_whole_loop(settings: Settings) -> None:
    sim = SimServer(demo_sim_config())
    await sim.start()
    # Embedded as `lockgate up` runs: its own nats-server with a user per service, each service on
    # a connection of its own, so every publish in the loop passes the permission table.
    # With the gates file `lockgate dev up` writes: the demo's evals name the policy it requires.
    runtime = Runtime(settings.replace(stable_upstream=sim.url, canary_upstream=sim.url,
                                       nats_url="nats://127.0.0.1:0", gates_file=write_demo_gates(settings.home)))
    await runtime.start()
    try:
        assert runtime.services is not None and runtime.ctx is not None
        assert runtime.services["router"].ctx.bus.auth.user == "router"
        bus = runtime.ctx.bus  # the admin connection, which can watch every subject
        store = runtime.ctx.store
        sink = runtime.services["sink"].handlers
        drift_sub = await bus.nc.subscribe(bus.subjects.drift(DEPLOYMENT))
        keys = bootstrap(settings.home, app=APP)  # what `lockgate dev up --demo` makes and prints
        story = await run_demo(runtime.ctx.bus, router_url=runtime.services["router"].url, sim_url=sim.url,
                               console=Console(quiet=True), traffic=240, admin_key=keys.admin_key,
                               app_key=keys.app_key, home=settings.home)

        # gate: the wrong candidate is blocked naming its failing rule, the good one passes
        assert story["decisions"] == {BASELINE: "PASS", BAD: "BLOCK", GOOD: "PASS"}
        # every table is the sink's projection of a stream, so each check waits for the sink first
        await eventually(lambda: store.scalar("SELECT count() FROM gate_decisions WHERE release = {r:String}",
                                              {"r": BAD}) > 0, [sink.progress("gate_decisions")],
                         what="the blocked decision stored")
        blocked = store.rows("SELECT rules FROM gate_decisions WHERE release = {r:String}", {"r": BAD})
        failing = [r["rule"] for r in json.loads(blocked[0]["rules"]) if r["verdict"] != "PASS"]
        assert "answers-correct" in failing

        # router: BLOCK sent the bad canary to 0 at once; PASS promoted the good one step by step
        phases = [(p, w) for p, w in story["rollouts"]]
        assert ("aborted", 0.0) in phases
        assert phases[-1][0] == "promoted"
        assert story["final"] == {"phase": "promoted", "stable": GOOD, "canary": GOOD}
        weights = [w for p, w in phases if p == "progressing"]
        assert weights == sorted(weights) and len(weights) >= 2

        # every request through the router lands once in inference_events, both variants seen
        def events_landed() -> bool:
            return store.scalar("SELECT count() FROM inference_events WHERE app = {a:String}",
                                {"a": APP}) >= story["requests"]

        await eventually(events_landed, [sink.events], what="router events in ClickHouse")
        assert store.scalar("SELECT count() - uniqExact(id) FROM inference_events") == 0
        variants = {r["variant"] for r in store.rows("SELECT DISTINCT variant FROM inference_events")}
        assert {"stable", "canary"} <= variants

        # drift and cost were computed from the same events
        await drift_sub.next_msg(timeout=60)
        await eventually(lambda: store.scalar("SELECT count() FROM drift_reports WHERE deployment = {d:String}",
                                              {"d": DEPLOYMENT}) > 0, [sink.progress("drift_reports")],
                         what="a drift report stored")
        await eventually(lambda: store.scalar("SELECT count() FROM cost_ledger") >= story["requests"],
                         [sink.progress("cost_ledger")], what="cost ledger rows")
        assert store.scalar("SELECT sum(cost_usd) FROM cost_ledger WHERE app = {a:String}", {"a": APP}) > 0

        # lineage links the release to its artifacts and its gate decision
        for table in ("artifacts", "releases", "lineage_edges", "eval_cases", "eval_runs", "rollout_events"):
            await eventually(lambda t=table: store.scalar(f"SELECT count() FROM {t}") > 0, [sink.progress(table)],
                             what=f"rows in {table}")

        # one trace id links the router's span and the sink's span
        trace_id = story["traces"][0]

        found: set[str] = set()

        def trace_complete() -> bool:
            try:
                found.update(s["service"] for s in trace_queries.trace(store, trace_id))
            except NotFound:
                return False
            return {"lockgate-router", "lockgate-sink"} <= found

        await eventually(trace_complete, [sink.spans],
                         what=lambda: f"router and sink spans of trace {trace_id} (found {sorted(found)})")
        spans = trace_queries.trace(store, trace_id)
        router_span = next(s for s in spans if s["service"] == "lockgate-router")
        assert router_span["trace_id"] == trace_id
        # The request's tenant: in another tenant's view of this trace it is not shown as lockgate's of no tenant.
        assert (router_span["tenant"], router_span["origin"]) == ("default", "lockgate")
        assert any(s["service"] == "lockgate-sink" for s in spans)

        # the permission table covers the whole loop: no service was refused anything
        assert {b.name: b.denied for b in runtime.buses if b.denied} == {}
    finally:
        await runtime.stop()
        await sim.stop()
