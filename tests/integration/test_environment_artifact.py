"""An eval run's environment is an artifact of kind `environment`, on an authenticated embedded stack run as
`lockgate up` runs it (each service with its own NATS identity), through the CLI: registered by the evaluator,
content-addressed (two runs in one environment share one artifact, registered once), its hash on the run, and an
input of the run's lineage, so `lockgate lineage sha256:<env>` lists the runs that used it and the OpenLineage
export names it. `cpu` is the CPU's model, `machine` the architecture.

Found by probe p29 (F9): the environment was only the `eval_runs.environment` map. No `environment` artifact was
registered, it had no content hash, nothing could find the runs that shared one, and `cpu` was the architecture.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from lockgate import artifacts
from lockgate.config import Settings
from lockgate.provenance import environment
from lockgate.server.runtime import Runtime
from lockgate.store import Store
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import eventually, register_model_release, run_cli, run_cli_json
from tests.integration.test_required_gates import FIXTURES, answers
from tests.openlineage_spec import check

pytestmark = pytest.mark.timeout(150)
SUITE = str(FIXTURES / "suites" / "qa.yaml")


async def test_each_eval_run_registers_its_environment_and_its_lineage_lists_the_runs_that_shared_it(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    async with SimServer(SimConfig(models={"good": ModelSpec(answers=answers(), latency_ms=2)})) as sim:
        base = settings.replace(nats_url="nats://127.0.0.1:0", stable_upstream=sim.url)
        runtime = Runtime(base, services=["sink", "query", "lineage", "evaluator"])
        await runtime.start()
        try:
            bus = runtime.ctx.bus
            await artifacts.register_file(bus, "dataset", FIXTURES / "suites" / "qa.jsonl")  # the suite's
            await register_model_release(bus, "r-env", "good")
            runs = [(await run_cli_json(runtime, "--role", "operator", "eval", "run", SUITE, "--candidate", "r-env",
                                        "--timeout", "60"))["run_id"] for _ in range(2)]
            sink = runtime.services["sink"].handlers

            def seen() -> dict[str, int]:
                count = "SELECT {what} FROM {table} WHERE {where}"
                queries = {
                    "eval runs": count.format(what="uniqExact(run_id)", table="eval_runs",
                                              where="run_id IN {r:Array(String)}"),
                    "lineage runs": count.format(what="uniqExact(run_id)", table="lineage_runs",
                                                 where="run_id IN {r:Array(String)}"),
                    "used edges": count.format(what="count()", table="lineage_edges",
                                               where="src IN {r:Array(String)} AND relation = 'used'"),
                    "environment artifacts": count.format(what="count()", table="artifacts",
                                                          where="kind = 'environment'")}
                return {name: store.scalar(sql, {"r": runs}) for name, sql in queries.items()}

            # Each run used its suite, its dataset and its environment.
            wanted = {"eval runs": 2, "lineage runs": 2, "used edges": 6, "environment artifacts": 1}
            await eventually(lambda: seen() == wanted,
                             [sink.progress(t) for t in ("eval_runs", "lineage_runs", "lineage_edges", "artifacts")],
                             what=lambda: f"stored {wanted} (seen {seen()})")

            rows = store.rows("SELECT run_id, environment FROM eval_runs WHERE run_id IN {r:Array(String)} "
                              "ORDER BY run_id LIMIT 1 BY run_id", {"r": runs})
            envs = [dict(r["environment"]) for r in rows]
            assert len(envs) == 2
            digest = envs[0]["hash"]
            # One environment, one content hash: the run's map without its hash, which the artifact holds.
            assert digest.startswith("sha256:") and envs[1]["hash"] == digest
            assert environment.digest(envs[0]) == digest
            assert await artifacts.load_structured(bus, digest) == environment.content(envs[0])
            # Registered once, as an environment, under the runs' tenant.
            assert store.rows("SELECT kind, name, tenant FROM artifacts WHERE hash = {h:String}", {"h": digest}) == [
                {"kind": "environment", "name": environment.artifact_name(digest), "tenant": "default"}]
            # The CPU's model, not the architecture again.
            assert envs[0]["cpu"] == environment.cpu_model() and envs[0]["machine"] == platform.machine()

            # `lineage sha256:<env>`: an environment, which both runs used.
            view = await run_cli_json(runtime, "lineage", digest)
            assert view["kind"] == "environment"
            assert {o["run_id"] for o in view["outcomes"]} == set(runs)
            assert {(e["src"], e["relation"]) for e in view["downstream"] if e["dst"] == digest} == {
                (r, "used") for r in runs}
            # `lineage RUN`: the environment is one of the run's inputs.
            upstream = (await run_cli_json(runtime, "lineage", runs[0]))["upstream"]
            assert any(e["dst"] == digest and e["relation"] == "used" for e in upstream), upstream

            # The OpenLineage export names it as an input of each eval run, versioned by its hash.
            exported = await run_cli(runtime, "lineage", "export", "--format", "openlineage", "--release", "r-env")
            assert exported.exit_code == 0, exported.output
            events = [json.loads(line) for line in exported.stdout.splitlines()]
            evals = [e for e in events if e["job"]["name"].startswith("eval/")]
            assert len(evals) == 2
            for event in evals:
                check(event)
                inputs = {i["name"]: i["facets"]["version"]["datasetVersion"] for i in event["inputs"]}
                assert inputs[f"environment/{environment.artifact_name(digest)}"] == digest
        finally:
            await runtime.stop()
