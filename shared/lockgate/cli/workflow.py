"""Commands that drive releases through a running stack: artifacts, releases, evals, the demo."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from lockgate.bus import Bus
from lockgate.cli.main import handle_errors, json_option
from lockgate.cli.render import console, emit_json, output
from lockgate.config import Settings
from lockgate.subjects import Subjects

T = TypeVar("T")
KINDS = ["dataset", "prompt", "model_config", "tool", "environment", "eval_suite", "policy"]


def _with_bus(settings: Settings, work: Callable[[Bus], Awaitable[T]]) -> T:
    async def run() -> T:
        bus = Bus(settings.nats_url, Subjects(settings.prefix), name="lockgate-cli")
        await bus.connect()
        try:
            return await work(bus)
        finally:
            await bus.close()

    return asyncio.run(run())


def register(cli: click.Group) -> None:
    """Attach the commands to the top-level group."""

    @cli.group()
    def artifact() -> None:
        """Version artifacts by content hash."""

    @artifact.command("register")
    @click.argument("kind", type=click.Choice(KINDS))
    @click.argument("path", type=click.Path(exists=True, dir_okay=False))
    @click.option("--name", help="Artifact name (default: file stem).")
    @json_option
    @click.pass_context
    @handle_errors
    def artifact_register(ctx: click.Context, kind: str, path: str, name: str | None, as_json: bool) -> None:
        """Register a file as an artifact version; prints its hash."""
        from lockgate import artifacts

        event = _with_bus(ctx.obj["settings"], lambda bus: artifacts.register_file(bus, kind, path, name=name))
        row = {"kind": event.kind, "name": event.name, "hash": event.hash, "size": event.size}
        output([row], as_json)

    @cli.group()
    def release() -> None:
        """Releases: named sets of artifact versions."""

    @release.command("create")
    @click.argument("name")
    @click.option("--app", required=True)
    @click.option("--artifact", "pairs", multiple=True, required=True, metavar="KIND/NAME=HASH")
    @click.option("--parent", default="")
    @click.pass_context
    @handle_errors
    def release_create(ctx: click.Context, name: str, app: str, pairs: tuple[str, ...], parent: str) -> None:
        """Record a release as a set of artifact versions."""
        from lockgate import artifacts
        from lockgate.errors import ConfigError

        arts = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or "/" not in key or not value.startswith("sha256:"):
                raise ConfigError(f"--artifact {pair!r} must look like kind/name=sha256:<hex>")
            arts[key] = value
        _with_bus(ctx.obj["settings"], lambda bus: artifacts.register_release(bus, name, app, arts, parent=parent))
        console.print(f"release {name} recorded with {len(arts)} artifacts")

    @cli.group("eval")
    def eval_group() -> None:
        """Evaluate releases."""

    @eval_group.command("run")
    @click.argument("suite", type=click.Path(exists=True, dir_okay=False))
    @click.option("--candidate", required=True, help="Release to evaluate.")
    @click.option("--baseline", default="", help="Release to compare against.")
    @click.option("--endpoint", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:9000/v1")
    @click.option("--model", default="", help="Model name sent to the endpoint.")
    @click.option("--policy", "policy_path", type=click.Path(exists=True, dir_okay=False),
                  help="Gate policy YAML; the gate decides when the eval completes.")
    @click.option("--concurrency", default=8, show_default=True)
    @click.option("--timeout", "timeout_s", default=600.0, show_default=True, help="Seconds to wait.")
    @json_option
    @click.pass_context
    @handle_errors
    def eval_run(ctx: click.Context, suite: str, candidate: str, baseline: str, endpoint: str, model: str,
                 policy_path: str | None, concurrency: int, timeout_s: float, as_json: bool) -> None:
        """Register a suite (and its JSONL dataset), run it through the evaluator, wait for the result."""
        result = _with_bus(ctx.obj["settings"], lambda bus: _eval(
            bus, Path(suite), candidate, baseline, endpoint, model, policy_path, concurrency, timeout_s))
        if as_json:
            emit_json(result)
            return
        output([{"metric": k, "value": v} for k, v in result["metrics"].items()], False,
               title=f"eval {result['run_id']} of {candidate}: {result['status']}")
        if result.get("decision"):
            d = result["decision"]
            output(d["rules"], False, title=f"gate: {d['decision']}",
                   columns=["rule", "metric", "op", "threshold", "observed", "verdict", "hint"])

    @cli.command()
    @click.option("--router", "router_url", default="http://127.0.0.1:8080", show_default=True)
    @click.option("--sim", "sim_url", default="http://127.0.0.1:9000/v1", show_default=True)
    @click.option("--traffic", default=1200, show_default=True, help="Minimum requests sent through the router.")
    @click.pass_context
    @handle_errors
    def demo(ctx: click.Context, router_url: str, sim_url: str, traffic: int) -> None:
        """Run the demo against a running stack (`lockgate up` in another terminal)."""
        from lockgate.demo import run_demo

        _with_bus(ctx.obj["settings"], lambda bus: run_demo(bus, router_url=router_url, sim_url=sim_url,
                                                             console=console, traffic=traffic))


async def _eval(bus: Bus, suite_path: Path, candidate: str, baseline: str, endpoint: str, model: str,
                policy_path: str | None, concurrency: int, timeout_s: float) -> dict[str, Any]:
    from rich.progress import Progress, SpinnerColumn, TimeElapsedColumn

    from lockgate import artifacts
    from lockgate.codec import Codec, encode
    from lockgate.contracts import EvalCompleted, EvalRequested, GateDecided
    from lockgate.errors import ConfigError, LockgateError
    from lockgate.ids import uuid7

    doc = yaml.safe_load(suite_path.read_text())
    if not isinstance(doc, dict):
        raise ConfigError(f"{suite_path}: an eval suite must be a YAML mapping")
    dataset = doc.get("dataset")
    if isinstance(dataset, str) and not dataset.startswith("sha256:"):
        ds_path = (suite_path.parent / dataset)
        ds = await artifacts.register_file(bus, "dataset", ds_path)
        doc["dataset"] = ds.hash
    suite = await artifacts.register(bus, "eval_suite", doc.get("name", suite_path.stem), doc)
    policy = await artifacts.register_file(bus, "policy", policy_path) if policy_path else None
    run_id = uuid7()
    done = bus.subjects.eval_completed
    sub = await bus.nc.subscribe(done)
    gate_sub = await bus.nc.subscribe(bus.subjects.gate_decided(candidate)) if policy else None
    completed: EvalCompleted | None = None
    try:
        await bus.publish(bus.subjects.eval_requested, EvalRequested(
            run_id=run_id, release=candidate, suite=suite.hash, endpoint=endpoint, model=model, baseline=baseline,
            policy=policy.hash if policy else "", concurrency=concurrency))
        codec: Codec[EvalCompleted] = Codec(EvalCompleted)
        with Progress(SpinnerColumn(), "[progress.description]{task.description}", TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            progress.add_task(f"evaluating {candidate} ({run_id})", total=None)
            async with asyncio.timeout(timeout_s):
                while completed is None:
                    msg = await sub.next_msg(timeout=timeout_s)
                    event = codec.decode(msg.data)
                    if event.run_id == run_id:
                        completed = event
                decision = None
                if gate_sub is not None:
                    decision = Codec(GateDecided).decode((await gate_sub.next_msg(timeout=timeout_s)).data)
    except TimeoutError:
        raise LockgateError(f"eval {run_id} did not finish within {timeout_s:.0f}s; is the evaluator running?") \
            from None
    finally:
        await sub.unsubscribe()
        if gate_sub is not None:
            await gate_sub.unsubscribe()
    result: dict[str, Any] = {"run_id": run_id, "status": completed.status, "metrics": completed.metrics,
                              "n_cases": completed.n_cases, "error": completed.error}
    if decision is not None:
        result["decision"] = json.loads(encode(decision))
    return result
