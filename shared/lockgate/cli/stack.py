"""Commands that run things: `up`, `serve`, `sim`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import click

from lockgate.cli.main import handle_errors
from lockgate.cli.render import console
from lockgate.config import Settings


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _print_endpoints(endpoints: dict[str, str]) -> None:
    for name, url in endpoints.items():
        console.print(f"  [bold]{name:<11}[/bold] {url}")


async def _up(settings: Settings, demo: bool, services: list[str] | None) -> None:
    from lockgate import sim
    from lockgate.demo import demo_sim_config, run_demo
    from lockgate.runtime import Runtime

    simulator = sim.SimServer(demo_sim_config(), host=settings.host, port=settings.sim_port)
    await simulator.start()
    settings = settings.replace(
        stable_upstream=settings.stable_upstream if settings.stable_upstream != Settings().stable_upstream
        else simulator.url,
        canary_upstream=settings.canary_upstream if settings.canary_upstream != Settings().canary_upstream
        else simulator.url,
    )
    runtime = Runtime(settings, services=services)
    try:
        await runtime.start()
        console.print("[bold green]lockgate is up[/bold green] (embedded: nats-server + chDB + all services)")
        _print_endpoints(runtime.endpoints | {"simulator": simulator.url + "  (simulated LLM upstream)"})
        if demo:
            assert runtime.ctx is not None
            router = runtime.services["router"] if runtime.services else None
            await run_demo(runtime.ctx.bus, router_url=router.url, sim_url=simulator.url, console=console)
        console.print("[dim]Ctrl-C stops the stack; queued events are flushed first.[/dim]")
        await _until_signalled()
        console.print("stopping: flushing buffers and closing consumers ...")
    finally:
        await runtime.stop()
        await simulator.stop()
    console.print("stopped cleanly.")


def register(cli: click.Group) -> None:
    """Attach the commands to the top-level group."""

    @cli.command()
    @click.option("--home", default="./.lockgate", show_default=True, help="Where JetStream and chDB keep data.")
    @click.option("--demo", is_flag=True, help="Run the demo once the stack is up.")
    @click.option("--nats-port", default=4222, show_default=True)
    @click.option("--router-port", default=8080, show_default=True)
    @click.option("--grpc-port", default=50051, show_default=True)
    @click.option("--sim-port", default=9000, show_default=True)
    @click.pass_context
    @handle_errors
    def up(ctx: click.Context, home: str, demo: bool, nats_port: int, router_port: int, grpc_port: int,
           sim_port: int) -> None:
        """Start the embedded stack: nats-server, chDB and every service in one process."""
        settings: Settings = ctx.obj["settings"]
        home_path = Path(home)
        clickhouse = settings.clickhouse_url
        if clickhouse == Settings().clickhouse_url:  # not configured: keep it beside JetStream's data
            clickhouse = f"chdb://{(home_path / 'clickhouse').resolve()}"
        settings = settings.replace(home=str(home_path), clickhouse_url=clickhouse,
                                    nats_url=f"nats://127.0.0.1:{nats_port}", router_port=router_port,
                                    grpc_port=grpc_port, sim_port=sim_port)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_up(settings, demo, None))

    @cli.command()
    @click.argument("service", type=click.Choice(["sink", "lineage", "evaluator", "gatekeeper", "router",
                                                  "drift", "cost"]))
    @click.option("--grpc", "grpc_port", type=int, help="Also serve the gRPC API on this port.")
    @click.option("--router-port", type=int, help="HTTP port of the router.")
    @click.pass_context
    @handle_errors
    def serve(ctx: click.Context, service: str, grpc_port: int | None, router_port: int | None) -> None:
        """Run one service against an external NATS and ClickHouse (distributed mode)."""
        from lockgate.runtime import Runtime

        settings: Settings = ctx.obj["settings"].replace(host="0.0.0.0", grpc_port=grpc_port,
                                                         router_port=router_port)

        async def run() -> None:
            runtime = Runtime(settings, services=[service], embedded_nats=False, grpc=grpc_port is not None)
            try:
                await runtime.start()
                console.print(f"[bold green]{service}[/bold green] serving")
                _print_endpoints(runtime.endpoints)
                await _until_signalled()
            finally:
                await runtime.stop()

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run())

    @cli.command()
    @click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                  help="YAML: models with answers, latency and error rate. Default: the demo models.")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", default=9000, show_default=True)
    @handle_errors
    def sim(config_path: str | None, host: str, port: int) -> None:
        """Run the simulated OpenAI-compatible upstream (a SIMULATOR for demos and tests, not a model)."""
        from lockgate import sim as simulator
        from lockgate.demo import demo_sim_config

        config = simulator.load_config(config_path) if config_path else demo_sim_config()

        async def run() -> None:
            server = simulator.SimServer(config, host=host, port=port)
            await server.start()
            console.print(f"simulator listening on {server.url} with models: {', '.join(config.models)}")
            try:
                await _until_signalled()
            finally:
                await server.stop()

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run())
