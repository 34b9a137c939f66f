"""A password in an eval's endpoint URL is stored nowhere (probe p10, F6).

Before, `lockgate eval run --endpoint http://evaluser:PASSWORD@host/v1` of a release that ships another endpoint was
requested; the evaluator refused it with a message quoting the URL whole, and the password was then in
`eval_runs.error`, the gatekeeper's signed BLOCK (KV and `gate_decisions`), the hash-chained audit log (for good),
the serving deployment's route reason (which any viewer key of the tenant reads), `rollout_events` and the log.

Here the stack runs as `lockgate up` does (embedded nats-server with every identity's permissions): the CLI refuses
such a URL before it requests anything, and a request the operator's credential publishes itself fails at the
evaluator, naming the URL with its password masked, so nothing downstream has it to copy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from click.testing import Result

from lockgate import artifacts, credentials
from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import EvalRequested, GateDecided, RolloutState
from lockgate.server.apikeys import KeyStore
from lockgate.server.runtime import Runtime
from lockgate.signing import Keyring
from lockgate.subjects import Subjects, token
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import admin_headers, eventually, run_cli
from tests.integration.test_eval_gate import qa_answers, request

pytestmark = pytest.mark.timeout(120)
FIXTURES = Path(__file__).parent.parent / "fixtures"
SUITE, POLICY = FIXTURES / "suites" / "qa.yaml", FIXTURES / "policies" / "default.yaml"
PW = "Pw9xKq2mZt7LrV4n"
decided: Codec[GateDecided] = Codec(GateDecided)
rollout: Codec[RolloutState] = Codec(RolloutState)


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(SimConfig(models={"good": ModelSpec(answers=qa_answers())})) as server:
        yield server


@pytest.fixture
async def stack(settings: Settings, sim: SimServer) -> AsyncIterator[Runtime]:
    """The embedded stack; the allow-list's `default` endpoint, where release r1 ships, is the simulator."""
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", stable_upstream=sim.url),
                      services=["sink", "query", "evaluator", "gatekeeper", "router"])
    await runtime.start()
    yield runtime
    await runtime.stop()


def with_password(url: str) -> str:
    return url.replace("http://", f"http://evaluser:{PW}@")


async def _operator(settings: Settings) -> Bus:
    bus = Bus(settings.nats_url, Subjects(settings.prefix), name="test-operator",
              auth=credentials.for_identity(settings, "operator"), manage_topology=False)
    await bus.connect()
    return bus


async def _register_r1(operator: Bus) -> None:
    """Release r1 of app shop, shipping model `good` at the allow-list's `default` endpoint."""
    await artifacts.register_file(operator, "dataset", FIXTURES / "suites" / "qa.jsonl")  # the suite names it
    config = (await artifacts.register(operator, "model_config", "r1-config",
                                       {"model": "good", "endpoint": "default"})).hash
    await artifacts.register_release(operator, "r1", "shop", {"model_config/r1-config": config})


async def _eval_run(stack: Runtime, *args: str) -> Result:
    """`lockgate eval run` of r1 as the operator types it, on the fixture suite and policy."""
    return await run_cli(stack, "--role", "operator", "eval", "run", str(SUITE), "--candidate", "r1",
                         "--policy", str(POLICY), "--timeout", "60", *args)


def _refusal(url: str) -> str:
    return (f"eval endpoint {url.replace('http://', 'http://evaluser:[REDACTED]@')!r} carries a credential in its "
            "URL, which every record of the run would keep: list the endpoint in the endpoints file "
            "(LOCKGATE_ENDPOINTS_FILE) with its credential named there, and give its id")


async def test_eval_run_refuses_an_endpoint_url_with_a_password_before_it_requests_anything(
    stack: Runtime, sim: SimServer
) -> None:
    admin = stack.ctx.bus  # only watches
    requested = await admin.nc.subscribe(admin.subjects.eval_requested)
    operator = await _operator(stack.settings)
    try:
        await _register_r1(operator)
        refused = await _eval_run(stack, "--endpoint", with_password(sim.url))
        assert refused.exit_code == 2, refused.output
        assert refused.stderr == f"error: {_refusal(sim.url)}\n", refused.output  # one line
        assert PW not in refused.output
        # The first request anything published is the next one: the refused run was never requested.
        passed = await _eval_run(stack, "--json")
        assert passed.exit_code == 0, passed.output
        first = Codec(EvalRequested).decode((await requested.next_msg(timeout=5)).data)
        assert first.run_id == json.loads(passed.stdout)["run_id"]
    finally:
        await operator.close()
        await requested.unsubscribe()
    assert sim.requests == {"good": 20}


async def test_a_password_in_an_eval_endpoint_url_is_in_no_table_decision_audit_row_route_or_log(
    stack: Runtime, sim: SimServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = stack.ctx.bus  # only watches: every act below is the operator's (and the admin key's PUT)
    store = stack.ctx.store
    assert store is not None and stack.services is not None
    sink, router = stack.services["sink"].handlers, stack.services["router"]
    requested = await admin.nc.subscribe(admin.subjects.eval_requested)
    gates = await admin.nc.subscribe(admin.subjects.gate_decided_all)
    routes = await admin.nc.subscribe(admin.subjects.rollout("chat"))
    operator = await _operator(stack.settings)
    try:
        # r1 gated as it ships, then serving deployment `chat`.
        await _register_r1(operator)
        passed = await _eval_run(stack)
        assert passed.exit_code == 0, passed.output
        first = Codec(EvalRequested).decode((await requested.next_msg(timeout=5)).data)
        assert decided.decode((await gates.next_msg(timeout=30)).data).decision == "PASS"
        async with aiohttp.ClientSession(headers=admin_headers(stack.settings.home)) as http, http.put(
                f"{router.url}/lockgate/v1/deployments/chat", json={"stable_release": "r1"}) as resp:
            assert resp.status == 200, await resp.text()

        # A request with the URL that the operator's credential publishes itself: the evaluator fails the run,
        # naming the URL masked, and the gate BLOCKs r1 (the serving release) saying so.
        req = request(release="r1", suite=first.suite, policy=first.policy, endpoint=with_password(sim.url),
                      model="good")
        await operator.publish(operator.subjects.eval_requested, req)
        while (decision := decided.decode((await gates.next_msg(timeout=30)).data)).eval_run != req.run_id:
            pass
        # And of a name nobody registered, which may call a URL: before, that run completed and its environment
        # (read by `lineage export` and `eval rerun`) kept the URL whole. It names no policy: a measurement, which
        # the gate does not decide (its stored run is checked below).
        adhoc = request(release="adhoc-check", suite=first.suite, endpoint=with_password(sim.url), model="good")
        await operator.publish(operator.subjects.eval_requested, adhoc)
        while "BLOCK" not in (state := rollout.decode((await routes.next_msg(timeout=30)).data)).reason:
            pass
    finally:
        await operator.close()
        for sub in (requested, gates, routes):
            await sub.unsubscribe()

    refusal = _refusal(sim.url)
    assert decision.decision == "BLOCK" and refusal in decision.reason and PW not in decision.reason
    assert Keyring.from_settings(stack.settings).verify(decision) == decision.key_id
    stored = decided.decode((await (await admin.kv(admin.subjects.kv_gates)).get(token("r1"))).value)
    assert stored.id == decision.id and PW not in json.dumps(stored.reason)
    assert refusal in state.reason and PW not in state.reason
    assert sim.requests == {"good": 20}  # only r1's first run called it

    # The route as a viewer key of the tenant (a dashboard's) reads it.
    viewer = KeyStore(stack.settings.home).create("default", "shop", "viewer")[0]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {viewer}"}) as http, \
            http.get(f"{router.url}/lockgate/v1/deployments/chat") as resp:
        assert resp.status == 200, await resp.text()
        route = await resp.text()
    assert refusal in json.loads(route)["reason"] and PW not in route

    # Every table, once the sink has stored the failed run, its decision, the audit row and the route's event.
    def stored_all() -> bool:
        return (store.scalar(f"SELECT count() FROM eval_runs WHERE run_id = '{req.run_id}'") == 1
                and store.scalar(f"SELECT count() FROM gate_decisions WHERE id = '{decision.id}'") >= 1
                and store.scalar(f"SELECT count() FROM audit_log WHERE details['decision_id'] = '{decision.id}'") >= 1
                and store.scalar("SELECT count() FROM rollout_events WHERE position(reason, 'BLOCK') > 0") >= 1)

    await eventually(stored_all, [sink.progress(t) for t in ("eval_runs", "gate_decisions", "audit_log",
                                                              "rollout_events")], what="the run's records stored")
    await eventually(lambda: store.scalar(f"SELECT count() FROM eval_runs WHERE run_id = '{adhoc.run_id}'") == 1,
                     [sink.progress("eval_runs")], what="the unregistered release's run stored")
    for run in (req, adhoc):
        assert store.rows(f"SELECT status, error FROM eval_runs WHERE run_id = '{run.run_id}'") == [
            {"status": "failed", "error": refusal}]
    tables = [r["name"] for r in store.rows("SELECT name FROM system.tables WHERE database = currentDatabase()")]
    assert [t for t in tables if PW in repr(store.rows(f"SELECT * FROM {t}"))] == []
    assert PW not in caplog.text
