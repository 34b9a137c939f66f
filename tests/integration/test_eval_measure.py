"""`lockgate eval run` of a release a deployment serves, on a real nats-server and chDB with the gates file: a run
that can only BLOCK it is not what a typo gets (probe p12).

Before, `eval run suite.yaml --candidate R` without `--policy` (a measurement) exited 0 while the gatekeeper signed a
BLOCK of R ("names no policy; the gate fails closed") and the router rolled R back; with the required policy but
another suite the same BLOCK came with exit 5, after the rollback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from click.testing import CliRunner, Result

from lockgate.bus import Bus
from lockgate.cli.gate import current_decision
from lockgate.cli.main import cli
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import GateDecided
from lockgate.server.service import ServiceContext
from lockgate.signing import Keyring
from tests.helpers import admin_headers, register_model_release, store_pass
from tests.integration.test_required_gates import FIXTURES, canary, files, gated, trusted  # noqa: F401

pytestmark = pytest.mark.timeout(120)
_decided: Codec[GateDecided] = Codec(GateDecided)


@pytest.fixture
async def serving(context: ServiceContext, run_services: Callable[..., Any], tmp_path: Path, settings: Settings,
                  files: dict[str, str], trusted: Keyring) -> AsyncIterator[dict[str, Any]]:  # noqa: F811
    """Deployment `chat` serving r1 (stable) and r2 (canary), r2 PASSed by `eval run` under the policy and suite
    the gates file requires of app shop."""
    apps = {"shop": {"policy": "strict", "suite": "qa"}}
    async with gated(context, run_services, tmp_path, apps) as svcs:
        await register_model_release(context.bus, "r1", "good", temperature=0)
        await register_model_release(context.bus, "r2", "good")
        await store_pass(context.bus, "r1", context.settings)
        passed = await eval_run(settings, svcs["sim"], FIXTURES / "suites" / "qa.yaml", "--policy", files["strict"])
        assert passed.exit_code == 0, passed.output
        state = await canary(svcs["router"], "r2")
        assert (state["phase"], state["canary"]["release"]) == ("progressing", "r2"), state
        yield {**svcs, "pass": await current_decision(context.bus, "r2")}


async def eval_run(settings: Settings, sim: str, suite: Path, *more: str) -> Result:
    """`lockgate eval run SUITE --candidate r2` as an operator types it (`more`: --policy and the like)."""
    args = ["--nats", settings.nats_url, "--prefix", settings.prefix, "--home", settings.home, "eval", "run",
            str(suite), "--candidate", "r2", "--endpoint", sim, "--model", "good", "--timeout", "60", *more]
    # In a thread: the CLI runs its own event loop. Its settings say where `default` is, as the stack's do.
    return await asyncio.to_thread(CliRunner().invoke, cli, args, env={"LOCKGATE_STABLE_UPSTREAM": sim},
                                   catch_exceptions=False)


async def route(router: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession(headers=admin_headers(router.ctx.settings.home)) as http, \
            http.get(f"{router.url}/lockgate/v1/deployments/chat") as resp:
        return await resp.json()


class Said(logging.Handler):
    """Sets `event` when a record's message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.event = text, asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


async def test_an_eval_run_without_a_policy_is_a_measurement_the_serving_release_keeps_its_pass_and_route(
        bus: Bus, settings: Settings, serving: dict[str, Any]) -> None:
    sub = await bus.nc.subscribe(bus.subjects.gate_decided("r2"))
    said = Said("names no policy: a measurement, not decided")
    gatekeeper = logging.getLogger("lockgate.gatekeeper")
    level = gatekeeper.level
    gatekeeper.setLevel(logging.INFO)  # the line is an INFO one
    gatekeeper.addHandler(said)
    try:
        measured = await eval_run(settings, serving["sim"], FIXTURES / "suites" / "qa.yaml")
        assert measured.exit_code == 0, measured.output
        # Whichever comes first: the gatekeeper's word that it decided nothing, or a decision of r2 (before the fix:
        # a signed BLOCK, "names no policy; the gate fails closed").
        waits = {asyncio.ensure_future(said.event.wait()): "measured",
                 asyncio.ensure_future(sub.next_msg(timeout=60)): "decided"}
        finished, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        [first] = finished
        assert waits[first] == "measured", (d := _decided.decode(first.result().data)).decision + ": " + d.reason
    finally:
        gatekeeper.removeHandler(said)
        gatekeeper.setLevel(level)
        await sub.unsubscribe()
    assert (await current_decision(bus, "r2")).id == serving["pass"].id
    state = await route(serving["router"])
    # Not rolled back: still the canary's rollout (its steps may have run on to the promotion meanwhile, on a busy
    # machine), never aborted by a decision the measurement made.
    assert (state["phase"], state["canary"]["release"]) in {("progressing", "r2"), ("promoted", "r2")}, state
    # And the CLI says so: exit 0 is "the eval completed", no gate was asked.
    assert "gate: none (a measurement" in measured.output, measured.output


async def test_an_eval_run_on_another_suite_than_the_pass_is_refused_before_anything_is_requested(
        bus: Bus, settings: Settings, serving: dict[str, Any], files: dict[str, str],  # noqa: F811
        tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"  # the fixture suite's dataset, one scorer: registered as suite qa-other
    doc = yaml.safe_load((FIXTURES / "suites" / "qa.yaml").read_text())
    other.write_text(yaml.safe_dump({**doc, "name": "qa-other", "scorers": ["exact_match"]}))
    refused = await eval_run(settings, serving["sim"], other, "--policy", files["strict"])
    # Before: exit 5 after the gate signed a BLOCK (`required_suite`) of r2 and the router rolled it back.
    assert refused.exit_code == 2, refused.output
    assert len(refused.output.strip().splitlines()) == 1, refused.output
    assert f"release 'r2' has a PASS (decision {serving['pass'].id}) decided under suite " in refused.output
    assert "--replace-pass" in refused.output
    assert (await current_decision(bus, "r2")).id == serving["pass"].id
    state = await route(serving["router"])
    # Not rolled back: still the canary's rollout (its steps may have run on to the promotion meanwhile, on a busy
    # machine), never aborted by a decision the measurement made.
    assert (state["phase"], state["canary"]["release"]) in {("progressing", "r2"), ("promoted", "r2")}, state

    # Asked for on purpose, it is requested and judged: the gates file's suite is required, so a BLOCK naming it.
    judged = await eval_run(settings, serving["sim"], other, "--policy", files["strict"], "--replace-pass")
    assert judged.exit_code == 5, judged.output
    blocked = await current_decision(bus, "r2")
    assert blocked.decision == "BLOCK" and "required_suite" in {r.rule for r in blocked.rules}, blocked
