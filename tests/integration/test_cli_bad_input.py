"""Bad input to the CLI ends in one line and exit 2 (with --json an error object), refused before anything is read,
sent or printed (probe p70): non-finite and out-of-range numbers, URLs urllib cannot open, names no event carries,
usage errors raised in a command's body, an unwritable --out, and an unreachable ClickHouse said in one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from lockgate.cli.main import cli

pytestmark = pytest.mark.timeout(60)

LOCKGATE = [sys.executable, "-m", "lockgate.cli.__main__"]


def lockgate(home: Path, *args: str) -> Result:
    env = {"LOCKGATE_HOME": str(home), "LOCKGATE_NATS_URL": "nats://127.0.0.1:1", "LOCKGATE_ROLE": None,
           "LOCKGATE_TRUST_FILE": None, "LOCKGATE_CLICKHOUSE_URL": None}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False, prog_name="lockgate")


def refused(result: Result) -> str:
    """The one line a refused command printed, having checked it exited 2 with no traceback."""
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, (result.exit_code, result.output)
    return result.stderr


BAD_NUMBERS = [
    # Before: `nan` passed click's FloatRange (every comparison with it is false) and `inf`/1e300 where unbounded.
    (["scores", "shop-web", "--since", "nan", "--json"], "'--since': 'nan' is not a finite number"),  # ValueError
    (["scores", "shop-web", "--since", "inf"], "'--since'"),
    (["scores", "shop-web", "--since", "1e300"], "'--since'"),  # OverflowError
    (["rollout", "set-weight", "shop-web", "nan", "--json"], "'WEIGHT': 'nan' is not a finite number"),  # router 400
    (["rollout", "start", "d", "--stable", "a", "--canary", "b", "--initial-weight", "nan"], "'--initial-weight'"),
    (["rollout", "start", "d", "--stable", "a", "--interval-s", "nan"], "'--interval-s'"),
    (["rollout", "start", "d", "--stable", "a", "--interval-s", "inf"], "'--interval-s'"),
    (["rollout", "patch", "d", "--weight", "nan"], "'--weight'"),
    (["rollout", "approve", "d", "--started-at", "nan"], "'--started-at'"),
    (["rollout", "watch", "d", "--timeout", "nan"], "'--timeout'"),  # waited, then "nothing read in nan s"
    (["eval", "rerun", "run-1", "--timeout", "nan"], "'--timeout'"),  # accepted
    (["eval", "rerun", "run-1", "--timeout", "-1"], "'--timeout'"),  # blamed the evaluator, exit 1
    (["gate", "approve", "r1", "--reason", "x", "--timeout", "inf"], "'--timeout'"),
    (["break-glass", "d", "r", "--action", "canary", "--reason", "x", "--weight", "nan"], "'--weight'"),
]


@pytest.mark.parametrize(("args", "said"), BAD_NUMBERS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_number_that_is_not_finite_or_in_range_is_a_usage_error(tmp_path: Path, args: list[str], said: str) -> None:
    result = lockgate(tmp_path, *args)
    assert said in refused(result) and f"`lockgate {args[0]}" in result.stderr
    if "--json" in args:
        assert json.loads(result.stdout)["exit_code"] == 2


@pytest.mark.parametrize("url", ["notaurl", "http://[::1", "ftp://host/x", "http://host:99999/x"])
def test_lineage_export_refuses_a_url_it_cannot_post_to_before_printing(tmp_path: Path, url: str) -> None:
    # Before: every event was printed, then `ValueError: unknown url type` (or `Invalid IPv6 URL`) as a traceback.
    result = lockgate(tmp_path, "lineage", "export", "--url", url, "--limit", "1")
    assert "Invalid value for '--url'" in refused(result) and result.stdout == ""


def test_schema_out_in_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    # Before: FileNotFoundError with a traceback (while --out naming a directory was click's one-line usage error).
    result = lockgate(tmp_path, "schema", "--out", str(tmp_path / "no" / "dir" / "x.json"))
    assert "Invalid value for '--out': cannot write" in refused(result)
    assert "No such file or directory" in result.stderr


def test_usage_errors_of_gate_commands_exit_2(tmp_path: Path) -> None:
    # Before: each exited 1 (the code of a failure, not of a command line given wrong).
    key = tmp_path / "k.pem"
    key.write_text("not read: the options are checked first")
    for args, said in ((["gate", "revoke"], "give exactly one of KEY_ID or --person NAME"),
                       (["gate", "revoke", "K", "--person", "p"], "give exactly one of KEY_ID or --person NAME"),
                       (["gate", "verify"], "give exactly one of RELEASE or --file"),
                       (["gate", "verify", "--json"], "give exactly one of RELEASE or --file"),
                       (["gate", "trust", str(key), "--person", "x"], "--person needs at least one --role"),
                       (["gate", "trust", str(key), "--role", "admin"], "--role applies to a person")):
        result = lockgate(tmp_path, *args)
        assert said in refused(result) and f"`lockgate {' '.join(args[:2])} --help`" in result.stderr, args
        if "--json" in args:
            assert json.loads(result.stdout) == {"error": result.stderr.removeprefix("error: ").strip(),
                                                 "exit_code": 2}


def test_a_usage_error_click_gives_no_command_names_the_commands_help(tmp_path: Path) -> None:
    # Before: "(`lockgate --help` shows the usage)" for an option given too few values.
    result = lockgate(tmp_path, "nats-config", "--app", "t")
    assert refused(result) == ("error: Option '--app' requires 2 arguments. (`lockgate nats-config --help` shows "
                               "the usage)\n")
    assert "`lockgate rollout start --help`" in refused(lockgate(tmp_path, "rollout", "start", "d", "--interval-s"))


@pytest.mark.parametrize(("args", "said"), [
    (["drift", "--deployment", "x y", "--json"], "invalid deployment 'x y'"),
    (["drift", "--tenant", "bad tenant"], "invalid tenant 'bad tenant'"),
    (["scores", "bad dep!"], "invalid deployment 'bad dep!'"),
    (["scores", "d", "--tenant", "bad tenant"], "invalid tenant 'bad tenant'"),
    (["scores", "d", "--event", "x y", "--json"], "'x y' is not an event id"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_name_no_event_carries_is_refused_as_rollout_get_refuses_it(tmp_path: Path, args: list[str],
                                                                       said: str) -> None:
    # Before: an empty listing and exit 0 (after a query), where `rollout get 'bad dep!'` exits 2.
    result = lockgate(tmp_path, *args)
    assert said in refused(result)
    if "--json" in args:
        assert json.loads(result.stdout)["exit_code"] == 2


def test_an_unreachable_clickhouse_is_one_line_without_library_warnings(tmp_path: Path) -> None:
    # Before: two timestamped WARNINGs (urllib3's retry, clickhouse-connect's driver) and urllib3's whole
    # HTTPConnectionPool text in the error. A subprocess: the CLI configures logging as a user's run does.
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LOCKGATE_HOME": str(tmp_path)}
    proc = subprocess.run([*LOCKGATE, "--clickhouse", url, "sql", "SELECT 1"], capture_output=True, text=True,
                          env=env, timeout=50)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr == f"error: cannot reach ClickHouse at {url}: connection refused\n"
    verbose = subprocess.run([*LOCKGATE, "-v", "--clickhouse", url, "sql", "SELECT 1"], capture_output=True,
                             text=True, env=env, timeout=50)
    assert "WARNING" in verbose.stderr  # -v still shows them
