"""Provenance as it happens, on `lockgate dev up` with auth on and LOCKGATE_OPENLINEAGE_URL set: an eval
run's START and COMPLETE reach an OpenLineage endpoint (a loopback aiohttp server standing in for Marquez)
with one runId, and `lockgate eval rerun` reproduces a stored run (exit 0), disagrees against a changed
upstream (exit 5), and moves no gate either way."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from lockgate_dev.demo import demo_sim_config
from lockgate_dev.sim import ModelSpec, SimServer
from tests.e2e.test_cli import LOCKGATE, run
from tests.helpers import Process, printed_endpoints
from tests.openlineage_spec import check

pytestmark = pytest.mark.timeout(400)


class Loopback:
    """aiohttp servers on 127.0.0.1 in a thread of their own: the stack and the CLI are other processes."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.events: list[dict[str, Any]] = []
        self.arrived = threading.Condition()
        self.runner: web.AppRunner | None = None
        self.url = ""

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _lineage(self, request: web.Request) -> web.Response:
        event = await request.json()
        with self.arrived:
            self.events.append(event)
            self.arrived.notify_all()
        return web.Response(status=201)

    async def start_receiver(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v1/lineage", self._lineage)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/api/v1/lineage"  # type: ignore[union-attr]

    def wait_for(self, found: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 120.0) -> list[dict[str, Any]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: found(self.events), timeout_s), self.events
            return list(self.events)

    def close(self) -> None:
        if self.runner is not None:
            self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def loopback() -> Iterator[Loopback]:
    lb = Loopback()
    lb.call(lb.start_receiver())
    yield lb
    lb.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, loopback: Loopback) -> Iterator[dict[str, str]]:
    """`lockgate dev up` posting OpenLineage events to the loopback receiver."""
    import os

    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "LOCKGATE_OPENLINEAGE_URL": loopback.url, "COLUMNS": "200"}
    up = Process([*LOCKGATE, "dev", "up", "--home", str(home), "--nats-port", "0", "--router-port", "0",
                  "--grpc-port", "0", "--otlp-grpc-port", "0", "--otlp-http-port", "0", "--sim-port", "0"],
                 env, "Ctrl-C stops the stack")
    assert up.started(120), up.output
    endpoints = printed_endpoints(up.output)
    env.update(LOCKGATE_NATS_URL=endpoints["nats"], E2E_SIM=endpoints["simulator"], LOCKGATE_HOME=str(home))
    yield env
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(60) == 0, up.output


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    data = resources.files("lockgate_dev.demo_data")
    for name in ("suite.yaml", "qa.jsonl", "policy.yaml"):  # the demo's gates file requires this policy
        with resources.as_file(data.joinpath(name)) as src:
            shutil.copy(src, tmp_path / name)
    return tmp_path / "suite.yaml"


def _gate_events(events: list[dict[str, Any]], release: str) -> list[dict[str, Any]]:
    return [e for e in events if e["job"]["name"] == f"gate/{release}"]


def _decisions(stack: dict[str, str], release: str) -> list[dict[str, Any]]:
    return json.loads(run("decisions", "--release", release, "--json", env=stack).stdout)


def test_an_eval_run_posts_start_then_complete_and_a_rerun_reproduces_it_without_moving_the_gate(
        stack: dict[str, str], loopback: Loopback, suite: Path) -> None:
    # Under a policy: an eval naming none is a measurement, which the gate does not decide.
    policy = str(suite.parent / "policy.yaml")
    done = json.loads(run("eval", "run", str(suite), "--candidate", "live-v1", "--endpoint", stack["E2E_SIM"],
                          "--model", "sim-stable", "--policy", policy, "--json", env=stack, check=False).stdout)
    assert done["status"] == "completed", done
    run_id = done["run_id"]  # a UUIDv7: OpenLineage's runId as it is

    def of_run(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in events if e["run"]["runId"] == run_id]

    events = of_run(loopback.wait_for(lambda evs: any(e["eventType"] == "COMPLETE" for e in of_run(evs))))
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    start, complete = events
    assert start["job"] == complete["job"] and start["job"]["name"] == "eval/shop-qa"
    assert "eval_suite/shop-qa" in {d["name"] for d in start["inputs"]} and len(start["inputs"]) >= 2
    for event in events:
        check(event)  # the official OpenLineage model, strictly
    # live-v1 is not registered: the gate BLOCKed it, and the recorder posted that decision live too.
    [gate] = _gate_events(loopback.wait_for(lambda evs: bool(_gate_events(evs, "live-v1"))), "live-v1")
    assert gate["run"]["facets"]["lockgate_decision"]["decision"] == "BLOCK"
    check(gate)

    same = run("eval", "rerun", run_id, "--json", env=stack, check=False)
    assert same.returncode == 0, same.stdout + same.stderr
    agreed = json.loads(same.stdout)
    assert agreed["agrees"] and agreed["stored_cases"] == done["n_cases"] == agreed["n_cases"]
    assert {m["metric"] for m in agreed["metrics"] if m["compared"]} >= {"normalized_match", "error_rate"}
    assert agreed["environment_changes"] == {}

    # The upstream changed: the same model name now answers wrong half the time.
    config = demo_sim_config()
    right = config.models["sim-stable"].answers
    wrong = {q: ("I am not sure" if i % 2 else a) for i, (q, a) in enumerate(right.items())}
    changed = SimServer(msgspec.structs.replace(config, models={"sim-stable": ModelSpec(answers=wrong)}))
    loopback.call(changed.start())
    try:
        other = run("eval", "rerun", run_id, "--endpoint", changed.url, env=stack, check=False)
    finally:
        loopback.call(changed.stop())
    assert other.returncode == 5, other.stdout + other.stderr
    assert "not reproduced" in other.stdout and "normalized_match" in other.stdout and "NO" in other.stdout
    assert "endpoint" in other.stdout  # the environment that changed is named

    # Neither rerun moved the gate. The gatekeeper decides eval results in order, so once a later run's
    # decision was posted, one a rerun had caused would have been posted before it.
    later = json.loads(run("eval", "run", str(suite), "--candidate", "live-v2", "--endpoint", stack["E2E_SIM"],
                           "--model", "sim-stable", "--policy", policy, "--json", env=stack, check=False).stdout)
    events = loopback.wait_for(lambda evs: bool(_gate_events(evs, "live-v2")))
    assert len(_gate_events(events, "live-v1")) == 1
    assert [d["eval_run"] for d in _decisions(stack, "live-v1")] == [run_id]
    # ...and the recorder posted nothing for the reruns: only the two runs of record.
    assert {e["run"]["runId"] for e in events if e["job"]["name"] == "eval/shop-qa"} == {run_id, later["run_id"]}
