"""Commands that run things: `up`, `serve`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import click

from lockgate import credentials
from lockgate.cli import access, running
from lockgate.cli.render import console, err_console
from lockgate.cli.root import fail, handle_errors
from lockgate.config import Settings
from lockgate.errors import ConfigError, PortInUse
from lockgate.permissions import ROLES
from lockgate.redact import shown_url

if TYPE_CHECKING:
    from lockgate.server.runtime import Runtime


class _Stop(asyncio.Event):
    """Set by SIGINT or SIGTERM; `signum` is the first of them that came."""

    signum = 0


def _stop_on_signals() -> _Stop:
    """An event set by SIGINT or SIGTERM, which from now on no longer end the process at once."""
    stop = _Stop()
    loop = asyncio.get_running_loop()

    def received(sig: int) -> None:
        stop.signum = stop.signum or sig
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, received, sig)
    return stop


# A start that takes longer says on stderr what it waits for: a service retries NATS for ever at start (a
# distributed start order), so an unreachable NATS looked like a hung process.
QUIET_START_S = 2.0


async def _start_unless_stopped(runtime: Runtime, stop: _Stop) -> str | None:
    """Start `runtime`: None once started, or, if a signal came first, what the start still waited for (the start is
    cancelled and closes what it opened). Before (probe p11), `serve` whose NATS never answered waited for ever,
    silently, and SIGINT and SIGTERM only set an event nobody looked at until the start was done."""
    starting, signalled = asyncio.ensure_future(runtime.start()), asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({starting, signalled}, timeout=QUIET_START_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            if _connecting(runtime):
                err_console.print(f"waiting for NATS at {shown_url(runtime.settings.nats_url)} (retrying; SIGTERM "
                                  "or Ctrl-C stops it)", highlight=False, soft_wrap=True)
            await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
    if starting.done():
        starting.result()  # a start that failed raises its error here
        return None
    waited = (f"NATS at {shown_url(runtime.settings.nats_url)} had not answered" if _connecting(runtime)
              else "its services were starting")
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    return waited


def _connecting(runtime: Runtime) -> bool:
    """Whether the runtime's start has a NATS connection still to make: a bus is listed before it connects, and has
    its client once it did."""
    return not runtime.buses or any(bus.nc is None for bus in runtime.buses)


async def _until_signalled() -> None:
    await _stop_on_signals().wait()


async def _until_stopped(stop: asyncio.Event, runtime: Runtime) -> None:
    """Until SIGINT or SIGTERM (`stop`); raises BusClosed first if NATS closed one of the runtime's connections for
    good (`Runtime.failed`): the caller stops the runtime and the command exits non-zero, for a supervisor to start
    it again."""
    signalled, failed = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(runtime.failed())
    done, pending = await asyncio.wait({signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    if failed in done:
        console.print("stopping: a NATS connection closed for good; flushing buffers and closing consumers ...")
        raise failed.result()


def _print_endpoints(endpoints: dict[str, str], notes: dict[str, str] | None = None) -> None:
    for name, url in endpoints.items():
        note = f"  ({notes[name]})" if notes and name in notes else ""
        console.print(f"  [bold]{name:<11}[/bold] {shown_url(url)}{note}", highlight=False)


async def serve_stack(settings: Settings, *, extra: dict[str, str] | None = None, notes: dict[str, str] | None = None,
                      on_ready: Callable[[Runtime], Awaitable[None]] | None = None) -> None:
    """Run the embedded stack until signalled; `on_ready` runs once it is up (the dev demo uses it). `extra`: more
    addresses to print and record in stack.json (addresses only: scripts read them), `notes` what to print beside
    some of them."""
    from lockgate.server.apikeys import bootstrap
    from lockgate.server.runtime import Runtime

    runtime = Runtime(settings)
    try:
        # The router and the gRPC gateway take only API keys: the first ones are made before they start, so none of
        # them starts on an empty key store (it would say it is not ready, and log that every key is refused).
        keys = bootstrap(settings.home, app=settings.app, keys_file=settings.api_keys_file)
        await runtime.start()
        console.print("[bold green]lockgate is up[/bold green] (embedded: nats-server + chDB + all services)")
        _print_endpoints(runtime.endpoints | (extra or {}), notes or {})
        home = runtime.settings.home  # absolute (embedded_settings)
        running.write(home, runtime.endpoints | (extra or {}))  # for the CLI: `lockgate --home HOME ...` finds it
        console.print(f"  [bold]{'credentials':<11}[/bold] {credentials.directory(home)}  (NATS users, 0600: the "
                      f"CLI finds them with --home {home} or LOCKGATE_HOME; roles "
                      f"{', '.join(ROLES)}; an SDK app uses its own, `lockgate app-credential create --tenant T --app A`, "
                      "or the shared app.json, trusted with every tenant)", soft_wrap=True)
        # Where the first API keys are (files 0600; the keys themselves are never printed or logged).
        # A key file holds the key alone, so what the banner says to send works as written.
        if keys.admin_key:
            console.print(f"  [bold]{'admin key':<11}[/bold] {keys.admin_file}  (role admin: router admin API, "
                          "`lockgate keys`; the file holds the key alone)")
        if keys.app_key:
            console.print(f"  [bold]{'app key':<11}[/bold] {keys.app_file}  (the key alone: send "
                          f"`Authorization: Bearer $(cat {keys.app_file})`)", soft_wrap=True)
        for said in keys.withheld:  # a key an operator revoked is not made again behind their back
            console.print(f"  [bold]{'revoked':<11}[/bold] {said}", highlight=False, soft_wrap=True)
        _print_people(runtime.settings)
        if on_ready is not None:
            await on_ready(runtime)
        console.print("[dim]Ctrl-C stops the stack; queued events are flushed first.[/dim]")
        await _until_stopped(_stop_on_signals(), runtime)
        console.print("stopping: flushing buffers and closing consumers ...")
    finally:
        running.remove(runtime.settings.home)
        await runtime.stop()
    console.print("stopped cleanly.")


def _print_people(settings: Settings) -> None:
    """Who may review and break glass: people are trusted explicitly, never made by `up`."""
    from lockgate.signing import read_trust_file, trust_file_path

    path = trust_file_path(settings)
    people = read_trust_file(path).people
    who = ", ".join(f"{n} ({'/'.join(p.roles)}{'; tenant ' + ','.join(p.tenants) if p.tenants else ''})"
                    for n, p in sorted(people.items())) or \
        "none yet: `lockgate identity create NAME`, then `lockgate gate trust --person NAME --role approver ...`"
    console.print(f"  [bold]{'people':<11}[/bold] {who}  (sign reviews and break-glass; trust file {path})",
                  soft_wrap=True)


def embedded_settings(settings: Settings, home: str | None, nats_port: int, router_port: int,
                      grpc_port: int, otlp_grpc_port: int | None = None, otlp_http_port: int | None = None) -> Settings:
    """Settings for `up`: ClickHouse beside JetStream's data under `home` (else the global --home or
    LOCKGATE_HOME) unless configured; every listener on 127.0.0.1 unless LOCKGATE_HOST says otherwise."""
    settings = settings.replace(home=str(Path(home or settings.home).resolve()))
    # not configured: beside JetStream's data, where the CLI's queries look for it (access.store_url)
    return settings.replace(clickhouse_url=access.store_url(settings), nats_url=f"nats://127.0.0.1:{nats_port}",
                            router_port=router_port, grpc_port=grpc_port, otlp_grpc_port=otlp_grpc_port,
                            otlp_http_port=otlp_http_port)


def refuse_to_start(settings: Settings, sim_port: int | None = None,
                    advice: Callable[[str], str] = lambda options: "") -> None:
    """Before `up` (or `dev up`, with its simulator's port) opens anything: ConfigError if the retention setting is
    refused, if a stack already runs from its home, or if a port it is told to use is taken. Else a second stack from one home failed on chDB's lock
    in ClickHouse's words after starting nats-server on the first one's store, and a taken port was found only after
    nats-server, chDB and the services before its listener had started (each listener's bind still says it too).
    `advice` adds to a refusal the form the options that start it take (`dev up` under `make run`: in its ARGS)."""
    from lockgate.server.tls import check_free
    from lockgate.store.retention import parse_retention

    # A retention the store owner would refuse at start (its TTLs, against how old an accepted event may be).
    parse_retention(settings.retention_days, settings.event_time_past_s)
    pid = running.owner(settings.home)
    if pid is not None:
        raise ConfigError(f"a stack is already running from {settings.home} (pid {pid}): stop it first, or give "
                          f"another --home{advice('--home DIR')}")
    nats = urlparse(settings.nats_url)
    ports = [(nats.hostname or settings.host, nats.port or 0, "NATS", "--nats-port"),
             (settings.host, settings.router_port, "router", "--router-port"),
             (settings.host, settings.grpc_port, "gRPC", "--grpc-port"),
             (settings.host, settings.otlp_grpc_port, "OTLP/gRPC", "--otlp-grpc-port"),
             (settings.host, settings.otlp_http_port, "OTLP/HTTP", "--otlp-http-port")]
    if sim_port is not None:
        ports.append((settings.host, sim_port, "simulator", "--sim-port"))
    # Every taken port in one refusal, with the one command that starts beside the other stack (named one at a
    # time, each retry found the next: six tries beside a default stack, probe p30).
    taken: list[PortInUse] = []
    for host, port, what, flag in ports:
        try:
            check_free(host, port, what=what, flag=flag)
        except PortInUse as exc:
            taken.append(exc)
    if taken:
        options = " ".join(f"{t.flag} 0" for t in taken)
        if len(taken) == 1:
            taken[0].message += advice(options)
            raise taken[0]
        raise ConfigError(f"{', '.join(f'{t.what} port {t.port}' for t in taken)} are in use (another lockgate "
                          f"stack?): choose others, or 0 for free ones: {options}{advice(options)}")


_PORT_HELP = "0 picks a free port; the endpoints printed at start show the real one."
PORT = click.IntRange(0, 65535)  # an option's port: out of range is a usage error, not an OverflowError at bind


def up_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options `up` and `dev up` share."""
    for option in reversed((
        click.option("--home", default=None,
                     help="Where JetStream, chDB and the NATS credentials live (default: the global --home, "
                          "LOCKGATE_HOME, or ./.lockgate)."),
        click.option("--nats-port", type=PORT, default=4222, show_default=True, help=_PORT_HELP),
        click.option("--router-port", type=PORT, default=8080, show_default=True, help=_PORT_HELP),
        click.option("--grpc-port", type=PORT, default=50051, show_default=True, help=_PORT_HELP),
        click.option("--otlp-grpc-port", type=PORT, default=4317, show_default=True,
                     help="OTLP/gRPC receiver. " + _PORT_HELP),
        click.option("--otlp-http-port", type=PORT, default=4318, show_default=True,
                     help="OTLP/HTTP receiver. " + _PORT_HELP),
    )):
        func = option(func)
    return func


def register(cli: click.Group) -> None:
    """Attach the commands to the top-level group."""

    @cli.command()
    @up_options
    @click.pass_context
    @handle_errors
    def up(ctx: click.Context, home: str | None, nats_port: int, router_port: int, grpc_port: int,
           otlp_grpc_port: int, otlp_http_port: int) -> None:
        """Start the embedded stack: nats-server, chDB and every service in one process."""
        settings = embedded_settings(ctx.obj["settings"], home, nats_port, router_port, grpc_port, otlp_grpc_port,
                                     otlp_http_port)
        refuse_to_start(settings)
        import uvloop  # the services' loop: cheaper transports than asyncio's (bench_router)

        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(serve_stack(settings))

    @cli.command("nats-config")
    @click.option("--cluster", is_flag=True,
                  help="A JetStream cluster node's whole configuration with accounts (LOCKGATE for every "
                       "identity, SYS the system account) and authenticated routes (deploy/nats/cluster.conf).")
    @click.option("--app", "apps", multiple=True, nargs=2, metavar="TENANT APP",
                  help="Add an application's own user (`apps.TENANT.APP`: its events only; see `app-credential`), "
                       "password from LOCKGATE_NATS_PASSWORD_APPS_TENANT_APP. Repeatable.")
    @click.pass_context
    @handle_errors
    def nats_config(ctx: click.Context, cluster: bool, apps: tuple[tuple[str, str], ...]) -> None:
        """Print users and permissions for a deployed nats-server (deploy/nats/auth.conf), passwords
        from its environment: LOCKGATE_NATS_PASSWORD_<SERVICE or ROLE>."""
        from lockgate.contracts.names import check_name
        from lockgate.server.natsaccounts import cluster_config
        from lockgate.server.natsserver import deploy_auth_config
        from lockgate.subjects import Subjects

        pairs = [(check_name(tenant, "tenant"), check_name(app, "app")) for tenant, app in apps]
        subjects = Subjects(ctx.obj["settings"].prefix)
        click.echo(cluster_config(subjects, apps=pairs) if cluster else deploy_auth_config(subjects, pairs), nl=False)

    @cli.command()
    @click.argument("services", nargs=-1, required=True)
    @click.option("--router-port", type=PORT, help="HTTP port of the router (0 picks a free one).")
    @click.option("--grpc-port", type=PORT, help="Port of the gateway's gRPC API (0 picks a free one).")
    @click.option("--otlp-grpc-port", type=PORT, help="Port of the OTLP/gRPC receiver (0 picks a free one).")
    @click.option("--otlp-http-port", type=PORT, help="Port of the OTLP/HTTP receiver (0 picks a free one).")
    @click.option("--health-port", type=PORT,
                  help="Port of /livez and /readyz (ready: every bus connection is up) for probes; "
                       "LOCKGATE_HEALTH_PORT, default off.")
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address the router and gRPC API bind; containers pass 0.0.0.0 explicitly.")
    # Also taken after `serve` (they are `lockgate`'s own options): `lockgate serve drift --nats URL` is the form
    # people write from a deployment's command line, and `lockgate --nats URL serve drift` works alike.
    @click.option("--nats", "nats_url", help="NATS URL(s) of the stack, as `lockgate --nats`.")
    @click.option("--clickhouse", "clickhouse_url", help="ClickHouse URL, as `lockgate --clickhouse`.")
    @click.pass_context
    @handle_errors
    def serve(ctx: click.Context, services: tuple[str, ...], router_port: int | None, grpc_port: int | None,
              otlp_grpc_port: int | None, otlp_http_port: int | None, health_port: int | None, host: str,
              nats_url: str | None, clickhouse_url: str | None) -> None:
        """Run SERVICES (sink, query, router, gateway, ...) against an external NATS (distributed mode).

        Only the sink and the query service open ClickHouse; on chDB, whose data path one process
        owns, run them together: `lockgate serve sink query`. Each service connects to NATS as itself,
        with HOME/credentials/NAME.json, or as LOCKGATE_NATS_USER with LOCKGATE_NATS_PASSWORD (or
        LOCKGATE_NATS_CREDS) for all of them.
        """
        from lockgate.server.registry import factory
        from lockgate.server.runtime import Runtime

        for name in services:
            factory(name)  # an unknown name fails here with the list of services

        settings: Settings = ctx.obj["settings"].replace(
            nats_url=nats_url, clickhouse_url=clickhouse_url, host=host, grpc_port=grpc_port, router_port=router_port,
            otlp_grpc_port=otlp_grpc_port, otlp_http_port=otlp_http_port, health_port=health_port)
        # ClickHouse not configured: the chDB under the home, as `up` and the CLI's queries have it (before,
        # `--home H serve query` opened ./.lockgate/clickhouse, and `lockgate sql` answered 0 rows from it).
        settings = settings.replace(clickhouse_url=access.store_url(settings))

        stopped: list[tuple[int, str]] = []  # the signal that stopped the start, if one did, and what it waited for

        async def run() -> None:
            runtime = Runtime(settings, services=list(dict.fromkeys(services)), embedded_nats=False)
            # Before the ready line: a SIGTERM right after it (a rolling restart, a test) must stop the
            # process gracefully, not kill it with the default handler before this one is installed.
            stop = _stop_on_signals()
            try:
                waited = await _start_unless_stopped(runtime, stop)
                if waited is not None:
                    stopped.append((stop.signum, waited))
                    return
                console.print(f"[bold green]{' + '.join(services)}[/bold green] serving")
                _print_endpoints(runtime.endpoints)
                # The last line at start: whoever waits for this process knows its endpoints now.
                console.print("[dim]SIGTERM or Ctrl-C stops it; queued events are flushed first.[/dim]")
                await _until_stopped(stop, runtime)
            finally:
                await runtime.stop()

        import uvloop

        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(run())
        if stopped:
            (signum, waited), = stopped
            # 128 + the signal, as a shell reports a process the signal ended: 130 for Ctrl-C, 143 for SIGTERM.
            fail(f"stopped by {signal.Signals(signum).name} before {' + '.join(services)} started: {waited}",
                 128 + signum)
