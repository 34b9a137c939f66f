"""Options every command shares are checked before anything runs (click's own parsing, no stack needed)."""

from __future__ import annotations

from collections.abc import Iterator

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
