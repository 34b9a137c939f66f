"""`lockgate eval run` of a suite too small to bound its metric: the gate holds it for review, never a PASS.

Before (probe p12, F2): a one-case suite answered right printed `exact_match 1 [1, 1] degenerate`, and the gate
signed a PASS of `exact_match >= 0.9` "across the whole interval": the bootstrap of one value (or of values all
alike) is a point, which the gate read as an interval of width 0.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from lockgate.bus import Bus
from lockgate.cli.gate import current_decision
from lockgate.cli.main import cli
from lockgate.config import Settings
from lockgate.signing import Keyring, ensure_signer_trusted
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import register_model_release

pytestmark = pytest.mark.timeout(90)
CASE = {"id": "capital-fr", "vars": {"question": "What is the capital of France?"}, "expected": "Paris"}


@pytest.fixture
async def stack(context: Any, run_services: Callable[..., Any]) -> AsyncIterator[str]:
    """Sink, query, evaluator and gatekeeper, with a simulator that answers the case right as the allow-list's
    `default` endpoint (where the test release ships); the gatekeeper's key trusted. Yields the simulator's URL."""
    ensure_signer_trusted(context.settings)
    models = {"good": ModelSpec(answers={CASE["vars"]["question"]: CASE["expected"]}, latency_ms=2)}
    async with SimServer(SimConfig(models=models)) as sim:
        context.settings = context.settings.replace(stable_upstream=sim.url)
        await run_services("sink", "query", "evaluator", "gatekeeper")
        yield sim.url


async def eval_run(settings: Settings, suite: Path, release: str, policy: Path) -> Result:
    """`lockgate eval run` as an operator types it, waiting for the gate's decision (the release says what ships)."""
    argv = ["--nats", settings.nats_url, "--prefix", settings.prefix, "--home", settings.home, "eval", "run",
            str(suite), "--candidate", release, "--policy", str(policy), "--timeout", "60", "--json"]
    return await asyncio.to_thread(CliRunner().invoke, cli, argv, catch_exceptions=False)  # its own event loop


async def test_a_one_case_suite_is_held_for_review_not_passed(
    bus: Bus, settings: Settings, context: Any, stack: str, tmp_path: Path
) -> None:
    suite = tmp_path / "one.yaml"
    suite.write_text(yaml.safe_dump({"name": "one", "prompt": {"system": "Answer with one word.",
                                                               "template": "{question}"},
                                     "dataset": [CASE], "scorers": ["exact_match"]}))
    policy = tmp_path / "accuracy.yaml"  # intervals on, the default
    policy.write_text(yaml.safe_dump({"name": "accuracy", "rules": [
        {"name": "acc", "metric": "exact_match", "op": ">=", "threshold": 0.9}]}))
    await register_model_release(bus, "one-case", "good")

    result = await eval_run(settings, suite, "one-case", policy)
    assert result.exit_code == 5, result.output  # held for review: CI does not read it as passed
    out = json.loads(result.output)
    assert out["metrics"]["exact_match"] == 1.0  # the one case was answered right
    iv = out["intervals"]["exact_match"]
    assert iv["method"] == "bounded" and iv["low"] < 0.25 and iv["high"] == 1.0  # not [1, 1]
    d = await current_decision(bus, "one-case")
    assert (d.decision, out["decision"]["id"]) == ("NEEDS_REVIEW", d.id)
    assert Keyring.from_settings(context.settings).verify(d) == d.key_id
    (rule,) = d.rules
    assert rule.verdict == "INCONCLUSIVE" and "increase the sample to about 785 cases (now 1)" in rule.hint
