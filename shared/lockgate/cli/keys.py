"""`lockgate keys create|list|scope|revoke`: the API keys clients and operators present to the router and gRPC API.

Keys live hashed in `{home}/apikeys.json` (0600; LOCKGATE_API_KEYS_FILE names another), so this command runs
where the stack's home is; the running services that read that file pick up changes on their next request (pods with
a home of their own read a copy: docs/scale.md "API keys on every replica").
"""

from __future__ import annotations

import datetime as dt

import click

from lockgate.cli.audit import NotChained, may_record_admin_change, record_change, record_undone
from lockgate.cli.render import console, output, say_with
from lockgate.cli.root import handle_errors
from lockgate.errors import ConfigError, LockgateError
from lockgate.server.apikeys import ROLES, KeyStore, widens


def _may_change(ctx: click.Context) -> None:
    """Refuse a role other than admin before the keys file is touched: a key's role and scope decide who may do
    what in the router and the gRPC API (before, probe p54 F2, an operator minted admin keys)."""
    may_record_admin_change(ctx.obj["settings"], "create, rescope or revoke API keys (which say who may call the "
                            "router and the gRPC API, and as what)",
                            "change API keys (record the change in the audit log)")


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else ""


def register(cli: click.Group) -> None:
    """Attach `keys` to the top-level group."""

    @cli.group()
    @click.option("--home", envvar="LOCKGATE_HOME", default=None,
                  help="The stack's home (default: settings, ./.lockgate).")
    @click.pass_context
    def keys(ctx: click.Context, home: str | None) -> None:
        """API keys: an app key (tenant + app) for traffic; viewer/operator/approver/admin for the admin API."""
        if home:  # the stack's home: its API keys, and the NATS credentials a key change is recorded with
            ctx.obj["settings"] = ctx.obj["settings"].replace(home=home)
        ctx.obj["keys"] = KeyStore.of(ctx.obj["settings"])

    @keys.command("create")
    @click.option("--tenant", required=True)
    @click.option("--app", required=True)
    @click.option("--role", type=click.Choice(ROLES), default="app", show_default=True,
                  help="app: send traffic, inference events and spans; viewer, approver: read routes in the admin "
                       "API; operator: change them too; admin: everything, keys included.")
    @click.option("--description", default="")
    @click.option("--deployment", "deployments", multiple=True, metavar="NAME",
                  help="A deployment the key may use: send traffic to (app), read or operate in the admin API "
                       "(viewer, approver, operator); repeat for more; not for admin keys. "
                       "None: every deployment.")
    @click.pass_context
    @handle_errors
    def create(ctx: click.Context, tenant: str, app: str, role: str, description: str,
               deployments: tuple[str, ...]) -> None:
        """Create a key and print it once (only its hash is kept)."""
        _may_change(ctx)
        plain, rec = ctx.obj["keys"].create(tenant, app, role, description, deployments)
        try:
            record_change(ctx.obj["settings"], target=f"apikey:{rec.id}", action="create",
                          details={"role": role, "tenant": tenant, "app": app, "description": description,
                                   "deployments": rec.scope})
        except BaseException as exc:
            # A key the audit log does not record works nowhere: revoked before it is shown (before, it was shown
            # and kept working with no row; probe p6). Its entry queued (or perhaps): the undoing is queued after it,
            # as a trust grant's (before, probe p77 F3, the log showed the key created and never its revocation).
            ctx.obj["keys"].revoke(rec.id)
            kept = f"key {rec.id} was not recorded in the audit log, so it is revoked and was not shown"
            if isinstance(exc, (NotChained, KeyboardInterrupt)):
                kept += record_undone(ctx.obj["settings"], target=f"apikey:{rec.id}", action="create",
                                      details={"role": role, "tenant": tenant, "app": app})
            say_with(exc, kept)
            raise
        console.print(f"created key [bold]{rec.id}[/bold] ({role} for {tenant}/{app}, may use {rec.scope}); "
                      "it is shown only now:")
        click.echo(plain)

    @keys.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    @click.pass_context
    @handle_errors
    def list_(ctx: click.Context, as_json: bool) -> None:
        """Every key: id, tenant and app, deployments, role, when created and revoked (never the key)."""
        keys = ctx.obj["keys"].keys()
        if as_json:  # a list for programs: [] is every deployment, as in the keys file
            output([{"id": k.id, "tenant": k.tenant, "app": k.app, "deployments": list(k.deployments),
                     "role": k.role, "created": _when(k.created_at), "revoked": _when(k.revoked_at),
                     "description": k.description} for k in keys], True)
            return
        output([{"id": k.id, "tenant": k.tenant, "app": k.app, "deployments": k.scope, "role": k.role,
                 "created": _when(k.created_at), "revoked": _when(k.revoked_at), "description": k.description}
                for k in keys], False)

    @keys.command("scope")
    @click.argument("key_id")
    @click.option("--deployment", "deployments", multiple=True, metavar="NAME",
                  help="A deployment the key may send traffic to (repeat for more). Replaces the key's scope.")
    @click.option("--every-deployment", is_flag=True, help="Lift the scope: the key may use every deployment.")
    @click.pass_context
    @handle_errors
    def scope(ctx: click.Context, key_id: str, deployments: tuple[str, ...], every_deployment: bool) -> None:
        """Change which deployments a key (any role but admin) may use; the router applies it from its next request."""
        # Widening to every deployment is said out loud: a forgotten --deployment must not do it.
        if bool(deployments) == every_deployment:
            raise ConfigError("name the key's deployments with --deployment NAME (repeatable), or lift its scope "
                              "with --every-deployment")
        _may_change(ctx)
        store = ctx.obj["keys"]
        before, after = store.rescope(key_id, deployments)
        said = (f"key {after.id} ({after.role} for {after.tenant}/{after.app}) may use {after.scope} "
                f"(was: {before.scope})")
        target = f"apikey:{after.id}"
        details = {"role": after.role, "tenant": after.tenant, "app": after.app, "deployments": after.scope,
                   "previous": before.scope}
        if not widens(before.deployments, after.deployments):
            # A narrowing takes access away, so it stays in force when the audit log does not take it, as a
            # revocation does (said first: the error that may follow is about its audit row only).
            console.print(said)
            record_change(ctx.obj["settings"], target=target, action="scope", details=details)
            return
        try:
            record_change(ctx.obj["settings"], target=target, action="scope", details=details)
        except BaseException as exc:
            # A widening is a grant: undone when the audit log does not take it, as `keys create` and `gate trust`
            # are (before, probe p77 F3, it failed but stayed in force: the key went from 403 to 200).
            try:
                store.rescope(after.id, before.deployments)
            except LockgateError as undo:
                kept = (f"the widening of key {after.id} to {after.scope} is not in the audit log and could not be "
                        f"undone ({undo.message}): revoke it or scope it again")
            else:
                kept = (f"the widening of key {after.id} was not recorded in the audit log, so it was undone: it may "
                        f"use {before.scope}")
                if isinstance(exc, (NotChained, KeyboardInterrupt)):
                    kept += record_undone(ctx.obj["settings"], target=target, action="scope", details=details)
            say_with(exc, kept)
            raise
        console.print(said)

    @keys.command("revoke")
    @click.argument("key_id")
    @click.pass_context
    @handle_errors
    def revoke(ctx: click.Context, key_id: str) -> None:
        """Revoke a key by id: the router and gRPC API refuse it from their next call."""
        _may_change(ctx)
        rec = ctx.obj["keys"].revoke(key_id)
        console.print(f"revoked key {rec.id} ({rec.role} for {rec.tenant}/{rec.app})")
        record_change(ctx.obj["settings"], target=f"apikey:{rec.id}", action="revoke",
                      details={"role": rec.role, "tenant": rec.tenant, "app": rec.app})
