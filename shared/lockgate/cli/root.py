"""The `lockgate` root command: its global options, and how every command ends on an error (one line, an exit
code), which the command modules share."""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import click
import nats.errors
from rich.text import Text

from lockgate.cli import access, running
from lockgate.cli.render import err_console, shown
from lockgate.config import from_env
from lockgate.errors import LockgateError
from lockgate.permissions import ROLES


def handle_errors(func: Callable[..., Any], *, exit_code: int | None = None) -> Callable[..., Any]:
    """A user sees one line and an exit code, never a traceback: the error's own code (the table under "Exit codes"
    in README.md), or `exit_code` for every error (commands whose codes CI reads, where 2 already means "changes
    planned"). With --json the error is on stdout too, as `{"error": ..., "exit_code": N}`: a script that pipes it to
    a JSON reader reads why, not a parse error of nothing."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LockgateError as exc:
            fail(exc.message, exc.exit_code if exit_code is None else exit_code, as_json=kwargs.get("as_json", False))
        except nats.errors.Error as exc:  # a NATS error no command turned into its own (with_bus names most)
            role = access.chosen_role("")
            who = f"role {role!r}" if role else "its default role"
            fail(f"NATS answered `{access.command()}` ({who}) with an error: {exc or exc.__class__.__name__}",
                 1 if exit_code is None else exit_code, as_json=kwargs.get("as_json", False))
        except KeyboardInterrupt:
            sys.exit(130)

    # click's usage errors are raised before the body runs, outside this wrapper: `_usage_failed` reads the code
    # here (functools.update_wrapper, as click.pass_context uses it, carries it to the command's callback).
    wrapper.lockgate_exit_code = exit_code  # type: ignore[attr-defined]
    return wrapper


def fail(message: str, code: int, *, as_json: bool = False) -> NoReturn:
    """End the command: one line on stderr (and with `as_json` the same on stdout, as JSON), then exit `code`."""
    if as_json:
        sys.stdout.write(json.dumps({"error": message, "exit_code": code}) + "\n")
    err_console.print(Text.assemble(("error:", "red"), " ", shown(message)), highlight=False, soft_wrap=True)
    sys.exit(code)


_JSON = "lockgate.json"  # ctx.meta: the command line asked for --json
_ARGS = "lockgate.args"  # ctx.meta: the arguments after the root's own options


class _Root(click.Group):
    """The root group: click's usage errors (an unknown option, a value out of range, a missing argument) end as every
    other error does, in one line and exit 2, with --json on stdout too (`fail`). Before, click printed its usage block
    on stderr and nothing on stdout: a script piping --json to a JSON reader read a parse error of nothing."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            _usage_failed(exc, "--json" in args)
        ctx.meta[_JSON] = "--json" in args
        ctx.meta[_ARGS] = [*ctx._protected_args, *ctx.args]  # invoke consumes them before a subcommand parses
        return ctx

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # a subcommand's usage error is raised in here, as its arguments are parsed
        except click.UsageError as exc:
            if exc.ctx is None:  # click's parser names no command for some errors (an option given too few values)
                exc.ctx = _innermost(ctx)
            _usage_failed(exc, ctx.meta.get(_JSON, False))


def _innermost(ctx: click.Context) -> click.Context:
    """The context of the (sub)command the command line names, without parsing its arguments: its usage error is
    then said with `lockgate CMD --help`, as every other, not `lockgate --help` (probe p70 F9)."""
    args = list(ctx.meta.get(_ARGS, []))
    while isinstance(ctx.command, click.Group) and args:
        try:
            name, cmd, args = ctx.command.resolve_command(ctx, args)
        except click.UsageError:
            break
        if cmd is None or name is None:
            break
        ctx = click.Context(cmd, info_name=name, parent=ctx)
    return ctx


def _usage_failed(exc: click.UsageError, as_json: bool) -> NoReturn:
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):  # a group called bare: its help, as click shows it
        raise exc
    path = exc.ctx.command_path if exc.ctx is not None else "lockgate"
    # A command whose every error has one code (`plan`/`apply`: 2 means "changes planned" to CI) keeps it for a
    # mistyped option or a missing argument too; before, those exited 2 and CI read them as changes to apply.
    callback = exc.ctx.command.callback if exc.ctx is not None else None
    code = getattr(callback, "lockgate_exit_code", None)
    fail(f"{exc.format_message()} (`{path} --help` shows the usage)", 2 if code is None else code, as_json=as_json)


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--nats", "nats_url", envvar="LOCKGATE_NATS_URL", help="NATS URL of the stack.")
@click.option("--clickhouse", "clickhouse_url", envvar="LOCKGATE_CLICKHOUSE_URL",
              help="ClickHouse URL: chdb://PATH or http(s)://host:8123. Given to a query command, "
                   "it reads ClickHouse directly instead of asking the running stack.")
@click.option("--prefix", envvar="LOCKGATE_PREFIX", help="Subject prefix (default lg).")
@click.option("--database", envvar="LOCKGATE_DATABASE", help="ClickHouse database (default lockgate).")
@click.option("--home", envvar="LOCKGATE_HOME",
              help="The stack's home (default ./.lockgate): `lockgate up --home DIR` keeps the NATS "
                   "credentials in DIR/credentials, where the CLI finds them.")
@click.option("--role", type=click.Choice(ROLES), envvar="LOCKGATE_ROLE",
              help="The NATS identity the CLI uses: viewer (queries, status), operator (register, eval), "
                   "approver (gate approve/reject), admin. Default: the least each command needs.")
@click.option("--as", "identity", envvar="LOCKGATE_IDENTITY", metavar="NAME",
              help="The personal identity that signs reviews, break-glass overrides and releases you author "
                   "(`lockgate identity create NAME`). Default: the only one under the home.")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO.")
@click.version_option(package_name="lockgate", prog_name="lockgate")
@click.pass_context
def cli(ctx: click.Context, nats_url: str | None, clickhouse_url: str | None, prefix: str | None,
        database: str | None, home: str | None, role: str | None, identity: str | None, verbose: bool) -> None:
    """lockgate: CI/CD and runtime governance for language-model applications."""
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a timeout, a cancelled CI job, a service stop) and SIGHUP end a command as Ctrl-C does, through
        # its cleanup: a change made and not yet in the audit log is undone. Before, they killed it between the
        # file and its audit row, and the change stayed in force with no row (probe p6). A server command's own
        # loop handlers (`up`, `serve`) take SIGTERM over once it runs.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupted)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        # Their warnings repeat, timestamped, the error the command then says in its one line (an unreachable
        # ClickHouse: urllib3's retries, clickhouse-connect's "Unexpected Http Driver Exception"); -v shows them.
        # urllib3's pool logger by name: clickhouse-connect sets the `urllib3` logger's own level when imported.
        for noisy in ("urllib3.connectionpool", "clickhouse_connect"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        settings = from_env().replace(nats_url=nats_url, clickhouse_url=clickhouse_url, prefix=prefix,
                                      database=database, home=home)
    except LockgateError as exc:
        err_console.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    if nats_url is None:  # neither --nats nor LOCKGATE_NATS_URL: the stack running from the home, if one does
        found = running.endpoints(settings.home).get("nats")
        settings = settings.replace(nats_url=found) if found else settings
    # Only an explicit --clickhouse means "read ClickHouse yourself"; the environment variable just
    # configures where the stack's ClickHouse lives.
    explicit = ctx.get_parameter_source("clickhouse_url") == click.core.ParameterSource.COMMANDLINE
    ctx.obj = {"settings": settings, "direct": explicit, "role": role, "identity": identity}


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
