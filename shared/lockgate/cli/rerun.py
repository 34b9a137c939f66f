"""`lockgate eval rerun RUN`: repeat a stored eval run from the environment it captured, cache off, and say
whether the results agree within their intervals.

The evaluator runs it as it ran the original (same suite, so the same dataset, prompt, sampling parameters
and seeds; the stored endpoint, model, concurrency and timeout), but with `rerun_of` set: the result comes
back on its own subject (EvalReran), so no gate decides on it and no eval run is recorded. Exit 0 when every
metric agrees, 5 when one does not (or the rerun failed).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click
from rich.text import Text

from lockgate.bus import Bus
from lockgate.cli.access import with_bus
from lockgate.cli.params import TIMEOUT
from lockgate.cli.render import console, emit_json, output
from lockgate.cli.root import handle_errors, json_option
from lockgate.errors import LockgateError, NotFound


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.4g}"


def _ci(low: float | None, high: float | None) -> str:
    return "" if low is None or high is None else f"[{_fmt(low)}, {_fmt(high)}]"


async def _rerun(bus: Bus, run_id: str, endpoint: str, model: str, timeout_s: float,
                 timing: bool) -> dict[str, Any]:
    from lockgate.codec import Codec
    from lockgate.contracts import EvalRequested, EvalReran
    from lockgate.ids import uuid7
    from lockgate.provenance import rerun
    from lockgate.queryclient import ask

    stored = await ask(bus, "eval_run", {"run_id": run_id}, into=dict[str, Any] | None)
    if stored is None:
        raise NotFound(f"no stored eval run {run_id!r}; find run ids with `lockgate sql 'SELECT run_id, release, time FROM eval_runs'`")
    env = dict(stored.get("environment") or {})
    new_id = uuid7()
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_reran(msg: Any) -> None:
        await got.put(msg.data)

    cb: Callable[[Any], Awaitable[None]] = on_reran
    sub = await bus.nc.subscribe(bus.subjects.eval_reran, cb=cb)
    codec: Codec[EvalReran] = Codec(EvalReran)
    try:
        await bus.publish(bus.subjects.eval_requested, EvalRequested(
            run_id=new_id, release=stored["release"], suite=stored["suite"],
            endpoint=endpoint or env.get("endpoint", ""), model=model or env.get("model", ""),
            concurrency=int(env.get("concurrency") or 8), timeout_s=float(env.get("timeout_s") or 30.0),
            cache=False, rerun_of=run_id))
        async with asyncio.timeout(timeout_s):
            while True:
                done = codec.decode(await got.get())
                if done.run_id == new_id:
                    break
    except TimeoutError:
        raise LockgateError(f"rerun of {run_id} did not finish within {timeout_s:.0f}s; is the evaluator "
                            "running?") from None
    finally:
        await sub.unsubscribe()
    return rerun.report(done, env, timing=timing)


def _print(result: dict[str, Any]) -> None:
    rows = [{"metric": m["metric"], "stored": _fmt(m["stored"]), "stored 95% CI": _ci(m["stored_low"], m["stored_high"]),
             "rerun": _fmt(m["rerun"]), "rerun 95% CI": _ci(m["rerun_low"], m["rerun_high"]),
             "agrees": ("yes" if m["agrees"] else Text("NO", "red")) if m["compared"] else
             f"({'yes' if m['agrees'] else 'no'}: timing, not compared)"} for m in result["metrics"]]
    output(rows, False, title=f"rerun {result['run_id']} of eval {result['rerun_of']} ({result['release']}): "
                              f"{result['status']}, {result['n_cases']} cases (stored {result['stored_cases']})",
           empty="no metrics to compare")
    changes = [{"setting": k, "stored": v["stored"], "rerun": v["rerun"]}
               for k, v in result["environment_changes"].items()]
    if changes:
        output(changes, False, title="environment changed since the stored run")
    if result["error"]:
        console.print(f"[red]error:[/red] {result['error']}", highlight=False)
    for warning in result["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    verdict = ("[green]reproduced[/green]: every metric agrees within its interval" if result["agrees"]
               else "[red]not reproduced[/red]: the rerun disagrees with the stored run")
    console.print(verdict, highlight=False)


def register(eval_group: click.Group) -> None:
    """Attach `eval rerun`."""

    @eval_group.command("rerun")
    @click.argument("run_id", metavar="RUN")
    @click.option("--endpoint", default="", help="Call this base URL instead of the stored one (to test a changed "
                                                 "upstream).")
    @click.option("--model", default="", help="Send this model name instead of the stored one.")
    @click.option("--timeout", "timeout_s", type=TIMEOUT, default=600.0, show_default=True, help="Seconds to wait.")
    @click.option("--timing", is_flag=True, help="Also require latency metrics to agree (they depend on load).")
    @json_option
    @click.pass_context
    @handle_errors
    def eval_rerun(ctx: click.Context, run_id: str, endpoint: str, model: str, timeout_s: float, timing: bool,
                   as_json: bool) -> None:
        """Re-run a stored eval run from its captured environment with the cache off; report per metric whether
        the results agree within their intervals. Never moves a gate. Exit 0 agree, 5 disagree."""
        from lockgate.provenance.rerun import EXIT_DISAGREES

        result = with_bus(ctx.obj["settings"], lambda bus: _rerun(bus, run_id, endpoint, model, timeout_s, timing),
                          role="operator")
        if as_json:
            emit_json(result)
        else:
            _print(result)
        if not result["agrees"]:
            sys.exit(EXIT_DISAGREES)
