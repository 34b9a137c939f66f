"""`lockgate`: run the stack, drive releases, and query what happened."""

from __future__ import annotations

import datetime as dt
import json
from importlib.metadata import entry_points
from typing import Any

import click

from lockgate.cli import access
from lockgate.cli.render import entries, err_console, output
from lockgate.cli.root import cli, handle_errors, json_option
from lockgate.config import Settings
from lockgate.errors import ReplyTooLarge
from lockgate.subjects import Subjects


def _settings(ctx: click.Context) -> Settings:
    return ctx.obj["settings"]


def _query(ctx: click.Context, name: str, **args: Any) -> Any:
    return access.query(_settings(ctx), name, direct=ctx.obj["direct"], **args)


# Spans of one trace asked at a time; a page more than one reply carries is asked again at half the size.
TRACE_PAGE = 500


def _trace_spans(ctx: click.Context, trace_id: str, scope: dict[str, str]) -> list[dict[str, Any]]:
    """Every span of a trace, a page at a time: any tenant that learns a trace id may send spans into it, as many
    as make the whole trace more than one reply carries (it was then unreadable, however few were its own)."""
    rows: list[dict[str, Any]] = []
    page = TRACE_PAGE
    while True:
        try:
            got = _query(ctx, "trace", trace_id=trace_id, offset=len(rows), limit=page, **scope)
        except ReplyTooLarge as exc:
            if page == 1:
                raise ReplyTooLarge(f"{exc.message}: one span of trace {trace_id} is that large; --tenant T shows "
                                    "one tenant's spans") from None
            page //= 2
            continue
        rows.extend(got)
        if len(got) < page:
            return rows


@cli.command()
@click.argument("trace_id", required=False)
@click.option("--release", help="Traces touching this release, as its tenant sees them (see --tenant).")
@click.option("--service", help="Only traces that passed through this lockgate service (e.g. router; its own spans, "
                                "never a span an application sent naming itself so), of the release with --release.")
@click.option("--tenant", help="Only this tenant's spans, and lockgate's own that name no tenant. With --release "
                               "the default is the tenant the release is registered under.")
@click.option("--limit", default=20, type=click.IntRange(min=1), show_default=True)
@json_option
@click.pass_context
@handle_errors
def traces(ctx: click.Context, trace_id: str | None, release: str | None, service: str | None, tenant: str | None,
           limit: int, as_json: bool) -> None:
    """Recent traces, the traces of a release, or every span of one trace, each span with its tenant."""
    scope = {"tenant": tenant} if tenant else {}
    if trace_id:
        rows = _trace_spans(ctx, trace_id, scope)
        output(rows, as_json, title=f"trace {trace_id}" + (f" (tenant {tenant})" if tenant else ""),
               columns=["time", "tenant", "origin", "service", "name", "kind", "duration_ms", "status", "span_id",
                        "parent_span_id", "linked"])
        tenants = sorted({r["tenant"] for r in rows if r.get("tenant")})
        if not tenant and len(tenants) > 1:
            # Any tenant that learns a trace id (it travels in `traceparent`) may send spans into it.
            err_console.print(f"[yellow]note:[/yellow] trace {trace_id} holds spans of {len(tenants)} tenants "
                              f"({', '.join(tenants)}): each span's tenant is the one its sender's key belongs to "
                              "(origin otlp: its service name and attributes are that sender's); --tenant T shows "
                              "one tenant's", highlight=False, soft_wrap=True)
        if rows and all(r.get("service") == "lockgate-sink" and r.get("origin") == "lockgate" for r in rows):
            # A router request traced unsampled leaves only the sink's span of its event: say why, and where it is.
            err_console.print(f"[yellow]note:[/yellow] trace {trace_id} holds only the sink's span: the router "
                              "records a request's span only when it is sampled (LOCKGATE_TRACE_SAMPLE_RATIO, 0.1 by "
                              "default; a request with a sampled `traceparent` always is). Its inference event is "
                              "stored either way: lockgate sql \"SELECT time, deployment, model, status, input_tokens, "
                              "output_tokens, latency_ms FROM inference_events WHERE trace_id = "
                              f"'{trace_id.strip().lower()}'\"", highlight=False, soft_wrap=True)
    elif release:
        rows = _listing(ctx, "traces_for_release", release=release, limit=limit, service=service, **scope)
        output(rows if as_json else _summaries(rows), as_json,
               title=f"traces of {release}" + (f" through {service}" if service else "")
               + (f" (tenant {tenant})" if tenant else ""))
    else:
        rows = _listing(ctx, "recent_traces", limit=limit, service=service, **scope)
        title = "recent traces" + (f" (tenant {tenant})" if tenant else "")
        if not as_json:
            # The listing leaves out traces starting after now (a sender may time spans an hour ahead): say so.
            ahead = _query(ctx, "traces_ahead", service=service, **scope)
            if ahead and ahead[0]["traces"]:
                title += (f"; {ahead[0]['traces']} trace(s) starting after now left out (the first at "
                          f"{ahead[0]['first']}): their senders timed them ahead")
        output(rows if as_json else _summaries(rows), as_json, title=title)


def _summaries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A trace listing as a table shows it: each service a quoted entry of its own, so an application's service
    named `lockgate-router,lockgate-sink,shop` never reads as lockgate's router and sink beside its own `shop`."""
    return [r | {"services": entries(r.get("services") or [])} for r in rows]


def _listing(ctx: click.Context, name: str, **args: Any) -> Any:
    """A listing of traces; one more than a reply carries is said with the options that make it smaller."""
    try:
        return _query(ctx, name, **args)
    except ReplyTooLarge as exc:
        raise ReplyTooLarge(f"{exc.message}: pass a smaller --limit, or --tenant T") from None


@cli.command()
@click.option("--release", help="Only this release.")
@click.option("--limit", default=20, type=click.IntRange(min=1), show_default=True)
@json_option
@click.pass_context
@handle_errors
def decisions(ctx: click.Context, release: str | None, limit: int, as_json: bool) -> None:
    """Gate decisions and their audit trail, newest first."""
    rows = _query(ctx, "decisions", release=release, limit=limit)
    if as_json:
        output(rows, True)
        return
    flat = []
    for r in rows:
        rules = r.get("rules")
        if isinstance(rules, str):
            try:
                rules = json.loads(rules)
            except ValueError:
                rules = []
        failed = [x.get("rule", "?") for x in rules or [] if x.get("verdict") != "PASS"]
        flat.append({k: r.get(k) for k in ("time", "release", "action", "decision", "actor", "eval_run")}
                    | {"failing rules": ", ".join(failed) or "-", "reason": r.get("reason", "")})
    output(flat, False, title="gate decisions")


@cli.command()
@click.option("--deployment", help="Only this deployment.")
@click.option("--tenant", help="Only reports of this tenant's events.")
@click.option("--limit", default=30, type=click.IntRange(min=1), show_default=True)
@json_option
@click.pass_context
@handle_errors
def drift(ctx: click.Context, deployment: str | None, tenant: str | None, limit: int, as_json: bool) -> None:
    """Drift reports per deployment and feature, each of one tenant's events."""
    from lockgate.contracts.names import check_name

    # A name no event can carry is a mistake, refused as `rollout get` refuses it: before, an empty listing, exit 0.
    for value, kind in ((deployment, "deployment"), (tenant, "tenant")):
        if value is not None:
            check_name(value, kind)
    reports = _query(ctx, "drift_reports", deployment=deployment, limit=limit, **({"tenant": tenant} if tenant else {}))
    if as_json:
        output(reports, True)
        return
    # Which releases a canary-vs-stable row compares, and its window's start and end (folding between them, so the
    # table stays narrow): with several canaries of one deployment a DRIFT row is tied to its canary by them (before,
    # probe p61 F5, only `--json` said). `n`: the reference's and the window's sizes.
    rows = [{"time": r.get("time"), "tenant": r.get("tenant"), "deployment": r.get("deployment"),
             "comparison": r.get("comparison") or "now_vs_reference", "releases": _compared(r),
             "window": (r.get("window_start"), r.get("window_end")), "n": f"{r.get('reference_n')} vs "
             f"{r.get('current_n')}", "events": "served" if r.get("served") else "app's own",
             "feature": f.get("feature"), "psi": f.get("psi"), "test": _drift_test(f),
             "reference_mean": f.get("reference_mean"), "current_mean": f.get("current_mean"),
             "drifted": "DRIFT" if f.get("drifted") else "-"}
            for r in reports for f in r.get("features", [])]
    output(rows, False, title="drift reports (DRIFT: the feature's test found drift and PSI >= the threshold; "
                              "only reports of served events move traffic)")


def _compared(report: dict) -> str:
    """`shop-v2 vs shop-v1`: the release whose window a report compares, and the one it compares it with."""
    release, reference = report.get("release") or "", report.get("reference_release") or ""
    return f"{release} vs {reference}" if release or reference else "-"


def _drift_test(f: dict) -> str:
    """`z p=0.003 (alpha 0.05)` or `wasserstein 0.4 (drift at >= 0.1)`: the test chosen for the feature, its
    figure and the bound its verdict compares it with (before, `z p=1 (<0.05)` read as "p=1, which is < 0.05")."""
    if not f.get("test"):  # a report from before the test selection: the kind's own test (drift_reports names it)
        for test, key in (("ks", "ks_pvalue"), ("chi_squared", "chi2_pvalue")):
            if f.get(key) is not None:
                return f"{test} p={f[key]:.3g}"
        return "-"
    if f.get("p_value") is not None:
        return f"{f['test']} p={f['p_value']:.3g} (alpha {f.get('threshold'):g})"
    return f"{f['test']} {f.get('statistic'):.3g} (drift at >= {f.get('threshold'):g})"


@cli.command()
@click.option("--by", default="tenant,app,deployment,day", show_default=True,
              help="Comma-separated grouping: tenant, app, deployment, release, model, day. A deployment or release "
                   "is grouped with the app whose calls named it, and an app, deployment or release with its tenant "
                   "(an event names any: another tenant's or app's calls naming one are that sender's row).")
@click.option("--tenant", help="Only this tenant.")
@json_option
@click.pass_context
@handle_errors
def cost(ctx: click.Context, by: str, tenant: str | None, as_json: bool) -> None:
    """Spend rolled up from the cost ledger."""
    groups = [g.strip() for g in by.split(",") if g.strip()]
    rows = _query(ctx, "cost_rollup", by=groups, tenant=tenant)
    figures = ["calls", "input_tokens", "output_tokens", "cost_usd", "unpriced_calls"]
    # The groups as the query made them: `tenant` is added before an app, deployment or release, `app` before a
    # deployment or release.
    made = [c for c in rows[0] if c not in {*figures, "cached_tokens", "tokens"}] if rows else groups
    output(rows, as_json, title="cost (USD)", columns=None if as_json else [*made, *figures])


@cli.command()
@click.argument("deployment")
@click.option("--at", "at", metavar="TIME", help="ISO 8601 time (UTC unless it carries an offset); default now.")
@click.option("--limit", default=20, type=click.IntRange(min=1), show_default=True, help="How many changes up to TIME to list.")
@json_option
@click.pass_context
@handle_errors
def history(ctx: click.Context, deployment: str, at: str | None, limit: int, as_json: bool) -> None:
    """What served a deployment at a time (releases and weights), and the rollout changes up to then;
    given APP/ALIAS, what the alias pointed to then, from its signed history."""
    from lockgate.contracts.names import check_name
    from lockgate.errors import ConfigError

    if "/" in deployment:  # APP/ALIAS: what the alias pointed to (lockgate.cli.provenance)
        from lockgate.cli.provenance import alias_history

        alias_history(ctx, deployment, at, limit, as_json)
        return
    check_name(deployment, "deployment")
    when = None
    if at:
        try:
            parsed = dt.datetime.fromisoformat(at)
        except ValueError:
            raise ConfigError(f"--at {at!r} is not an ISO 8601 time (e.g. 2026-12-03T09:30:00Z)") from None
        when = (parsed.astimezone(dt.UTC) if parsed.tzinfo else parsed).replace(tzinfo=None).isoformat()
    view = _query(ctx, "serving_history", deployment=deployment, at=when, limit=limit)
    if as_json:
        output(view, True)
        return
    serving = view.get("serving")
    moment = f"at {view['at']} UTC" if view.get("at") else "now"
    if serving is None:
        err_console.print(f"nothing served {deployment} {moment}: no rollout change recorded before then")
    else:
        shares = ", ".join(f"{r} {w:g}%" for r, w in serving["weights"].items())
        err_console.print(f"[bold]{deployment}[/bold] {moment}: {shares} ({serving['phase']} since "
                          f"{serving['since']})", highlight=False)
    output(view.get("history", []), False, title="rollout changes up to then, newest first", empty="no changes",
           columns=["time", "phase", "stable_release", "canary_release", "canary_weight", "reason"])


@cli.command()
@click.option("--origin", help="Only letters from this origin (service).")
@click.option("--limit", default=20, type=click.IntRange(min=1), show_default=True)
@click.option("--original", metavar="NAME",
              help="Write the whole original of a letter whose payload was cut (its `original` column), scrubbed, "
                   "to stdout (or --out); kept as long as the dead-letter stream's age (30 days).")
@click.option("--out", type=click.Path(dir_okay=False), help="With --original: write to this file instead of stdout.")
@json_option
@click.pass_context
@handle_errors
def dlq(ctx: click.Context, origin: str | None, limit: int, original: str | None, out: str | None,
        as_json: bool) -> None:
    """Dead letters: messages that could not be processed, with the reason."""
    if original is None:
        output(_query(ctx, "dead_letters", origin=origin, limit=limit), as_json, title="dead letters")
        return
    from lockgate.cli.access import with_bus
    from lockgate.errors import NotFound

    async def read(bus: Any) -> bytes | None:
        return await bus.original(original)

    data = with_bus(_settings(ctx), read)
    if data is None:
        days = Subjects(_settings(ctx).prefix).streams["dlq"].max_age_s / 86400
        raise NotFound(f"dead-letter original {original} is no longer stored (kept {days:g} days, or no letter "
                       "names it): its letter's payload holds the first 256 KiB")
    if out:
        _write_out(out, data)
    else:
        click.get_binary_stream("stdout").write(data)



def _write_out(out: str, data: bytes) -> None:
    """Write `--out`: a missing directory or no permission is a usage error in one line, as `--out` naming a directory
    is (click's check); before, a traceback (probe p70 F3)."""
    try:
        with open(out, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise click.BadParameter(f"cannot write {out}: {exc.strerror or exc}", param_hint="'--out'") from None


@cli.command()
@click.argument("query")
@json_option
@click.pass_context
@handle_errors
def sql(ctx: click.Context, query: str, as_json: bool) -> None:
    """Run one read-only SELECT or DESCRIBE on lockgate's ClickHouse (writes and file/network functions refused)."""
    output(_query(ctx, "sql", query=query), as_json)


@cli.command()
@click.option("--out", type=click.Path(dir_okay=False), help="Write to a file instead of stdout.")
@handle_errors
def schema(out: str | None) -> None:
    """JSON Schema of every event type, generated from the contracts."""
    from lockgate.contracts import json_schema

    text = json.dumps(json_schema(), indent=2)
    if out:
        _write_out(out, (text + "\n").encode())
    else:
        click.echo(text)


def _register_subcommands() -> None:
    from lockgate.cli import (
        appcreds,
        attest,
        audit,
        budget,
        gate,
        gitops,
        identity,
        keys,
        lineage,
        provenance,
        rollout,
        scores,
        stack,
        status,
        topology,
        workflow,
    )

    stack.register(cli)
    status.register(cli)
    workflow.register(cli)
    gate.register(cli)
    identity.register(cli)
    keys.register(cli)
    appcreds.register(cli)
    audit.register(cli)
    rollout.register(cli)
    gitops.register(cli)
    budget.register(cli)
    provenance.register(cli)  # after workflow: it adds `artifact deprecate`
    lineage.register(cli)
    attest.register(cli)
    scores.register(cli)  # online evaluation scores of live answers
    topology.register(cli)
    # Plugins (the dev tools' `dev up`, `sim` and `demo`) add commands without the CLI importing them.
    for ep in entry_points(group="lockgate.cli"):
        ep.load()(cli)


_register_subcommands()


def main() -> None:
    """Console entry point."""
    cli(prog_name="lockgate")
