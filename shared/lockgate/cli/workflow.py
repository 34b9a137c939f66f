"""Commands that drive releases through a running stack: artifacts, releases, evals."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.text import Text

from lockgate.bus import Bus
from lockgate.cli.access import with_bus
from lockgate.cli.params import TIMEOUT
from lockgate.cli.render import console, emit_json, output, shown
from lockgate.cli.root import handle_errors, json_option
from lockgate.contracts.artifacts import ARTIFACT_KINDS

if TYPE_CHECKING:
    from lockgate.config import Settings
    from lockgate.signing import Keyring


def register(cli: click.Group) -> None:
    """Attach the commands to the top-level group."""

    @cli.group()
    def artifact() -> None:
        """Version artifacts by content hash."""

    @artifact.command("register")
    @click.argument("kind", type=click.Choice(ARTIFACT_KINDS))
    @click.argument("path", type=click.Path(exists=True, dir_okay=False))
    @click.option("--name", help="Artifact name (default: file stem).")
    @json_option
    @click.pass_context
    @handle_errors
    def artifact_register(ctx: click.Context, kind: str, path: str, name: str | None, as_json: bool) -> None:
        """Register a file as an artifact version; prints its hash. Signed by your personal identity (`--as`)
        when you have one."""
        from lockgate import artifacts
        from lockgate.cli.identity import optional_identity

        signer = optional_identity(ctx)
        event = with_bus(ctx.obj["settings"], lambda bus: artifacts.register_file(bus, kind, path, name=name,
                                                                                  signer=signer), role="operator")
        row = {"kind": event.kind, "name": event.name, "hash": event.hash, "size": event.size,
               "key_id": event.key_id}
        output([row], as_json)

    @cli.group()
    def release() -> None:
        """Releases: named sets of artifact versions."""

    @release.command("create")
    @click.argument("name")
    @click.option("--app", required=True)
    @click.option("--artifact", "pairs", multiple=True, required=True, metavar="KIND/NAME=HASH")
    @click.option("--parent", default="")
    @click.option("--tenant", default="default", show_default=True,
                  help="Whose release it is: its recorded evals and gRPC decision reads keep to this tenant.")
    @click.pass_context
    @handle_errors
    def release_create(ctx: click.Context, name: str, app: str, pairs: tuple[str, ...], parent: str,
                       tenant: str) -> None:
        """Record a release as a set of artifact versions."""
        from lockgate import artifacts
        from lockgate.errors import ConfigError

        arts = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:  # what the pair names is checked where every release is (artifacts.check_references)
                raise ConfigError(f"--artifact {pair!r} must look like kind/name=sha256:<hex>")
            arts[key] = value
        from lockgate.cli.identity import optional_identity
        from lockgate.identity import author_of

        # The author's signature lets a policy refuse their own approval (forbid_self_approval).
        author = optional_identity(ctx)
        settings = ctx.obj["settings"]
        binding = with_bus(settings, lambda bus: artifacts.register_release(bus, name, app, arts, parent=parent,
                                                                            tenant=tenant, author=author),
                           role="operator")
        if binding.created:
            by = f", authored by {author.name}" if author else " (no author: no personal identity, see --as)"
            console.print(f"release {name} recorded with {len(arts)} artifacts{by}")
            return
        # The binding keeps its first registration's author, the one forbid_self_approval reads: not the caller.
        first = author_of(settings, binding.bundle)
        by = f", authored by {first}" if first else ", with no verified author (not signed by a trusted person)"
        # New to the bus: its first announcement was lost (a crash or bus error after binding) or is older than
        # the stream's duplicate window; the event is the same either way, stored once.
        again = "; announced again (recorded once)" if binding.announced else ""
        console.print(f"release {name} already registered (same content){by}{again}", highlight=False)

    @cli.group("eval")
    def eval_group() -> None:
        """Evaluate releases."""

    @eval_group.command("run")
    @click.argument("suite", type=click.Path(exists=True, dir_okay=False))
    @click.option("--candidate", required=True, help="Release to evaluate.")
    @click.option("--baseline", default="", help="Release to compare against.")
    @click.option("--endpoint", default="", help="Endpoint id of the allow-list (called with its credential) or "
                                                 "an OpenAI-compatible base URL, e.g. http://127.0.0.1:9000/v1 "
                                                 "(default: the one the release's model config names).")
    @click.option("--model", default="", help="Model name sent to the endpoint (default: the release's model "
                                              "config's; a release is evaluated as it ships).")
    @click.option("--policy", "policy_path", type=click.Path(exists=True, dir_okay=False),
                  help="Gate policy YAML; the gate decides when the eval completes. Without it the eval is a "
                       "measurement: no gate decides it.")
    @click.option("--replace-pass", is_flag=True,
                  help="Have the gate judge a candidate with a PASS anew under another policy or suite than that "
                       "PASS was decided under (a BLOCK then rolls back a deployment serving it).")
    @click.option("--concurrency", default=8, show_default=True)
    @click.option("--timeout", "timeout_s", type=TIMEOUT, default=600.0, show_default=True, help="Seconds to wait.")
    @click.option("--no-cache", is_flag=True, help="Call the endpoint and the judge afresh, bypassing the eval "
                                                   "cache (e.g. to rule out cached judge replies).")
    @json_option
    @click.pass_context
    @handle_errors
    def eval_run(ctx: click.Context, suite: str, candidate: str, baseline: str, endpoint: str, model: str,
                 policy_path: str | None, replace_pass: bool, concurrency: int, timeout_s: float, no_cache: bool,
                 as_json: bool) -> None:
        """Register a suite (and its JSONL dataset), run it through the evaluator, wait for the result. The gate's
        decision counts only if it verifies against the trust roots (exit 4 otherwise, as `gate verify`). SUITE
        and --policy may be `kind: suite` / `kind: policy` documents of a folder `lockgate apply` applied."""
        from lockgate.contracts.names import check_name
        from lockgate.signing import Keyring

        # Checked before anything is registered or run: the names (a bad one raised a traceback once the suite,
        # dataset and policy were stored), and a malformed trust file.
        check_name(candidate, "release")
        if baseline:
            check_name(baseline, "baseline release")
        keyring = Keyring.from_settings(ctx.obj["settings"])
        settings = ctx.obj["settings"]
        result = with_bus(settings, lambda bus: _eval(
            bus, settings, Path(suite), candidate, baseline, endpoint, model, policy_path, concurrency, timeout_s,
            keyring, cache=not no_cache, replace_pass=replace_pass), role="operator")
        if as_json:
            emit_json(result)
        else:
            _print_eval(result, candidate)
        # For CI: the step fails when the eval did (1) or when the gate asked for did not pass (5). With --policy a
        # decision of the run is always there (_eval waits for it); without, the gate decides nothing of it.
        if result["status"] != "completed":
            sys.exit(1)
        if policy_path and result["decision"]["decision"] != "PASS":
            sys.exit(5)

    from lockgate.cli import rerun

    rerun.register(eval_group)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:,.4g}"


def _print_eval(result: dict[str, Any], candidate: str) -> None:
    """Metrics with intervals, the baseline comparison, warnings and the gate decision as tables."""
    intervals = result.get("intervals", {})
    rows = [{"metric": k, "value": v, "95% CI": (f"[{_fmt(intervals[k]['low'])}, {_fmt(intervals[k]['high'])}]"
                                                   if k in intervals else ""),
             "method": intervals.get(k, {}).get("method", "")} for k, v in result["metrics"].items()]
    output(rows, False, title=f"eval {result['run_id']} of {candidate}: {result['status']}")
    if result.get("error"):
        console.print(f"[red]error:[/red] {result['error']}")
    comps = result.get("comparisons", {})
    if comps:
        output([{"metric": k, "candidate": c["candidate"], "baseline": c["baseline"], "diff": c["diff"],
                 "95% CI": f"[{_fmt(c['diff_low'])}, {_fmt(c['diff_high'])}]", "p": _fmt(c["p_value"]),
                 "effect": _fmt(c["effect_size"]), "test": c["test"], "pairs": c["n_pairs"]}
                for k, c in comps.items()], False, title=f"vs baseline run {result.get('baseline_run')}")
    for warning in result.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if not result.get("decision"):
        console.print("gate: none (a measurement: the eval named no --policy, and the gate decides nothing of it)",
                      highlight=False)
    else:
        d = result["decision"]
        if d["rules"]:
            output(d["rules"], False, title=f"gate: {d['decision']}",
                   columns=["rule", "metric", "op", "threshold", "observed", "verdict", "hint"])
        else:
            console.print(f"gate: {d['decision']}")
        if d.get("reason"):
            console.print(Text.assemble("reason: ", shown(str(d["reason"]))), highlight=False)


async def _eval(bus: Bus, settings: Settings, suite_path: Path, candidate: str, baseline: str, endpoint: str,
                model: str, policy_path: str | None, concurrency: int, timeout_s: float, keyring: Keyring, *,
                cache: bool = True, replace_pass: bool = False) -> dict[str, Any]:
    import msgspec
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from lockgate.cli import suites
    from lockgate.cli.evalcheck import check_releases
    from lockgate.codec import Codec, encode
    from lockgate.contracts import EvalCompleted, EvalRequested, GateDecided
    from lockgate.contracts.evals import EvalProgress
    from lockgate.errors import LockgateError, SignatureError
    from lockgate.ids import uuid7

    # Files, or documents of an applied folder.
    suite, policy, parsed = await suites.register(bus, suite_path, policy_path)
    # The flags against what the candidate ships, before anything is requested: the evaluator fails a run that asks
    # for another model or endpoint, and the gate BLOCKs it (rolling a serving release back) for what was only a
    # typo. (The suite and policy registered above are content-addressed artifacts: no run, no decision.)
    endpoint = await check_releases(bus, settings, candidate=candidate, baseline=baseline, endpoint=endpoint,
                                    model=model, suite_model=parsed.model, suite_name=str(suite_path),
                                    calls=parsed.task.type == "call")
    if policy and not replace_pass:
        await _keep_pass(bus, keyring, candidate, suite=suite, policy=policy)
    run_id = uuid7()
    events: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    def feed(kind: str) -> Callable[[Any], Awaitable[None]]:
        async def cb(msg: Any) -> None:  # nats-py wants a coroutine function, not a lambda
            await events.put((kind, msg.data))

        return cb

    subs = [await bus.nc.subscribe(bus.subjects.eval_completed, cb=feed("done")),
            await bus.nc.subscribe(bus.subjects.eval_progress(run_id), cb=feed("tick"))]
    if policy:
        subs.append(await bus.nc.subscribe(bus.subjects.gate_decided(candidate), cb=feed("gate")))
    completed: EvalCompleted | None = None
    decision = None
    try:
        await bus.publish(bus.subjects.eval_requested, EvalRequested(
            run_id=run_id, release=candidate, suite=suite, endpoint=endpoint, model=model, baseline=baseline,
            policy=policy, concurrency=concurrency, cache=cache))
        codec: Codec[EvalCompleted] = Codec(EvalCompleted)
        ticks = msgspec.json.Decoder(EvalProgress)
        columns = (SpinnerColumn(), "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   "[red]{task.fields[errors]} errors", TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            bar = progress.add_task(f"evaluating {candidate}", total=None, errors=0)
            async with asyncio.timeout(timeout_s):
                while completed is None or (policy and decision is None):
                    kind, data = await events.get()
                    if kind == "tick":
                        tick = ticks.decode(data)
                        progress.update(bar, total=tick.total, completed=tick.done, errors=tick.errors)
                    elif kind == "done":
                        event = codec.decode(data)
                        if event.run_id == run_id:
                            completed = event
                    elif kind == "gate":
                        # The decision of this run only: a person's review of the release, or another run's
                        # decision, announced meanwhile is not what this eval was judged (before, it was shown so).
                        gated = Codec(GateDecided).decode(data)
                        if gated.eval_run == run_id:
                            decision = gated
    except TimeoutError:
        raise LockgateError(f"eval {run_id} did not finish within {timeout_s:.0f}s; is the evaluator running?") \
            from None
    finally:
        for sub in subs:
            await sub.unsubscribe()
    result: dict[str, Any] = {
        "run_id": run_id, "status": completed.status, "metrics": completed.metrics, "n_cases": completed.n_cases,
        "n_errors": completed.n_errors, "error": completed.error, "baseline_run": completed.baseline_run,
        "intervals": msgspec.to_builtins(completed.intervals), "comparisons": msgspec.to_builtins(completed.comparisons),
        "warnings": list(completed.warnings)}
    if decision is not None:
        # CI reads exit 0 as "the gate passed": only a decision the trust roots verify says so (a PASS signed by a
        # revoked, retired or unknown key is refused by the router, so it must not pass here either).
        try:
            keyring.verify(decision)
        except SignatureError as exc:
            raise SignatureError(f"the gate decision of eval {run_id} for {candidate} is refused: {exc.message}") \
                from None
        result["decision"] = json.loads(encode(decision))
    return result


async def _keep_pass(bus: Bus, keyring: Keyring, candidate: str, *, suite: str, policy: str) -> None:
    """ConfigError when `candidate`'s current verified decision is a PASS decided under another policy or suite
    than this eval names: the eval's decision would replace it, and for an app whose gates file requires that
    policy and suite it can only be a BLOCK (`required_policy` / `required_suite`), which rolls back a deployment
    serving the release. Only the gatekeeper reads the gates file, so the PASS is the CLI's witness of what the
    gate requires (`--replace-pass` overrides it: a new version of a policy required by name)."""
    from lockgate.client import get_decision
    from lockgate.errors import ConfigError, SignatureError

    try:
        current = await get_decision(await bus.kv(bus.subjects.kv_gates), candidate)
        if current is None or current.decision != "PASS":
            return
        keyring.verify(current)
    except SignatureError:
        return  # a PASS that does not verify admits nothing: there is nothing to roll back
    differ = [(what, used, was) for what, used, was in (
        ("policy", policy, current.policy), ("suite", suite, current.artifacts.get("eval_suite", ""))) if was and used != was]
    if differ:
        under = " and ".join(f"{what} {was}" for what, _, was in differ)
        names = " and ".join(f"{what} {used}" for what, used, _ in differ)
        raise ConfigError(f"release {candidate!r} has a PASS (decision {current.id}) decided under {under}, and this "
                          f"eval names {names}: its decision would replace the PASS, and where the gates file "
                          "requires what the PASS was decided under it can only BLOCK (and roll back a deployment "
                          "serving the release); run it with that suite and policy, or add --replace-pass to have "
                          "the gate judge it anew")
