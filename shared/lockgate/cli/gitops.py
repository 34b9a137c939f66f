"""`lockgate plan DIR` and `lockgate apply DIR`: a folder of YAML in Git is the truth.

Exit codes fit CI: plan exits 0 when there is nothing to do, 2 when changes are planned, 1 on any
error (an invalid file, a release name bound to other content, no stack); apply exits 0 or 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.text import Text

from lockgate.cli.access import chosen_role, with_bus
from lockgate.cli.render import console, emit_json, err_console, table
from lockgate.cli.root import handle_errors, json_option
from lockgate.errors import LockgateError

if TYPE_CHECKING:
    from lockgate.identity import Identity

_MARK = {"add": Text("+ add", "green"), "change": Text("~ change", "yellow"), "unchanged": Text("= unchanged", "dim"),
         "remove": Text("- remove", "red"), "orphan": Text("? not in folder", "dim")}
_DRIFT = Text("~ drift", "yellow")


def _ci_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure exits 1 in one line: 2 means "changes planned" here, whatever the error's own code."""
    return handle_errors(func, exit_code=1)


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def _serves(release: str, app: str) -> str:
    return f"{release} of app {app}" if app else release


def _rows(plan: Any) -> list[dict[str, str | Text]]:
    rows = []
    for s in plan.steps:
        if s.drift and s.kind == "alias":  # moved outside Git: apply points it back at the folder's release
            mark, what, release = _DRIFT, f"live {s.previous_release}, folder {s.release}", \
                f"{s.previous_release} -> {s.release}"
        elif s.action == "change":
            mark, what = _MARK[s.action], f"{_short(s.previous)} -> {_short(s.digest)}"
            release = f"{s.previous_release} -> {s.release}" if s.release != s.previous_release else s.release
        else:
            mark, what, release = _MARK[s.action], _short(s.digest or s.previous), s.release or s.previous_release
        if s.unread:
            what += " (live route not compared: see below)"
        commit = (s.commit[:10] + (" (dirty)" if s.dirty else "")) if s.commit else (
            "(no commit)" if s.action in ("unchanged", "orphan", "remove") else "")
        row = {"kind": s.kind, "name": s.name, "file": s.source, "applied at commit": commit}
        # A deployment whose live route differs from its document: one row per field (apply moves no traffic), after
        # the row of what apply does to its entry, if anything.
        if not (s.differences and s.action == "unchanged"):
            rows.append({"action": mark, **row, "release": release, "content": what})
        live = f"live {s.previous_release}, folder {s.release}" if s.previous_release != s.release else s.release
        rows += [{"action": _DRIFT, **row, "release": live, "content": f"{d.field}: live {d.live}, folder {d.folder}"}
                 for d in s.differences]
    return [{k: r[k] for k in ("action", "kind", "name", "release", "content", "file", "applied at commit")}
            for r in rows]


def _summary(plan: Any) -> dict[str, int]:
    # drift: deployments whose live route differs from their document (an alias moved is a change)
    return {**{a: plan.count(a) for a in ("add", "change", "remove", "unchanged", "orphan")},
            "drift": sum(1 for s in plan.steps if s.drift and s.kind == "deployment")}


def _print(plan: Any, prov: Any, title: str, hidden: list[str]) -> None:
    where = f"commit {prov.commit[:10]}{' (dirty)' if prov.dirty else ''}" if prov.commit else "not in Git"
    table(_rows(plan), title=f"{title} ({where})", empty="the folder holds no documents")
    for s in plan.steps:
        if s.drift and s.kind == "deployment":
            _print_differences(s)
        elif s.unread:
            console.print(f"? deployment {s.name}: its live route was not compared with the folder: {s.unread}",
                          highlight=False, soft_wrap=True)
        elif s.drift:
            console.print(f"~ alias {s.name}: live {s.previous_release}, folder {s.release} (moved outside Git; "
                          "apply points it back)", highlight=False, soft_wrap=True)
    n = _summary(plan)
    line = f"{n['add']} to add, {n['change']} to change, {n['remove']} to remove, {n['unchanged']} unchanged"
    if n["drift"]:
        line += (f"; {n['drift']} deployment{'s' if n['drift'] != 1 else ''} whose live route differs from the "
                 "folder (apply moves no traffic)")
    if n["orphan"]:
        line += f"; {n['orphan']} applied before but no longer in the folder (kept; --prune removes them)"
    console.print(line, highlight=False)
    if hidden:
        console.print(f"not read: {len(hidden)} hidden YAML file{'s' if len(hidden) != 1 else ''} (lockgate reads no "
                      f"hidden file or folder; rename one to apply it): {', '.join(hidden)}", highlight=False, soft_wrap=True)


def _print_differences(s: Any) -> None:
    """A drifted deployment's differences below the table, one line each (its stable and app in one)."""
    fields = [d.field for d in s.differences]
    if "stable" in fields or "app" in fields:
        console.print(f"~ deployment {s.name}: live route serves {_serves(s.previous_release, s.live_app)}, folder "
                      f"says {_serves(s.release, s.app)} (apply moves no traffic: roll the folder's release out, or "
                      "change the document to what is served)", highlight=False, soft_wrap=True)
    for d in s.differences:
        if d.field not in ("stable", "app"):
            console.print(f"~ deployment {s.name}: {d.field}: live {d.live}, folder says {d.folder} (apply moves no "
                          "traffic: bring the route to the document, or change the document)",
                          highlight=False, soft_wrap=True)


def _load(directory: str) -> tuple[list[Any], Any, list[str]]:
    """The folder's resolved documents, its Git provenance, and the hidden YAML files it holds but does not read."""
    from lockgate.gitops.documents import hidden_documents, load_folder
    from lockgate.gitops.git import provenance
    from lockgate.gitops.resolve import resolve

    sources = load_folder(directory)
    # The files the plan read: one that Git ignores is in no commit, so the provenance is dirty.
    return (resolve(sources), provenance(directory, reads=[r for s in sources for r in s.reads]),
            hidden_documents(directory))


async def _plan(bus: Any, desired: list[Any], prune: bool, settings: Any) -> Any:
    from lockgate.gitops.plan import diff
    from lockgate.gitops.state import read_aliases, read_bindings, read_serving, read_state

    state = await read_state(bus)
    releases = [r for r in desired if r.kind == "release"]
    bound = await read_bindings(bus, [*{*(r.release for r in releases), *(r.bundle["parent"] for r in releases)} - {""}])
    return diff(desired, state, bound, prune=prune, live=await read_aliases(bus, settings, desired),
                serving=await read_serving(bus, desired))


def _result(plan: Any, prov: Any, hidden: list[str], exit_code: int, **extra: Any) -> dict[str, Any]:
    """The JSON of `plan` or `apply`; `exit_code` is the one the process exits with (apply's is never the plan's 2)."""
    return {"exit_code": exit_code, "summary": _summary(plan), "steps": plan.steps, "errors": plan.errors,
            "git": prov, "not_read": hidden, **extra}


def _signer(ctx: click.Context, directory: str) -> Identity | None:
    """The personal identity that signs the apply of `directory`, or None (unsigned: the NATS identity applies).

    It is checked first, by the recorder's own check against the trust file: the recorder refuses an apply signed by
    a person who may not apply (operator or admin), and refused, what was bound before stays bound (probe p23 F3:
    README's approver, the only identity under the home, made every apply fail after it had bound the releases). One
    chosen (`--as`, LOCKGATE_IDENTITY) is refused so; the only one under the home, not chosen, is left out.
    """
    from lockgate.cli.identity import optional_identity
    from lockgate.identity import IdentityRefused, apply_refusal

    author = optional_identity(ctx)
    refused = apply_refusal(ctx.obj["settings"], author, directory) if author is not None else None
    if refused is None:
        return author
    if ctx.find_root().obj.get("identity"):
        raise IdentityRefused(f"{refused.message}, or apply with --as the identity of an operator or admin")
    err_console.print(f"note: the apply is not signed by {author.name}, the only identity under the home, since the "
                      f"recorder would refuse it: {refused.message}. It goes on unsigned, as with no identity (the "
                      "releases it binds have no author); --as NAME signs it as an operator or admin",
                      highlight=False, soft_wrap=True)
    return None


def register(cli: click.Group) -> None:
    """Attach `plan` and `apply` to the top-level group."""

    prune_option = click.option("--prune", is_flag=True,
                                help="Also remove what earlier applies recorded and the folder no longer holds: "
                                     "its entry in the applied state is deleted (deployments and budgets stop "
                                     "being desired); artifacts and releases themselves stay, being immutable.")

    @cli.command("plan")
    @click.argument("directory", type=click.Path(file_okay=False))
    @prune_option
    @json_option
    @click.pass_context
    @_ci_errors
    def plan_cmd(ctx: click.Context, directory: str, prune: bool, as_json: bool) -> None:
        """What `apply DIR` would add, change, leave or remove; exits 0 nothing to do, 2 changes, 1 error."""
        desired, prov, hidden = _load(directory)
        plan = with_bus(ctx.obj["settings"], lambda bus: _plan(bus, desired, prune, ctx.obj["settings"]),
                         role="viewer")
        if as_json:
            emit_json(_result(plan, prov, hidden, plan.exit_code))
        else:
            _print(plan, prov, f"plan for {directory}", hidden)
            for error in plan.errors:
                err_console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(plan.exit_code)

    @cli.command("apply")
    @click.argument("directory", type=click.Path(file_okay=False))
    @prune_option
    @json_option
    @click.pass_context
    @_ci_errors
    def apply_cmd(ctx: click.Context, directory: str, prune: bool, as_json: bool) -> None:
        """Make the stack hold the folder: register artifacts, bind releases, record deployments and budgets.

        Idempotent (content-addressed: the same content is unchanged). Records the folder's Git commit,
        author and dirty flag on every entry and registration, and announces the apply (ApplyRecorded).
        Signed by the personal identity of --as (refused before anything is bound if the trust file does not make
        it an operator or admin), or by the only one under the home if the trust file does (else unsigned, said on
        stderr). Never moves traffic: start a canary through the router once the gate allows the release.
        """
        from lockgate.cli.provenance import move_warnings, warn
        from lockgate.gitops.state import apply
        from lockgate.signing import Keyring

        settings = ctx.obj["settings"]
        desired, prov, hidden = _load(directory)
        where = str(Path(directory).resolve())
        author = _signer(ctx, where)  # signs the apply and the releases it binds, as `release create --as` does
        warnings: list[str] = []

        keyring = Keyring.from_settings(settings)

        async def work(bus: Any) -> tuple[Any, Any]:
            async def moved(app: str, name: str, release: str, findings: list[Any], skipped: list[Any]) -> None:
                # What `alias set` says of the same move. The alias has moved: a lookup that fails is one more
                # warning, never the apply's failure (the move would go unrecorded).
                try:
                    said, _ = await move_warnings(bus, keyring, app, name, release, findings, skipped)
                except LockgateError as exc:
                    said = [f"{app}/{name} now points to {release}, whose gate decision could not be checked: "
                            f"{exc.message}"]
                warnings.extend(said)

            plan = await _plan(bus, desired, prune, settings)
            if plan.errors:
                return plan, None
            return plan, await apply(bus, plan, desired, prov, directory=where, author=author, settings=settings,
                                     audit_as=chosen_role("operator"), moved=moved)

        plan, event = with_bus(settings, work, role="operator")
        code = 1 if plan.errors else 0
        for warning in warnings:
            warn(warning)
        if as_json:
            emit_json(_result(plan, prov, hidden, code, applied=event is not None, warnings=warnings))
        else:
            _print(plan, prov, f"apply {directory}", hidden)
        if plan.errors:
            for error in plan.errors:
                err_console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            err_console.print("nothing was applied", highlight=False)
            sys.exit(code)
        if not as_json:
            n = len(plan.changes)
            console.print(f"applied: {n} change{'s' if n != 1 else ''}" if n else "nothing to do", highlight=False)
