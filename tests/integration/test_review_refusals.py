"""`lockgate gate approve|reject` on a stack run as `lockgate up` runs it (NATS auth on, the CLI on the approver
role's credential): a review the gatekeeper refuses ends the command at once with the gatekeeper's reason, exit 4.

Before (probe p28 F3), the CLI followed only new decisions: the author's own approval, refused within a second
(self-approval forbidden), waited out its whole --timeout and said "no new decision ...; is the gatekeeper running?".
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from lockgate.config import Settings
from lockgate.server.runtime import Runtime
from tests.helpers import person, run_cli
from tests.integration.test_gate_flow import held_for_review

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    """The embedded runtime with its own nats-server, a user per service and role, and the gatekeeper
    (with the sink and query service it reads a baseline's run through)."""
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink", "query", "gatekeeper"])
    await runtime.start()
    yield runtime
    await runtime.stop()


async def test_a_refused_review_ends_at_once_with_the_gatekeepers_reason(stack: Runtime) -> None:
    bus, s = stack.ctx.bus, stack.settings  # the admin connection stands in for the operator and the evaluator
    ann, _ = person(s, "ann", "approver", "operator"), person(s, "bob", "approver")
    person(s, "dave", "operator")  # trusted, but not to review
    decisions = await bus.nc.subscribe(bus.subjects.gate_decided_all)
    held = await held_for_review(bus, s, decisions, "v12", {"forbid_self_approval": True}, author=ann)
    await decisions.unsubscribe()

    # The author's own approval: the gatekeeper refuses it (policy), and the command says so, not a timeout.
    # --timeout 60: before, it waited all of it and exited 1.
    own = await run_cli(stack, "--as", "ann", "gate", "approve", "v12", "--reason", "my own change", "--timeout", "60")
    assert (own.exit_code, own.stderr) == (4, "error: refused by the gatekeeper: approve by ann: my own change "
                                              "refused: ann is the author of v12, and the policy forbids "
                                              "self-approval\n"), own.output
    # A person the trust file does not make a reviewer: refused as unverified, with --json on stdout too.
    dave = await run_cli(stack, "--as", "dave", "gate", "reject", "v12", "--reason", "no", "--timeout", "60", "--json")
    assert dave.exit_code == 4, dave.output
    error = json.loads(dave.stdout)
    assert error["exit_code"] == 4 and error["error"].startswith("refused by the gatekeeper: reject claimed by "
                                                                 "'dave' refused: "), error
    assert "\n" not in error["error"] and dave.stderr == f"error: {error['error']}\n", dave.output

    # Neither changed the decision; an approval it takes is followed to its new decision, as before.
    approved = await run_cli(stack, "--as", "bob", "gate", "approve", "v12", "--reason", "read it", "--timeout", "60",
                             "--json")
    assert approved.exit_code == 0, approved.output
    new = json.loads(approved.stdout)
    assert (new["decision"], new["approvals"], new["reviewed_by"]) == ("PASS", ["bob"], "bob") and new["id"] != held.id
