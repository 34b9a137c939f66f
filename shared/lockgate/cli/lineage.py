"""`lockgate lineage REF [--at T]` and `lockgate lineage export --format openlineage [--url URL]`."""

from __future__ import annotations

from typing import Any

import click

from lockgate.cli.provenance_time import parse_time
from lockgate.cli.render import emit_json, err_console, output
from lockgate.cli.root import handle_errors, json_option
from lockgate.errors import LockgateError
from lockgate.redact import shown_url


class LineageSendFailed(LockgateError):
    """The OpenLineage endpoint did not accept an event."""


def post_events(url: str, events: list[dict[str, Any]], timeout_s: float = 10.0) -> None:
    """POST each RunEvent as JSON to an OpenLineage HTTP endpoint (the HTTP transport's wire format)."""
    import json
    import urllib.error
    import urllib.request

    for event in events:
        req = urllib.request.Request(url, data=json.dumps(event, default=str).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            raise LineageSendFailed(f"{shown_url(url)} refused OpenLineage event {event['run']['runId']} "
                                    f"({exc.code} {exc.reason})") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as exc:
            raise LineageSendFailed(f"cannot send OpenLineage events to {shown_url(url)}: {getattr(exc, 'reason', exc)}") from None


def _endpoint_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """`--url` as an http(s) URL, checked before anything is read or printed: before, a URL urllib cannot open
    (`notaurl`, `http://[::1`) failed with a traceback after every event was printed (probe p70 F1)."""
    import urllib.parse

    if not value:
        return value
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - reading it checks the port
    except ValueError as exc:
        raise click.BadParameter(f"{shown_url(value)!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"{shown_url(value)!r} is not an http:// or https:// URL with a host "
                                 "(e.g. http://host:5000/api/v1/lineage)")
    return value


def _bound(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else "?"


def metric_cells(metrics: dict[str, float], intervals: dict[str, Any]) -> str:
    """An outcome's metrics with their intervals, `accuracy 0.82 [0.74, 0.88]; latency_ms_p95 120`: a bound the
    sample could not estimate reads `?`, a metric stored without an interval (before migration 022) its value
    alone."""
    cells = []
    for name, value in sorted(metrics.items()):
        ci = intervals.get(name)
        span = f" [{_bound(ci.get('low'))}, {_bound(ci.get('high'))}]" if isinstance(ci, dict) else ""
        cells.append(f"{name} {value:.4g}{span}")
    return "; ".join(cells)


class _DefaultShow(click.Group):
    """`lockgate lineage REF ...` means `lockgate lineage show REF ...`; `lineage export` is the export."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["show", *args]
        return super().parse_args(ctx, args)


def register(cli: click.Group) -> None:
    """Attach `lineage` (show, the default, and export)."""

    @cli.group(cls=_DefaultShow)
    def lineage() -> None:
        """Lineage of a release, artifact, run or decision (`lineage REF [--at T]`), or its OpenLineage export."""

    @lineage.command("show")
    @click.argument("ref")
    @click.option("--depth", default=4, show_default=True)
    @click.option("--at", "at", metavar="TIME", help="The graph as it was at this ISO 8601 time; default now.")
    @json_option
    @click.pass_context
    @handle_errors
    def show(ctx: click.Context, ref: str, depth: int, at: str | None, as_json: bool) -> None:
        """Upstream and downstream of a release, artifact hash, run or decision."""
        from lockgate.cli import access

        root = ctx.find_root()
        when = parse_time(at)
        args: dict[str, Any] = {"ref": ref, "depth": depth, **({"at": when} if when else {})}
        view = access.query(root.obj["settings"], "lineage", direct=root.obj["direct"], **args)
        if as_json:
            output(view, True)
            return
        moment = f" at {when.isoformat()}" if when else ""
        err_console.print(f"[bold]{view.get('node', ref)}[/bold] ({view.get('kind', '?')}){moment}", highlight=False)
        output(view.get("upstream", []), False, title="upstream (what it came from)", empty="no upstream")
        output(view.get("downstream", []), False, title="downstream (what used it)", empty="no downstream")
        if view.get("outcomes"):
            rows = [{"time": o["time"], "release": o["release"], "run": o["run_id"], "status": o["status"],
                     "metrics": metric_cells(o.get("metrics") or {}, o.get("intervals") or {}),
                     "decision": o.get("decision") or "-"} for o in view["outcomes"]]
            output(rows, False, title="eval outcomes that used it (data version -> outcome)")

    @lineage.command("export")
    @click.option("--format", "fmt", type=click.Choice(["openlineage"]), default="openlineage", show_default=True)
    @click.option("--release", help="Only the eval runs and decisions of this release.")
    @click.option("--since", metavar="TIME", help="Only runs and decisions at or after this ISO 8601 time.")
    @click.option("--until", metavar="TIME", help="Only runs and decisions at or before this ISO 8601 time.")
    @click.option("--limit", default=100, type=click.IntRange(min=1), show_default=True,
                  help="At most this many runs and decisions each.")
    @click.option("--namespace", default="", help="OpenLineage namespace (default lockgate://PREFIX).")
    @click.option("--facet-schemas", is_flag=True, help="Print the JSON Schemas of lockgate's facets instead.")
    @click.option("--url", default="", callback=_endpoint_url, help="Also POST each event to this OpenLineage HTTP endpoint (Marquez: "
                                            "http://host:5000/api/v1/lineage).")
    @click.pass_context
    @handle_errors
    def export(ctx: click.Context, fmt: str, release: str | None, since: str | None, until: str | None,
               limit: int, namespace: str, facet_schemas: bool, url: str) -> None:
        """Eval runs, gate decisions, releases and rollouts as OpenLineage RunEvents, one JSON object per line."""
        import json

        from lockgate.cli import access
        from lockgate.provenance import openlineage

        if facet_schemas:
            emit_json(openlineage.FACET_SCHEMAS)
            return
        root = ctx.find_root()
        settings = root.obj["settings"]
        args: dict[str, Any] = {"limit": limit}
        for key, value in (("release", release), ("since", parse_time(since, "--since")),
                           ("until", parse_time(until, "--until"))):
            if value:
                args[key] = value
        found = access.query(settings, "lineage_export", direct=root.obj["direct"], **args)
        events = openlineage.events(found, namespace or f"lockgate://{settings.prefix}")
        for event in events:
            click.echo(json.dumps(event, sort_keys=True, default=str))
        if url:
            post_events(url, events)
            err_console.print(f"sent {len(events)} events to {shown_url(url)}", highlight=False)
