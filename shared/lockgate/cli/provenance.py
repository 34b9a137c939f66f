"""`lockgate alias`, `lockgate artifact deprecate` and `history APP/ALIAS`: signed provenance from the CLI.

Changes are signed with the personal identity (`--as NAME`, `lockgate identity create`) of a person the
trust file knows as operator or admin; reads verify every record of a history against the trust file.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import click

from lockgate.cli.access import chosen_role, with_bus
from lockgate.cli.main import handle_errors, json_option
from lockgate.cli.render import console, emit_json, err_console, output
from lockgate.errors import ConfigError, LockgateError


def parse_time(value: str | None, option: str = "--at") -> dt.datetime | None:
    """An ISO 8601 time as aware UTC (UTC unless it carries an offset); ConfigError naming the option."""
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{option} {value!r} is not an ISO 8601 time (e.g. 2026-12-03T09:30:00Z)") from None
    return parsed.astimezone(dt.UTC) if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _row(r: Any, signer: str = "") -> dict[str, Any]:
    return {"time": r.time.isoformat(), "app": r.app, "alias": r.alias, "release": r.release,
            "previous": r.previous or "-", "seq": r.seq, "signed_by": signer or r.actor, "key_id": r.key_id,
            "origin": r.origin, "reason": r.reason}


def split_alias(ref: str) -> tuple[str, str]:
    """`APP/ALIAS` -> (app, alias); ConfigError otherwise."""
    app, sep, alias = ref.partition("/")
    if not sep or not app or not alias:
        raise ConfigError(f"{ref!r} is not APP/ALIAS (e.g. shop/production)")
    return app, alias


def alias_history(ctx: click.Context, ref: str, at: str | None, limit: int, as_json: bool) -> None:
    """`lockgate history APP/ALIAS [--at T]`: what the alias pointed to then, and its verified changes."""
    from lockgate.provenance import aliases

    app, alias = split_alias(ref)
    when = parse_time(at)
    settings = ctx.obj["settings"]
    current, upto, signers = with_bus(settings, lambda bus: aliases.pointed_at(bus, settings, app, alias, when))
    rows = [_row(r, s) for r, s in zip(upto, signers, strict=True)][::-1][:max(1, limit)]
    view = {"alias": ref, "at": when, "release": current.release if current else None,
            "since": current.time if current else None, "history": rows}
    if as_json:
        emit_json(view)
        return
    moment = f"at {when.isoformat()}" if when else "now"
    if current is None:
        err_console.print(f"{ref} pointed to nothing {moment}: no change recorded before then", highlight=False)
    else:
        err_console.print(f"[bold]{ref}[/bold] {moment}: {current.release} (since {current.time.isoformat()}, "
                          f"set by {signers[len(upto) - 1]})", highlight=False)
    output(rows, False, title="alias changes up to then, newest first (signatures verified)", empty="no changes",
           columns=["time", "release", "previous", "seq", "signed_by", "origin", "reason"])


def register(cli: click.Group) -> None:
    """Attach `alias`, `lineage`, `attest` and `artifact deprecate`."""
    register_lineage(cli)
    register_attest(cli)

    @cli.group()
    def alias() -> None:
        """Aliases per app (production, staging ...) pointing to releases, with a signed history."""

    @alias.command("set")
    @click.argument("app")
    @click.argument("name")
    @click.argument("release")
    @click.option("--reason", default="", help="Why (kept in the signed record and the audit log).")
    @json_option
    @click.pass_context
    @handle_errors
    def alias_set(ctx: click.Context, app: str, name: str, release: str, reason: str, as_json: bool) -> None:
        """Point APP's alias NAME at RELEASE (signed with your identity, audited, appended to its history)."""
        from lockgate.cli.identity import chosen_identity
        from lockgate.provenance import aliases

        settings = ctx.obj["settings"]
        identity = chosen_identity(ctx)
        role = chosen_role("operator")
        record, findings = with_bus(settings, lambda bus: aliases.set_alias(
            bus, settings, identity, app, name, release, reason=reason, audit_as=role), role="operator")
        for f in findings:
            err_console.print(f"[yellow]warning:[/yellow] {f.message()}", highlight=False, soft_wrap=True)
        if as_json:
            emit_json({"changed": record is not None, "record": record})
        elif record is None:
            console.print(f"{app}/{name} already points to {release}", highlight=False)
        else:
            console.print(f"{app}/{name} -> {release} (was {record.previous or 'unset'}; change #{record.seq}, "
                          f"signed by {record.actor})", highlight=False)

    @alias.command("get")
    @click.argument("app")
    @click.argument("name")
    @click.option("--at", "at", metavar="TIME", help="ISO 8601 time; default now.")
    @json_option
    @click.pass_context
    @handle_errors
    def alias_get(ctx: click.Context, app: str, name: str, at: str | None, as_json: bool) -> None:
        """The release APP's alias NAME points to (at TIME), its history verified."""
        from lockgate.errors import NotFound
        from lockgate.provenance import aliases

        settings = ctx.obj["settings"]
        when = parse_time(at)
        current, _, signers = with_bus(settings, lambda bus: aliases.pointed_at(bus, settings, app, name, when))
        if current is None:
            raise NotFound(f"alias {app}/{name} points to nothing {'at ' + when.isoformat() if when else 'yet'} "
                           f"(`lockgate alias set {app} {name} RELEASE`)")
        if as_json:
            emit_json(_row(current, signers[current.seq - 1]))
        else:
            console.print(current.release, highlight=False)

    @alias.command("list")
    @click.argument("app", required=False)
    @json_option
    @click.pass_context
    @handle_errors
    def alias_list(ctx: click.Context, app: str | None, as_json: bool) -> None:
        """Every alias (of APP) and the release it points to now."""
        from lockgate.provenance import aliases

        settings = ctx.obj["settings"]
        records = with_bus(settings, lambda bus: aliases.list_aliases(bus, settings, app))
        output([_row(r) for r in records], as_json, title="aliases (signatures verified)", empty="no aliases",
               columns=None if as_json else ["app", "alias", "release", "time", "signed_by", "seq"])

    artifact = cli.commands.get("artifact")
    if not isinstance(artifact, click.Group):
        return

    @artifact.command("deprecate")
    @click.argument("digest")
    @click.option("--successor", default="", help="The artifact hash that replaces it (named in refusals).")
    @click.option("--sunset", default="", metavar="TIME",
                  help="ISO 8601 time after which releases using it may not be promoted.")
    @click.option("--reason", default="")
    @json_option
    @click.pass_context
    @handle_errors
    def artifact_deprecate(ctx: click.Context, digest: str, successor: str, sunset: str, reason: str,
                           as_json: bool) -> None:
        """Deprecate an artifact version (signed, audited): a warning now, a refusal after --sunset."""
        from lockgate.cli.identity import chosen_identity
        from lockgate.provenance import lifecycle

        settings = ctx.obj["settings"]
        identity = chosen_identity(ctx)
        when = parse_time(sunset, "--sunset")
        role = chosen_role("operator")
        record = with_bus(settings, lambda bus: lifecycle.deprecate(
            bus, settings, identity, digest, successor=successor, sunset=when, reason=reason, audit_as=role),
            role="operator")
        if as_json:
            emit_json(record)
        else:
            console.print(f"{digest} deprecated{' until ' + when.isoformat() if when else ''}"
                          f"{'; successor ' + successor if successor else ''} (signed by {record.actor})",
                          highlight=False)


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
            raise LineageSendFailed(f"{url} refused OpenLineage event {event['run']['runId']} "
                                    f"({exc.code} {exc.reason})") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as exc:
            raise LineageSendFailed(f"cannot send OpenLineage events to {url}: {getattr(exc, 'reason', exc)}") from None


class _DefaultShow(click.Group):
    """`lockgate lineage REF ...` means `lockgate lineage show REF ...`; `lineage export` is the export."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["show", *args]
        return super().parse_args(ctx, args)


def register_lineage(cli: click.Group) -> None:
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
                     "metrics": ", ".join(f"{k}={v:.4g}" for k, v in sorted((o.get("metrics") or {}).items())),
                     "decision": o.get("decision") or "-"} for o in view["outcomes"]]
            output(rows, False, title="eval outcomes that used it (data version -> outcome)")

    @lineage.command("export")
    @click.option("--format", "fmt", type=click.Choice(["openlineage"]), default="openlineage", show_default=True)
    @click.option("--release", help="Only the eval runs and decisions of this release.")
    @click.option("--since", metavar="TIME", help="Only runs and decisions at or after this ISO 8601 time.")
    @click.option("--until", metavar="TIME", help="Only runs and decisions at or before this ISO 8601 time.")
    @click.option("--limit", default=100, show_default=True, help="At most this many runs and decisions each.")
    @click.option("--namespace", default="", help="OpenLineage namespace (default lockgate://PREFIX).")
    @click.option("--facet-schemas", is_flag=True, help="Print the JSON Schemas of lockgate's facets instead.")
    @click.option("--url", default="", help="Also POST each event to this OpenLineage HTTP endpoint (Marquez: "
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
            err_console.print(f"sent {len(events)} events to {url}", highlight=False)


def _write(doc: dict[str, Any], out: str | None) -> None:
    import json

    text = json.dumps(doc, indent=2, sort_keys=True)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
        err_console.print(f"wrote {out}", highlight=False)
    else:
        click.echo(text)


def register_attest(cli: click.Group) -> None:
    """Attach `attest decision|release|verify`."""

    @cli.group()
    def attest() -> None:
        """in-toto attestations (DSSE envelopes) of gate decisions and releases, verified offline."""

    out_option = click.option("--out", type=click.Path(dir_okay=False), help="Write to a file, not stdout.")

    @attest.command("decision")
    @click.argument("release")
    @out_option
    @click.pass_context
    @handle_errors
    def attest_decision(ctx: click.Context, release: str, out: str | None) -> None:
        """The release's current gate decision as a signed in-toto Statement (subject: the release bundle)."""
        from lockgate import artifacts
        from lockgate.cli.gate import current_decision
        from lockgate.cli.identity import chosen_identity
        from lockgate.provenance import attest as at
        from lockgate.queryclient import ask
        from lockgate.signing import Keyring

        settings = ctx.obj["settings"]
        identity = chosen_identity(ctx)

        async def work(bus: Any) -> dict[str, Any]:
            decision = await current_decision(bus, release)
            Keyring.from_settings(settings).verify(decision)  # never attest a decision the trust roots refuse
            found = await ask(bus, "lineage_export", {"release": release, "limit": 1000})
            run = next((e for e in found["evals"] if e["run_id"] == decision.eval_run), None)
            return at.envelope(at.decision_statement(decision, await artifacts.release_of(bus, release), run),
                               identity)

        _write(with_bus(settings, work), out)

    @attest.command("release")
    @click.argument("release")
    @out_option
    @click.pass_context
    @handle_errors
    def attest_release(ctx: click.Context, release: str, out: str | None) -> None:
        """What the release is made of, as a signed in-toto Statement."""
        from lockgate import artifacts
        from lockgate.cli.identity import chosen_identity
        from lockgate.provenance import attest as at

        settings = ctx.obj["settings"]
        identity = chosen_identity(ctx)

        async def work(bus: Any) -> dict[str, Any]:
            return at.envelope(at.release_statement(await artifacts.release_of(bus, release)), identity)

        _write(with_bus(settings, work), out)

    @attest.command("verify")
    @click.argument("path", type=click.Path(dir_okay=False))
    @click.option("--key", "keys", multiple=True, type=click.Path(exists=True, dir_okay=False),
                  help="Also trust this PEM public key for the decision's signature (repeatable).")
    @json_option
    @click.pass_context
    @handle_errors
    def attest_verify(ctx: click.Context, path: str, keys: tuple[str, ...], as_json: bool) -> None:
        """Check an attestation offline against the trust file: who signed the envelope, that the subject is
        the release it describes, and (for a decision) the gatekeeper's signature. Exit 4 if anything fails."""
        import json

        from lockgate.identity import verify_person
        from lockgate.provenance import attest as at
        from lockgate.signing import Keyring

        settings = ctx.obj["settings"]
        try:
            with open(path, "rb") as fh:
                env = json.loads(fh.read())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except ValueError:
            raise at.AttestationRefused(f"{path} is not JSON (a DSSE envelope)") from None
        if not isinstance(env, dict):
            raise at.AttestationRefused(f"{path} is not a DSSE envelope")
        ring = Keyring.from_settings(settings)
        if keys:
            ring = ring.merge(Keyring.from_pem_files(keys))

        def signer(kid: str, sig: str, data: bytes) -> str:
            return verify_person(settings, kid, sig, data, roles=(), what="the attestation", allow_revoked=False)

        result = at.verify(env, signer, ring.verify)
        if as_json:
            emit_json({k: v for k, v in result.items() if k != "statement"}
                      | {"predicateType": result["statement"]["predicateType"],
                         "subject": result["statement"]["subject"]})
            return
        what = f"decision {result['decision']} for" if "decision" in result else "release"
        extra = f"; decision signed by key {result['decision_key']}" if "decision_key" in result else ""
        console.print(f"verified: {what} {result['release']}, attested by {', '.join(result['signed_by'])}{extra}",
                      highlight=False)

    # The spelling: `lockgate verify FILE` is `lockgate attest verify FILE`.
    cli.add_command(attest_verify, name="verify")
