"""The CLI's errors as a user and a script meet them, with no stack (nothing listens on port 1): a role the permission
table does not allow a command is refused before anything is sent or changed, the same condition exits with the same
code whatever the command, and `--json` puts the error on stdout too."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from lockgate import credentials
from lockgate.cli import running
from lockgate.cli.access import covers, role_needs, subject_covers
from lockgate.cli.main import cli
from lockgate.config import Settings
from lockgate.permissions import ROLES, grant
from lockgate.subjects import Subjects

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "gitops"


def invoke(home: Path, *args: str) -> Result:
    env = {"LOCKGATE_NATS_URL": "nats://127.0.0.1:1", "LOCKGATE_HOME": str(home), "LOCKGATE_ROLE": None,
           "LOCKGATE_CLICKHOUSE_URL": None, "LOCKGATE_NATS_USER": None, "LOCKGATE_NATS_PASSWORD": None}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home with every identity's NATS credentials, as `lockgate up` leaves it."""
    credentials.ensure(tmp_path)
    return tmp_path


def test_subject_patterns_cover_as_nats_matches_them() -> None:
    assert subject_covers(">", "a.b") and subject_covers("a.>", "a.b.c") and subject_covers("a.>", "a.>")
    assert subject_covers("a.*", "a.b") and subject_covers("a.*", "a.*") and subject_covers("a.b", "a.b")
    assert not subject_covers("a.*", "a.>") and not subject_covers("a.b", "a.*") and not subject_covers("a.>", "a")
    assert not subject_covers("a.*", "a.b.c") and not subject_covers("a.b.c", "a.b") and not subject_covers("a.b", "a.c")


def test_a_cli_role_covers_what_another_needs_only_where_its_grant_holds_all_of_it() -> None:
    settings = Settings(prefix="lg")

    def may(have: str, need: str) -> bool:
        return covers(grant(Subjects("lg"), have), role_needs(settings, need)(have))

    assert all(may("admin", r) and may(r, r) and may(r, "viewer") for r in ROLES)
    assert not any(may(have, need) for have, need in (("viewer", "operator"), ("viewer", "approver"),
                                                      ("approver", "operator"), ("operator", "approver"),
                                                      ("operator", "admin")))


@pytest.mark.parametrize(("role", "args", "able"), [
    ("viewer", ("artifact", "register", "prompt", "{file}"), "operator or admin"),
    ("approver", ("artifact", "register", "prompt", "{file}"), "operator or admin"),
    ("viewer", ("release", "create", "r1", "--app", "a", "--artifact", "prompt/p=sha256:00"), "operator or admin"),
    ("viewer", ("eval", "run", "{file}", "--candidate", "r1"), "operator or admin"),
    ("operator", ("audit", "verify"), None),  # any role may read: refused by nothing but the absent stack
])
def test_a_role_that_may_not_run_a_command_is_refused_before_anything_is_sent(
        home: Path, role: str, args: tuple[str, ...], able: str | None) -> None:
    # Before: the command connected, asked JetStream for the object store as the role, waited ~6 s for an answer the
    # server never sends to a refused request, and printed nats-py's `TimeoutError` traceback. Nothing listens on
    # port 1 here: a command that got as far as connecting says that no stack answers instead.
    file = home / "f.yaml"
    file.write_text("x: 1\n")
    got = invoke(home, "--role", role, *(a.format(file=file) for a in args))
    if able is None:
        assert got.exit_code == 1 and "no lockgate stack answers" in got.stderr, got.output
        return
    command = " ".join(a for a in args[:2] if not a.startswith("{"))
    assert got.exit_code == 5, got.output
    assert got.stderr == f"error: role {role!r} may not run `lockgate {command}`: use --role {able}\n"


def test_apply_as_a_viewer_is_refused_in_one_line_with_the_exit_code_ci_reads(home: Path) -> None:
    got = invoke(home, "--role", "viewer", "apply", str(FIXTURE))
    assert got.exit_code == 1  # plan and apply: 1 on every error
    assert got.stderr == "error: role 'viewer' may not run `lockgate apply`: use --role operator or admin\n"


def test_a_credential_or_key_change_a_role_may_not_audit_is_not_made(home: Path) -> None:
    # Before: `--role viewer app-credential create` wrote the user's file, then failed to have the stack reload it
    # and to record it in the audit log: the next `up` loaded a user no audit row records. `revoke` deleted the file
    # first alike. Refused now before the file is touched.
    path = credentials.app_path(home, "t", "a")
    refused = invoke(home, "--role", "viewer", "app-credential", "create", "--tenant", "t", "--app", "a")
    assert refused.exit_code == 5, refused.output
    assert refused.stderr.startswith("error: role 'viewer' may not create or revoke application credentials") and \
        refused.stderr.endswith("use --role admin\n")
    assert not path.exists() and json.loads(invoke(home, "app-credential", "list", "--json").stdout) == []

    made = invoke(home, "app-credential", "create", "--tenant", "t", "--app", "a")  # admin, no stack: not audited
    assert made.exit_code == 0 and "not in the audit log" in made.stderr, made.output
    before = path.read_bytes()
    for args in (("revoke",), ("create", "--rotate")):
        again = invoke(home, "--role", "approver", "app-credential", *args, "--tenant", "t", "--app", "a")
        assert again.exit_code == 5 and "role 'approver' may not create or revoke application credentials" in again.stderr
        assert path.read_bytes() == before

    key = invoke(home, "--role", "viewer", "keys", "create", "--tenant", "t", "--app", "a")
    assert key.exit_code == 5 and key.stdout == "", key.output  # no key printed, none made
    assert key.stderr.startswith("error: role 'viewer' may not create, rescope or revoke API keys")
    assert json.loads(invoke(home, "keys", "list", "--json").stdout) == []


@pytest.mark.parametrize("args", [
    ("status", "--json"), ("decisions", "--json"), ("sql", "SELECT 1", "--json"), ("lineage", "r1", "--json"),
    ("gate", "explain", "r1", "--json"), ("audit", "verify", "--json"), ("plan", str(FIXTURE), "--json"),
    ("rollout", "--api-key", "lg-x", "--router", "http://127.0.0.1:1", "get", "chat", "--json"),
])
def test_without_a_stack_every_command_exits_1_and_says_why_on_stdout_too_with_json(
        tmp_path: Path, args: tuple[str, ...]) -> None:
    # Before: with no stack, `decisions` and `sql` exited 3 (their fallback found no database) where `status` and
    # `plan` exited 1; and `--json` left stdout empty, so `... --json | jq` failed on nothing.
    got = invoke(tmp_path, *args)
    assert got.exit_code == 1, got.output
    said = json.loads(got.stdout)
    assert said["exit_code"] == 1 and got.stderr == f"error: {said['error']}\n"
    assert "no lockgate stack answers" in said["error"] or "no running stack answers" in said["error"] or \
        "cannot reach the router admin API" in said["error"]
    assert not (tmp_path / "clickhouse").exists()


def test_an_error_without_json_leaves_stdout_empty(tmp_path: Path) -> None:
    got = invoke(tmp_path, "gate", "explain", "r1")
    assert got.exit_code == 1 and got.stdout == "" and got.stderr.startswith("error: no lockgate stack answers")


@pytest.mark.parametrize(("args", "said"), [
    (("rollout", "set-weight", "chat", "500", "--json"), "Invalid value for 'WEIGHT'"),
    (("rollout", "get", "--json"), "Missing argument 'DEPLOYMENT'"),
    (("--bogus", "status", "--json"), "No such option '--bogus'"),
    (("rollout", "nosuch", "--json"), "No such command 'nosuch'"),
])
def test_a_usage_error_is_one_line_and_with_json_an_error_object(home: Path, args: tuple[str, ...], said: str) -> None:
    # Before: click's usage block on stderr and nothing on stdout, so a script piping --json to jq read nothing.
    result = invoke(home, *args)
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"error": result.stderr.strip().removeprefix("error: "), "exit_code": 2}
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and said in result.stderr
    assert "--help` shows the usage" in result.stderr
    # Without --json, the same line, and stdout stays empty.
    plain = invoke(home, *(a for a in args if a != "--json"))
    assert (plain.exit_code, plain.stdout, plain.stderr) == (2, "", result.stderr)


def test_help_and_a_bare_group_are_shown_as_click_shows_them(home: Path) -> None:
    assert invoke(home, "rollout", "--help").exit_code == 0
    bare = invoke(home, "rollout")
    assert bare.exit_code == 2 and "rollout [OPTIONS] COMMAND" in bare.output


def test_status_says_a_running_stacks_bus_does_not_answer_not_that_no_stack_runs(home: Path) -> None:
    # Before (probe p4): while the supervisor restarted nats-server, `lockgate status` said "no lockgate stack answers
    # ...; start one with `lockgate up`" though the home's stack.json named the live `up` process.
    running.write(str(home), {"nats": "nats://127.0.0.1:1"})  # as `lockgate up` leaves it: this process runs it
    env = {"LOCKGATE_HOME": str(home), "LOCKGATE_NATS_URL": None, "LOCKGATE_ROLE": None,
           "LOCKGATE_NATS_USER": None, "LOCKGATE_NATS_PASSWORD": None}
    got = CliRunner().invoke(cli, ["status"], env=env, catch_exceptions=False)
    assert got.exit_code == 1, got.output
    assert got.stderr.startswith(f"error: the lockgate stack running from {home} (process {os.getpid()}) does not "
                                 "answer at nats://127.0.0.1:1 ("), got.stderr
    assert "its bus is restarting or unreachable; try again shortly" in got.stderr, got.stderr
    assert "lockgate up" not in got.stderr, got.stderr
    # A stack that no longer runs (killed with -9, its stack.json left): no stack answers, start one.
    (home / running.FILE).write_text(json.dumps({"pid": _ended_pid(), "endpoints": {"nats": "nats://127.0.0.1:1"}}))
    got = invoke(home, "status")
    assert got.exit_code == 1 and got.stderr.startswith("error: no lockgate stack answers at nats://127.0.0.1:1 ("), \
        got.stderr
    assert "`lockgate up`" in got.stderr, got.stderr


def _ended_pid() -> int:
    """The process id of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("args", [
    ("plan", str(FIXTURE), "--prun"),
    ("plan",),
    ("apply", "/etc/passwd"),
    ("plan", str(FIXTURE), "--json", "--bogus"),
    ("apply", "--json"),
])
def test_a_usage_error_of_plan_or_apply_exits_1_not_changes_planned(home: Path, args: tuple[str, ...]) -> None:
    # Before (probe p11): click's parse errors of `plan`/`apply` exited 2, which `plan` uses for "changes planned",
    # so a CI job took a mistyped option or a missing folder for changes to apply.
    result = invoke(home, *args)
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    if "--json" in args:
        assert json.loads(result.stdout)["exit_code"] == 1
