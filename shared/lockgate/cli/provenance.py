"""`lockgate alias`, `lockgate artifact deprecate` and `history APP/ALIAS`: signed provenance from the CLI.

Changes are signed with the personal identity (`--as NAME`, `lockgate identity create`) of a person the
trust file knows as operator or admin; reads verify every record of a history against the trust file, and say
how many messages on it they skipped (not signed by a trusted person, unreadable, copies, another history's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from lockgate.cli.access import chosen_role, with_bus
from lockgate.cli.provenance_time import parse_time
from lockgate.cli.render import console, emit_json, err_console, output
from lockgate.cli.root import handle_errors, json_option
from lockgate.errors import ConfigError

if TYPE_CHECKING:
    from lockgate.bus import Bus
    from lockgate.signing import Keyring


def _row(r: Any, signer: str = "") -> dict[str, Any]:
    return {"time": r.time.isoformat(), "app": r.app, "alias": r.alias, "release": r.release,
            "previous": r.previous or "-", "seq": r.seq, "signed_by": signer or r.actor, "key_id": r.key_id,
            "origin": r.origin, "reason": r.reason}


def _skipped_row(s: Any) -> dict[str, Any]:
    return {"stream_seq": s.stream_seq, "subject": s.subject, "kind": s.kind, "detail": s.detail}


def warn(message: str) -> None:
    """One warning line on stderr."""
    err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def skipped_warning(skipped: list[Any], where: str, listing: str = "") -> str:
    """The warning for the messages a read skipped ("" for none)."""
    from lockgate.provenance.chain import summary

    if not skipped:
        return ""
    hint = f"; `{listing}` lists them" if listing else ""
    return f"{where}: {summary(skipped)} (no part of it: they change nothing{hint})"


def warn_skipped(skipped: list[Any], where: str, listing: str = "") -> None:
    """One warning line on stderr for the messages a read skipped (none: nothing)."""
    if text := skipped_warning(skipped, where, listing):
        warn(text)


async def move_warnings(bus: Bus, ring: Keyring, app: str, name: str, release: str, findings: list[Any],
                        skipped: list[Any]) -> tuple[list[str], str]:
    """What moving APP's alias NAME to RELEASE warns of, for `alias set` and `apply` alike (probe p29 F6: apply moved
    it without a word): the messages skipped reading its history and its release's artifact lifecycles, each
    deprecated artifact (`aliases.set_alias`'s findings), and a release the gate does not admit. Also returns why the
    gate does not admit it ("" when it does)."""
    from lockgate.cli.gate import not_admitted

    gate = await not_admitted(bus, ring, release)
    warnings = [skipped_warning(skipped, f"the history of {app}/{name} and its release's artifact lifecycles",
                                f"lockgate history {app}/{name} --json"), *(f.message() for f in findings)]
    if gate:
        # Said, not refused: an alias also names what a release under review or a rollback target holds. But an
        # application that fetches its prompt by this alias now serves content the router would not (probe p23
        # F10: `production` moved to a release a person had just rejected, without a word).
        warnings.append(f"{gate}; an application reading {app}/{name} now gets content the gate does not admit")
    return [w for w in warnings if w], gate


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
    current, upto, signers, skipped = with_bus(settings, lambda bus: aliases.pointed_at(bus, settings, app, alias,
                                                                                        when))
    rows = [_row(r, s) for r, s in zip(upto, signers, strict=True)][::-1][:max(1, limit)]
    view = {"alias": ref, "at": when, "release": current.release if current else None,
            "since": current.time if current else None, "history": rows,
            "skipped": [_skipped_row(s) for s in skipped]}
    warn_skipped(skipped, f"the history of {ref}")
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
    """Attach `alias` and `artifact deprecate`."""

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
        from lockgate.signing import Keyring

        settings = ctx.obj["settings"]
        identity = chosen_identity(ctx)
        role = chosen_role("operator")
        ring = Keyring.from_settings(settings)

        async def work(bus: Bus) -> tuple[Any, ...]:
            record, findings, skipped = await aliases.set_alias(bus, settings, identity, app, name, release,
                                                                reason=reason, audit_as=role)
            return record, *await move_warnings(bus, ring, app, name, release, findings, skipped)

        record, warnings, gate = with_bus(settings, work, role="operator")
        for warning in warnings:
            warn(warning)
        if as_json:
            emit_json({"changed": record is not None, "record": record, "admitted": not gate,
                       **({"not_admitted": gate} if gate else {}), "warnings": warnings})
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
        current, _, signers, skipped = with_bus(settings, lambda bus: aliases.pointed_at(bus, settings, app, name,
                                                                                         when))
        warn_skipped(skipped, f"the history of {app}/{name}", f"lockgate history {app}/{name} --json")
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
        records, skipped = with_bus(settings, lambda bus: aliases.list_aliases(bus, settings, app))
        warn_skipped(skipped, f"the alias histories{' of ' + app if app else ''}")
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
        record, skipped = with_bus(settings, lambda bus: lifecycle.deprecate(
            bus, settings, identity, digest, successor=successor, sunset=when, reason=reason, audit_as=role),
            role="operator")
        warn_skipped(skipped, f"the lifecycle of {digest}")
        if as_json:
            emit_json(record)
        else:
            console.print(f"{digest} deprecated{' until ' + when.isoformat() if when else ''}"
                          f"{'; successor ' + successor if successor else ''} (signed by {record.actor})",
                          highlight=False)
