"""`lockgate rollout patch` on a running stack (real nats-server, chDB, the simulator): a merge patch of the weight
changes the weight alone (the canary keeps its release, endpoint and step), records the operator as the actor, and
a bad patch exits non-zero with one line naming what is wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lockgate.server.apikeys import KeyStore
from lockgate.signing import Signer
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_operate import _cli, _next_state, _patchable, _unsubscribe

router, http, keys, signer = analysis_tests.router, analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)


def _one_line(result: Any) -> str:
    out = result.output.strip()
    assert "\n" not in out and "Traceback" not in out, out
    return out


async def test_patch_changes_only_what_it_names_and_a_bad_patch_says_what_is_wrong(
        router: Any, http: Any, signer: Signer, tmp_path: Path) -> None:
    before, operator, rec, sub = await _patchable(router, http, signer)

    done = await _cli(router, "patch", "chat", "--weight", "30", "--json", key=operator)
    assert done.exit_code == 0, done.output
    shown = json.loads(done.output)
    assert (shown["weight"], shown["canary"]["release"], shown["step"]) == (30.0, "same", before.step)
    after = router.rollouts.route("chat")
    assert (after.weight, after.canary, after.stable, after.phase, after.step, after.cursor, after.strategy,
            after.admitted, after.started_at) == (30.0, before.canary, before.stable, before.phase, before.step,
                                                  before.cursor, before.strategy, before.admitted, before.started_at)
    state = await _next_state(sub)
    assert (state.actor, state.canary_weight) == (rec.label, 30.0)
    assert state.reason.startswith(f"patched weight by {rec.label}")

    # A YAML file (one strategy field) and --weight on top of it; the table shows the route after the patch.
    patch = tmp_path / "patch.yaml"
    patch.write_text("strategy:\n  interval_s: 7200\n")
    table = await _cli(router, "patch", "chat", "-f", str(patch), "--weight", "40", key=operator)
    assert table.exit_code == 0, table.output
    assert "rollout chat" in table.output and "40%" in table.output and "patched weight, strategy" in table.output
    patched = router.rollouts.route("chat")
    assert patched.strategy is not None and before.strategy is not None
    assert (patched.weight, patched.strategy.interval_s, patched.strategy.steps, patched.canary) == (
        40.0, 7200, before.strategy.steps, before.canary)

    for args, code, why in (
            (["--patch", '{"colour": "red"}'], 4, "unknown field `colour`"),
            (["--patch", '{"weight": 150}'], 4, "Expected `float` <= 100.0 - at `$.weight`"),
            (["--patch", '{"stable_release": "r9"}'], 4, "a PATCH does not change stable_release"),
            (["--patch", "[1, 2]"], 2, "--patch: a merge patch is an object"),
            (["--patch", "{weight: [1"], 2, "--patch: not JSON or YAML"),
            ([], 2, "nothing to patch: give --weight, --canary-release, -f FILE or --patch JSON")):
        bad = await _cli(router, "patch", "chat", *args, key=operator)
        assert bad.exit_code == code and why in _one_line(bad), (args, bad.output)
    out_of_range = await _cli(router, "patch", "chat", "--weight", "150", key=operator)
    assert out_of_range.exit_code == 2 and "--weight" in out_of_range.output and "150" in out_of_range.output
    viewer, _ = KeyStore(router.ctx.settings.home).create("acme", "ops", "viewer")
    refused = await _cli(router, "patch", "chat", "--weight", "0", key=viewer)
    assert refused.exit_code == 4 and "router refused (403)" in _one_line(refused)
    assert router.rollouts.route("chat").weight == 40.0  # none of them changed anything
    await _unsubscribe(sub)  # the second patch's announcement is not read
