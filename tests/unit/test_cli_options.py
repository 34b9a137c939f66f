"""The CLI without a stack: options are checked before anything runs, and a command that needs the bus says at
once that nothing answers (it used to wait for a server for ever)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from lockgate.cli.main import cli


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


LIMITED = [(path, cmd) for path, cmd in _commands(cli) if any(p.name == "limit" for p in cmd.params)]


def test_the_commands_that_list_take_a_limit() -> None:
    assert {" ".join(p) for p, _ in LIMITED} >= {"decisions", "traces", "audit log", "dlq", "lineage export"}


@pytest.mark.parametrize(("path", "command"), LIMITED, ids=[" ".join(p) for p, _ in LIMITED])
@pytest.mark.parametrize("limit", ["0", "-1"])
def test_a_limit_below_one_is_refused_saying_so(path: tuple[str, ...], command: click.Command, limit: str) -> None:
    arguments = ["x" for p in command.params if isinstance(p, click.Argument) and p.required]
    # Nothing listens on port 1: had the limit been accepted, the command would fail to connect instead.
    got = CliRunner().invoke(cli, [*path, *arguments, "--limit", limit], env={"LOCKGATE_NATS_URL": "nats://127.0.0.1:1"})
    assert got.exit_code == 2 and f"Invalid value for '--limit': {limit} is not in the range x>=1" in got.output, got.output


@pytest.mark.timeout(30)  # it waited for a server for ever
@pytest.mark.parametrize("command", [["status"], ["audit", "verify"], ["budget", "list"]])
def test_a_command_that_needs_the_bus_says_at_once_when_nothing_answers(command: list[str], tmp_path: Path) -> None:
    got = CliRunner().invoke(cli, command, env={"LOCKGATE_NATS_URL": "nats://127.0.0.1:1", "LOCKGATE_HOME": str(tmp_path)})
    assert got.exit_code == 1, got.output
    assert "no lockgate stack answers at nats://127.0.0.1:1" in got.output and "`lockgate up`" in got.output, got.output


@pytest.mark.parametrize(("flag", "value"), [("--tenant", "a b"), ("--app", "*"), ("--tenant", "")])
def test_a_key_for_a_name_no_event_may_carry_is_refused(flag: str, value: str, tmp_path: Path) -> None:
    # Before: `keys create --tenant 'a b'` made a key whose every event the sink then refused (dead letters).
    names = {"--tenant": "acme", "--app": "shop", flag: value}
    got = CliRunner().invoke(cli, ["keys", "--home", str(tmp_path), "create", *(x for kv in names.items() for x in kv)])
    assert got.exit_code == 2 and f"invalid {flag[2:]} {value!r} for an API key" in got.output, got.output
    assert not (tmp_path / "apikeys.json").exists()


def test_the_drift_table_names_each_tests_bound_for_what_it_is() -> None:
    from lockgate.cli.main import _drift_test

    # Before: `z p=1 (<0.05)`, read as "p=1, which is < 0.05".
    assert _drift_test({"test": "z", "p_value": 1.0, "threshold": 0.05}) == "z p=1 (alpha 0.05)"
    assert _drift_test({"test": "wasserstein", "statistic": 0.4, "threshold": 0.1}) == \
        "wasserstein 0.4 (drift at >= 0.1)"


def test_version_prints_the_installed_package_version() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output == f"lockgate, version {version('lockgate')}\n"
