"""`lockgate dev up`, `lockgate sim` and `lockgate demo`: the simulator and the demo as CLI commands."""

from __future__ import annotations

import asyncio
import contextlib
import os

import aiohttp
import click

from lockgate.bus import Bus
from lockgate.cli import running
from lockgate.cli.access import with_bus
from lockgate.cli.render import console
from lockgate.cli.rollout import RouterUnavailable
from lockgate.cli.root import handle_errors
from lockgate.cli.stack import (
    PORT,
    _until_signalled,
    embedded_settings,
    refuse_to_start,
    serve_stack,
    up_options,
)
from lockgate.config import Settings
from lockgate.errors import ConfigError
from lockgate.redact import shown_url
from lockgate.server.apikeys import FILE, AuthError, KeyStore, read_credential
from lockgate_dev import sim as simulator
from lockgate_dev.demo import APP, demo_sim_config, run_demo, write_demo_gates


async def _dev_up(settings: Settings, sim_port: int, demo: bool) -> None:
    server = simulator.SimServer(demo_sim_config(), host=settings.host, port=sim_port, port_flag="--sim-port")
    await server.start()
    # Upstreams not configured by the operator point at the simulator.
    default = Settings()
    settings = settings.replace(
        stable_upstream=server.url if settings.stable_upstream == default.stable_upstream else None,
        canary_upstream=server.url if settings.canary_upstream == default.canary_upstream else None,
        app=APP if demo and settings.app == default.app else None,  # the first app key is the demo's
        # The demo app's gate is fixed here, not by whoever requests its evals (unless the operator set one).
        gates_file=None if settings.gates_file else write_demo_gates(settings.home),
    )

    async def on_ready(runtime: object) -> None:
        if demo:
            assert runtime.ctx is not None  # type: ignore[attr-defined]
            router = runtime.services["router"]  # type: ignore[attr-defined]
            admin_key, app_key = _demo_keys(settings.home)
            await run_demo(runtime.ctx.bus, router_url=router.url, sim_url=server.url,  # type: ignore[attr-defined]
                           console=console, admin_key=admin_key, app_key=app_key, home=settings.home)

    try:
        await serve_stack(settings, extra={"simulator": server.url, "gates": settings.gates_file},
                          notes={"simulator": "simulated LLM upstream",
                                 "gates": "the policy each app's releases must be gated by"}, on_ready=on_ready)
    finally:
        await server.stop()


# Set by the Makefile's `run` target: options reach `dev up` there only as `make run ARGS="..."`, and those given.
VIA_MAKE_RUN = "LOCKGATE_VIA_MAKE_RUN"
MAKE_ARGS = "LOCKGATE_MAKE_ARGS"


def _refuse_to_start(settings: Settings, sim_port: int) -> None:
    """`refuse_to_start`, its advice in the form `make run` takes when run by it, with the ARGS already given: before,
    a taken port said "choose another with --router-port", an option `make run` could not pass, and then advised
    ARGS without those given (another --home)."""
    if not os.environ.get(VIA_MAKE_RUN):
        refuse_to_start(settings, sim_port)
        return
    given = os.environ.get(MAKE_ARGS, "").strip()

    def advice(options: str) -> str:
        args = f"{given} {options}".strip()
        return f' (with make: make run ARGS="{args}")'

    refuse_to_start(settings, sim_port, advice=advice)


def _demo_keys(home: str) -> tuple[str, str]:
    """The admin key `up` made, and an app key for the demo's app (made once if the first is another app's).
    A key in those files an operator revoked (`up` does not make it again) stops the demo before it starts, in one
    line saying which and what to do (before, probe p77 F1, the demo took a revoked app key as far as an AuthError)."""
    creds = f"{home}/credentials"
    store = KeyStore(home)
    live: list[str] = []
    for name, role in (("router-admin.key", "admin"), ("router-app.key", "app")):
        path = f"{creds}/{name}"
        key = read_credential(path)
        try:
            store.authenticate(key)
        except AuthError:
            raise ConfigError(f"the {role} key in {path} is revoked (or unknown to {home}), and the demo sends with "
                              f"it: write a new one there (`lockgate keys create --tenant default --app {APP} "
                              f"--role {role}` prints it), or run the demo on a new --home") from None
        live.append(key)
    admin_key, app_key = live
    if store.authenticate(app_key).app != APP:
        app_key, _ = store.create("default", APP, description="demo traffic")
    return admin_key, app_key


def _served(home: str, name: str) -> str:
    """The URL of an endpoint the stack running from `home` serves, as HOME/stack.json names it ('' if no stack runs
    there)."""
    return running.endpoints(home).get(name, "")


# How long the demo waits for the router's first answer before it starts: a router that is not there is said before
# anything is registered, not half-way through.
_ROUTER_CHECK_S = 10


async def _demo_against(bus: Bus, router_url: str, sim_url: str, traffic: int, home: str,
                        keys: tuple[str, str]) -> None:
    """`run_demo`; a router that does not answer is one line (RouterUnavailable), before anything is registered or
    wherever it stops answering."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_ROUTER_CHECK_S)) as http, \
                http.get(f"{router_url}/healthz"):
            pass  # any answer: something serves HTTP there; the demo's first route change says if it is no router
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _no_router(router_url, exc) from None
    try:
        await run_demo(bus, router_url=router_url, sim_url=sim_url, console=console, traffic=traffic,
                       admin_key=keys[0], app_key=keys[1], home=home)
    except aiohttp.ClientError as exc:
        raise _no_router(router_url, exc) from None


def _no_router(router_url: str, exc: Exception) -> RouterUnavailable:
    cause = getattr(exc, "os_error", None)  # aiohttp's wrapper of the connection's OSError; its errno says why
    why = os.strerror(cause.errno) if cause is not None and cause.errno else str(exc) or exc.__class__.__name__
    return RouterUnavailable(f"the router at {shown_url(router_url)} did not answer the demo ({why}); pass --router "
                             "URL (as `lockgate dev up` printed it), or --home of the stack")


def register(cli: click.Group) -> None:
    """Attach the dev commands to the `lockgate` group."""

    @cli.group()
    def dev() -> None:
        """Development: the embedded stack with a simulated upstream, and the demo."""

    @dev.command("up")
    @up_options
    @click.option("--sim-port", type=PORT, default=9000, show_default=True,
                  help="0 picks a free port (printed at start).")
    @click.option("--demo", is_flag=True, help="Run the demo once the stack is up.")
    @click.pass_context
    @handle_errors
    def dev_up(ctx: click.Context, home: str | None, nats_port: int, router_port: int, grpc_port: int,
               otlp_grpc_port: int, otlp_http_port: int, sim_port: int, demo: bool) -> None:
        """Start the embedded stack with the simulator as its upstream (`make run` adds --demo)."""
        settings = embedded_settings(ctx.obj["settings"], home, nats_port, router_port, grpc_port, otlp_grpc_port,
                                     otlp_http_port)
        _refuse_to_start(settings, sim_port)  # before the simulator takes its port
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_dev_up(settings, sim_port, demo))

    @dev.command("cluster")
    @click.option("--home", default=None, help="Where the cluster's JetStream, chDB, credentials and keys live "
                                               "(default: the global --home, LOCKGATE_HOME, or ./.lockgate).")
    @click.option("--replicas", default=2, show_default=True,
                  help="Processes per scalable service (router, evaluator, drift, cost, gateway, otlp).")
    @click.pass_context
    @handle_errors
    def dev_cluster(ctx: click.Context, home: str | None, replicas: int) -> None:
        """Run the distributed topology here: a 3-node JetStream cluster on loopback (R3 streams and
        buckets, NATS users on) and every service as its own `lockgate serve` process."""
        from lockgate_dev.cluster import run_cluster

        settings = ctx.obj["settings"]
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_cluster(home or settings.home, settings.prefix, replicas))

    @cli.command()
    @click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                  help="YAML: models with answers, latency and error rate. Default: the demo models.")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", type=PORT, default=9000, show_default=True)
    @handle_errors
    def sim(config_path: str | None, host: str, port: int) -> None:
        """Run the simulated OpenAI-compatible upstream (a SIMULATOR for demos and tests, not a model)."""
        config = simulator.load_config(config_path) if config_path else demo_sim_config()

        async def run() -> None:
            server = simulator.SimServer(config, host=host, port=port, serve_metrics=True)
            await server.start()
            console.print(f"simulator listening on {server.url} with models: {', '.join(config.models)}")
            try:
                await _until_signalled()
            finally:
                await server.stop()

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run())

    @cli.command()
    @click.option("--router", "router_url", envvar="LOCKGATE_ROUTER_URL",
                  help="Base URL of the router (default: the one the stack running from the home serves, else "
                       "http://127.0.0.1:8080).")
    @click.option("--sim", "sim_url",
                  help="The simulator's URL the evaluations call (default: the one `lockgate dev up` running from "
                       "the home serves, else http://127.0.0.1:9000/v1).")
    @click.option("--traffic", default=1200, show_default=True, help="Minimum requests sent through the router.")
    @click.option("--home", default=None,
                  help=f"The stack's home (its stack.json, {FILE} and credentials/); default: the global --home.")
    @click.pass_context
    @handle_errors
    def demo(ctx: click.Context, router_url: str | None, sim_url: str | None, traffic: int, home: str | None) -> None:
        """Run the demo against a running stack (`lockgate dev up` in another terminal)."""
        settings: Settings = ctx.obj["settings"]
        if home is not None:  # as the global --home: that stack's NATS (unless --nats says), credentials and keys
            explicit = ctx.find_root().params.get("nats_url") is not None
            settings = settings.replace(home=home, nats_url=None if explicit else _served(home, "nats") or None)
        home = settings.home
        # Before (probe p11), a stack on other ports (`dev up --router-port 0`) was reached for NATS, from stack.json,
        # but not for the router: the demo registered and evaluated, then died in aiohttp's traceback.
        router_url = router_url or _served(home, "router").removesuffix("/v1") or \
            f"http://127.0.0.1:{settings.router_port}"
        sim_url = sim_url or _served(home, "simulator") or "http://127.0.0.1:9000/v1"
        keys = _demo_keys(home)
        with_bus(settings, lambda bus: _demo_against(bus, router_url, sim_url, traffic, home, keys),
                 role="admin")  # the demo plays every part: registers, evaluates, approves
