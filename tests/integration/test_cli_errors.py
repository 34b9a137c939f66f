"""The CLI's errors against a running stack, as `lockgate up` runs it (embedded nats-server with its users): a role
the permission table does not allow a command, a request the server refuses a user the CLI cannot check, a router URL
that is not the router, a credential change whose audit row fails, and `--json` errors a script reads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import pytest
from click.testing import CliRunner, Result

from lockgate import credentials
from lockgate.cli.main import cli
from lockgate.config import Settings
from lockgate.server.runtime import Runtime

pytestmark = pytest.mark.timeout(90)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURE = FIXTURES / "gitops"


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink", "gatekeeper"])
    await runtime.start()
    yield runtime
    await runtime.stop()


async def lockgate(runtime: Runtime, *args: str, **env: str | None) -> Result:
    """The CLI as a user runs it against the stack (in a thread: the stack answers on this loop)."""
    s = runtime.settings
    base = {"LOCKGATE_HOME": s.home, "LOCKGATE_NATS_URL": s.nats_url, "LOCKGATE_PREFIX": s.prefix,
            "LOCKGATE_ROLE": None, "LOCKGATE_NATS_USER": None, "LOCKGATE_NATS_PASSWORD": None,
            "LOCKGATE_TRUST_FILE": None}
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), env={**base, **env}, catch_exceptions=False)


def one_line(result: Result) -> str:
    assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1, result.output
    return result.stderr


async def test_a_role_or_user_that_may_not_register_is_told_so_in_one_line(stack: Runtime, tmp_path: Path) -> None:
    # Before: `--role viewer artifact register` (and release create, apply, and as approver) waited ~6 s for an answer
    # to a JetStream request the server refused, then printed nats-py's `TimeoutError: nats: timeout` traceback.
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    for role in ("viewer", "approver"):
        refused = await lockgate(stack, "--role", role, "artifact", "register", "prompt", str(prompt))
        assert refused.exit_code == 5 and one_line(refused) == (
            f"error: role {role!r} may not run `lockgate artifact register`: use --role operator or admin\n")
    release = await lockgate(stack, "--role", "viewer", "release", "create", "r1", "--app", "a", "--artifact",
                             "prompt/p=sha256:00")
    assert release.exit_code == 5 and "role 'viewer' may not run `lockgate release create`" in one_line(release)
    applied = await lockgate(stack, "--role", "viewer", "apply", str(FIXTURE))
    assert applied.exit_code == 1 and "role 'viewer' may not run `lockgate apply`" in one_line(applied)

    # A user the CLI cannot check against its roles (here a service's, given as LOCKGATE_NATS_USER): the server
    # refuses its request, and the CLI says whose and which subject, once nothing answered it.
    cost = credentials.for_identity(stack.settings, "cost")
    denied = await lockgate(stack, "artifact", "register", "prompt", str(prompt), "--json",
                            LOCKGATE_NATS_USER=cost.user, LOCKGATE_NATS_PASSWORD=cost.password)
    assert denied.exit_code == 5, denied.output
    said = one_line(denied)
    # Its first request, the store's look-up by message get, is refused at once (Bus.holds, probe p82 F1).
    assert said.startswith("error: 'cost' may not publish to $JS.API.STREAM.MSG.GET.OBJ_") and \
        "(NATS permissions violation)" in said
    assert json.loads(denied.stdout) == {"error": said.removeprefix("error: ").rstrip("\n"), "exit_code": 5}

    # The operator may: the same file registers.
    made = await lockgate(stack, "--role", "operator", "artifact", "register", "prompt", str(prompt), "--json")
    assert made.exit_code == 0 and json.loads(made.stdout)[0]["name"] == "p", made.output


async def test_a_router_url_that_is_not_the_router_is_one_line(stack: Runtime) -> None:
    # Before: a router URL naming a NATS port (anything not HTTP) raised http.client.BadStatusLine as a traceback.
    url = "http://" + stack.settings.nats_url.removeprefix("nats://")
    for args in (("get", "chat"), ("watch", "chat", "--json"), ("pause", "chat")):
        got = await lockgate(stack, "rollout", "--api-key", "lg-x", *args, LOCKGATE_ROUTER_URL=url)
        said = (f"something other than the router admin API answers at {url} (not HTTP JSON); pass --router URL "
                "(as `lockgate up` printed it) or set LOCKGATE_ROUTER_URL")
        assert got.exit_code == 1 and one_line(got) == f"error: {said}\n", got.output
        assert got.stdout == (json.dumps({"error": said, "exit_code": 1}) + "\n" if "--json" in args else "")


async def test_a_credential_grant_whose_audit_row_fails_is_undone_and_a_revocation_stays(stack: Runtime) -> None:
    # Before: the credential file was written (or deleted) first, then the stack reloaded it, then the audit row was
    # recorded: when the row failed the command failed, but the user stayed, applied, and no audit row said so.
    made = await lockgate(stack, "app-credential", "create", "--tenant", "acme", "--app", "shop", "--json")
    assert made.exit_code == 0 and json.loads(made.stdout)["applied"] is True, made.output
    path = credentials.app_path(stack.settings.home, "acme", "shop")
    before = await asyncio.to_thread(path.read_bytes)
    secret = json.loads(before)

    # The audit log's stream gone: every audit row fails from here on.
    bus = stack.ctx.bus
    await bus.js.delete_stream(bus.subjects.streams["audit"].name)
    other = await lockgate(stack, "app-credential", "create", "--tenant", "acme", "--app", "other")
    assert other.exit_code == 1 and not credentials.app_path(stack.settings.home, "acme", "other").exists()
    assert one_line(other).endswith("; the credential of acme/other was left as it was "
                                    f"({credentials.app_path(stack.settings.home, 'acme', 'other')}): nothing changed\n")
    # A rotation takes a possibly leaked password away: it stays in force, the old password refused (before, probe
    # p77 F2, it was undone and the old password served again).
    rotated = await lockgate(stack, "app-credential", "create", "--tenant", "acme", "--app", "shop", "--rotate")
    assert rotated.exit_code == 1 and await asyncio.to_thread(path.read_bytes) != before, rotated.output
    assert one_line(rotated).endswith("; the rotation of the credential of acme/shop is in force (the running stack "
                                      "applied it) but not in the audit log\n")
    with pytest.raises(nats.errors.Error):
        await nats.connect(stack.settings.nats_url, user=secret["user"], password=secret["password"],
                           allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5, error_cb=_quiet)
    revoked = await lockgate(stack, "app-credential", "revoke", "--tenant", "acme", "--app", "shop")
    assert revoked.exit_code == 1 and not path.exists(), revoked.output
    listed = await lockgate(stack, "app-credential", "list", "--json")
    assert json.loads(listed.stdout) == []


async def _quiet(exc: Exception) -> None:
    """A refused connection is the answer sought (nats-py would log its traceback)."""


async def test_json_errors_and_exit_codes_a_script_reads(stack: Runtime, tmp_path: Path) -> None:
    # Before: every failing `--json` command left stdout empty: `... --json | jq` reported a parse error, not why.
    missing = await lockgate(stack, "gate", "explain", "nope", "--json")
    assert missing.exit_code == 3 and json.loads(missing.stdout) == {
        "error": one_line(missing).removeprefix("error: ").rstrip("\n"), "exit_code": 3}
    # Credentials the stack refuses (a home without them): 5 from every command, but plan's 1 (CI reads 2 there).
    stranger = {"LOCKGATE_HOME": str(tmp_path / "elsewhere")}  # tmp_path is the stack's home
    for args in (("status", "--json"), ("decisions", "--json"), ("gate", "explain", "nope", "--json")):
        refused = await lockgate(stack, *args, **stranger)
        assert refused.exit_code == 5 and json.loads(refused.stdout)["exit_code"] == 5, (args, refused.output)
        assert "refused" in one_line(refused)
    planned = await lockgate(stack, "plan", str(FIXTURE), "--json", **stranger)
    assert planned.exit_code == 1 and json.loads(planned.stdout)["exit_code"] == 1, planned.output


async def test_eval_run_as_the_operator_refuses_an_endpoint_other_than_the_release_ships(stack: Runtime,
                                                                                         tmp_path: Path) -> None:
    # Before (probe p10, F11): the check read the release's model config through an object store consumer, which the
    # operator role may not create; it timed out, took that as "nothing to check", and requested the run: a
    # mistyped --endpoint became a failed eval and a signed BLOCK of the (serving) release.
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": "good", "endpoint": "default"}))
    made = await lockgate(stack, "--role", "operator", "artifact", "register", "model_config", str(config), "--json")
    assert made.exit_code == 0, made.output
    digest = json.loads(made.stdout)[0]["hash"]
    bound = await lockgate(stack, "--role", "operator", "release", "create", "r1", "--app", "a", "--artifact",
                           f"model_config/config={digest}")
    assert bound.exit_code == 0, bound.output
    wrong = await lockgate(stack, "--role", "operator", "eval", "run", str(FIXTURES / "suites" / "qa.yaml"),
                           "--candidate", "r1", "--endpoint", "http://127.0.0.1:1/v1", "--policy",
                           str(FIXTURES / "policies" / "default.yaml"), "--timeout", "20")
    assert wrong.exit_code == 2, wrong.output
    assert one_line(wrong) == (f"error: release 'r1' ships model 'good' at endpoint 'default' ({digest}), but the eval "
                               "asks for endpoint 'http://127.0.0.1:1/v1': the gate judges what ships; omit the "
                               "endpoint or give 'default'\n")
