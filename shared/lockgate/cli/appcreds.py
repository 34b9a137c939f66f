"""`lockgate app-credential create|revoke|list`: a NATS user for one tenant's application.

The shared `app` user may publish any tenant's and app's events and read every decision; a per-application
user publishes its own tenant's and app's events only (on `lg.ingest.<tenant>.<app>`, relayed by the gateway to
`lg.inference.<tenant>.<app>`: permissions.app_user, services/gateway/relay.py).
The credential is a file in the stack's home (0600), so this command runs where the home is; a running
`lockgate up` applies the change at once (its nats-server reloads its users), and the change is recorded in
the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import click
import nats.errors

from lockgate import credentials
from lockgate.cli.access import connect_once
from lockgate.cli.audit import NotChained, may_record_admin_change, record_change, record_undone
from lockgate.cli.render import console, err_console, output, say_with
from lockgate.cli.root import handle_errors
from lockgate.config import Settings
from lockgate.contracts.names import check_name
from lockgate.errors import ConfigError
from lockgate.redact import shown_url
from lockgate.subjects import Subjects

_RELOAD_TIMEOUT_S = 15.0


async def _reload(settings: Settings, role: str) -> tuple[bool, str]:
    """Ask the running stack, as `role`, to reload its NATS users: (applied, what to tell the user about it)."""
    nc = await connect_once(settings, role, "the running stack was not told")
    if nc is None:
        return False, f"no stack answers at {shown_url(settings.nats_url)}: the next `lockgate up` on this home applies it"
    try:
        reply = json.loads((await nc.request(Subjects(settings.prefix).nats_reload, b"",
                                             timeout=_RELOAD_TIMEOUT_S)).data)
    except (nats.errors.Error, TimeoutError, ValueError) as exc:  # no responder: a deployed server, not ours
        return False, (f"the stack at {shown_url(settings.nats_url)} did not reload its users ({exc.__class__.__name__}): a "
                       "deployed nats-server takes them from its configuration and a reload")
    finally:
        await nc.close()
    if not reply.get("ok"):
        raise ConfigError(f"the running nats-server refused its new users: {reply.get('error')}")
    return True, "the running stack applied it"


# Changes that take a credential's access away: a leaked password must stop working whether or not the audit log
# takes the entry, so these stay in force when it does not (as `keys revoke` and `gate revoke` do).
_TAKES_AWAY = {"revoke": "revocation", "rotate": "rotation"}


def _change(settings: Settings, tenant: str, app: str, make: Callable[[], Path], *, action: str) -> tuple[Path, bool, str]:
    """Make one credential change (`make`), apply it to a running stack and record it in the audit log. The role
    is checked before anything is touched. A grant (`create`) whose reload or audit row fails is undone, the file
    put back (and the stack reloaded again if it had taken it): before, the file was written first, and a failing
    reload or audit row left a user the next `up` loads with no audit row. A revocation or rotation stays in force
    and the command fails saying so (its entry queued: chained once a gatekeeper with a trusted key runs). Before
    (probe p77 F2), those were undone too: during an audit outage, such as right after `gate revoke` of a leaked
    gatekeeper key, the leaked credential was put back and kept connecting. Returns (path, applied, what to tell
    the user about applying it)."""
    check_name(tenant, "tenant")
    check_name(app, "app")
    # A credential decides who publishes a tenant's events on the bus: admin's, as API keys are (probe p54 F2).
    role = may_record_admin_change(settings, "create or revoke application credentials (which say who may publish "
                                   "a tenant's events on the bus)",
                                   "change application credentials (record the change in the audit log and have "
                                   "the stack reload its users)", Subjects(settings.prefix).nats_reload)
    path = credentials.app_path(settings.home, tenant, app)
    before = path.read_bytes() if path.is_file() else None
    made = make()
    applied = False
    target, details = f"nats-app:{credentials.app_user(tenant, app)}", {"tenant": tenant, "app": app}
    try:
        applied, said = asyncio.run(_reload(settings, role))
        record_change(settings, target=target, action=action, details=details)
    except BaseException as exc:
        if action in _TAKES_AWAY:
            stack = "the running stack applied it" if applied else "a nats-server applies it at its next reload"
            kept = f"the {_TAKES_AWAY[action]} of the credential of {tenant}/{app} is in force ({stack})"
            if isinstance(exc, NotChained):  # its entry is chained later: running it again would record it twice
                kept += " but not in the audit log yet"
            else:
                kept += " but not in the audit log"
            say_with(exc, kept)
            raise
        _restore(path, before)
        if applied:
            with contextlib.suppress(Exception):  # the error said is the one that undid the change
                asyncio.run(_reload(settings, role))
        kept = f"the credential of {tenant}/{app} was left as it was ({path}): nothing changed"
        if isinstance(exc, (NotChained, KeyboardInterrupt)):  # its entry chained later (or perhaps): the undoing too
            kept += record_undone(settings, target=target, action=action, details=details)
        say_with(exc, kept)
        raise
    return made, applied, said


def _restore(path: Path, before: bytes | None) -> None:
    """Put a credential file back as it was: absent, or these bytes (0600, as credentials writes them)."""
    if before is None:
        path.unlink(missing_ok=True)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(before)


def register(cli: click.Group) -> None:
    """Attach `app-credential` to the top-level group."""

    @cli.group("app-credential")
    @click.option("--home", envvar="LOCKGATE_HOME", default=None,
                  help="The stack's home (default: settings, ./.lockgate).")
    @click.pass_context
    def group(ctx: click.Context, home: str | None) -> None:
        """NATS users for single applications: each publishes its own tenant's and app's events only."""
        if home:
            ctx.obj["settings"] = ctx.obj["settings"].replace(home=home)

    @group.command("create")
    @click.option("--tenant", required=True)
    @click.option("--app", required=True)
    @click.option("--rotate", is_flag=True, help="Replace the password of an existing credential.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
    @click.pass_context
    @handle_errors
    def create(ctx: click.Context, tenant: str, app: str, rotate: bool, as_json: bool) -> None:
        """Write a credential (user and password, 0600) for an application, and apply it to a running stack."""
        settings = ctx.obj["settings"]
        path, applied, said = _change(settings, tenant, app,
                                      lambda: credentials.create_app(settings.home, tenant, app, rotate=rotate),
                                      action="rotate" if rotate else "create")
        user = credentials.app_user(tenant, app)
        subject = Subjects(settings.prefix).ingest(app, tenant)
        if as_json:
            output({"user": user, "tenant": tenant, "app": app, "file": str(path), "subject": subject,
                    "applied": applied}, True)
            return
        console.print(f"{'rotated' if rotate else 'created'} NATS user [bold]{user}[/bold] for {tenant}/{app} in "
                      f"{path}: it publishes its events on {subject} only, and reads its own releases' decisions "
                      f"through the gateway; {said}", highlight=False, soft_wrap=True)
        console.print(f"  SDK: Client(url, app={app!r}, tenant={tenant!r}, user=..., password=...) from that file",
                      highlight=False, soft_wrap=True)

    @group.command("revoke")
    @click.option("--tenant", required=True)
    @click.option("--app", required=True)
    @click.pass_context
    @handle_errors
    def revoke(ctx: click.Context, tenant: str, app: str) -> None:
        """Delete an application's credential; a running stack refuses it from the reload on."""
        settings = ctx.obj["settings"]
        path, applied, said = _change(settings, tenant, app, lambda: credentials.revoke_app(settings.home, tenant, app),
                                      action="revoke")
        console.print(f"revoked the NATS credential of {tenant}/{app} ({path}); {said}", highlight=False,
                      soft_wrap=True)
        if not applied:
            err_console.print("[yellow]note:[/yellow] until a nats-server reloads its users, the credential still "
                              "connects", highlight=False, soft_wrap=True)

    @group.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    @click.pass_context
    @handle_errors
    def list_(ctx: click.Context, as_json: bool) -> None:
        """Every application credential of the home: user, tenant, app and the subject it may publish on."""
        settings = ctx.obj["settings"]
        s = Subjects(settings.prefix)
        output([{"user": user, "tenant": c["tenant"], "app": c["app"], "subject": s.ingest(c["app"], c["tenant"])}
                for user, c in credentials.apps(settings.home).items()], as_json)
