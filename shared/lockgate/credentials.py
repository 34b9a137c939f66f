"""NATS credentials: generated once per identity under `{home}/credentials/` (0600), and the
connection options (user, password or creds file, TLS, a private reply inbox) built from them."""

from __future__ import annotations

import json
import logging
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lockgate.contracts.names import check_name
from lockgate.errors import ConfigError, NotFound
from lockgate.permissions import IDENTITIES, app_user, inbox

log = logging.getLogger("lockgate.credentials")


class NotAllowed(ConfigError):
    """The identity connected to NATS may not do what was asked (a permissions violation)."""

    exit_code = 5


def directory(home: str | Path) -> Path:
    """Where the credentials of a home live."""
    return Path(home) / "credentials"


def ensure(home: str | Path) -> dict[str, str]:
    """Every identity's password, generated on first use and kept (0600 files in a 0700 directory)."""
    where = directory(home)
    where.mkdir(parents=True, exist_ok=True)
    os.chmod(where, 0o700)
    out: dict[str, str] = {}
    for identity in IDENTITIES:
        path = where / f"{identity}.json"
        if not path.exists():
            _create(path, identity)
        out[identity] = _read(path)["password"]
    return out


def _create(path: Path, user: str, **extra: str) -> str:
    # O_EXCL + 0600 from the start: the secret is never readable by others, not even briefly.
    password = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"user": user, "password": password, **extra}, fh)
    return password


def _apps(home: str | Path) -> Path:
    return directory(home) / "apps"


def app_path(home: str | Path, tenant: str, app: str) -> Path:
    """Where one application's NATS credential lives (`create_app`)."""
    return _apps(home) / f"{app_user(tenant, app)}.json"


def create_app(home: str | Path, tenant: str, app: str, *, rotate: bool = False) -> Path:
    """A NATS user for one tenant's application (permissions.app_user: it publishes that tenant's and app's
    events only), written 0600 under `{home}/credentials/apps/`; ConfigError if it exists and `rotate` is
    not asked (a new password then replaces it: the old one stops working at the reload)."""
    check_name(app, "app")
    check_name(tenant, "tenant")
    ensure(home)
    where = _apps(home)
    where.mkdir(exist_ok=True)
    os.chmod(where, 0o700)
    path = app_path(home, tenant, app)
    if path.exists():
        if not rotate:
            raise ConfigError(f"tenant {tenant!r} app {app!r} has a NATS credential already ({path}); "
                              "--rotate replaces its password")
        path.unlink()
    _create(path, app_user(tenant, app), tenant=tenant, app=app)
    return path


def revoke_app(home: str | Path, tenant: str, app: str) -> Path:
    """Delete one application's NATS credential (NotFound if it has none)."""
    path = app_path(home, tenant, app)
    try:
        path.unlink()
    except FileNotFoundError:
        raise NotFound(f"tenant {tenant!r} app {app!r} has no NATS credential ({path})") from None
    return path


def apps(home: str | Path) -> dict[str, dict[str, str]]:
    """Every application credential of a home, by user: {"user", "password", "tenant", "app"}. A file that
    does not read is skipped with a warning, so one bad file does not take every user down at a reload."""
    out: dict[str, dict[str, str]] = {}
    for path in sorted(_apps(home).glob("*.json")) if _apps(home).is_dir() else []:
        try:
            data = json.loads(path.read_text())
            found = {k: str(data[k]) for k in ("user", "password", "tenant", "app")}
            mine = found["user"] == app_user(found["tenant"], found["app"])
        except Exception as exc:  # whatever a hand-edited file trips on (bad JSON, a lone surrogate, nesting)
            log.warning("skipping NATS credential %s: %s", path, exc.__class__.__name__)
            continue
        if not mine:
            log.warning("skipping NATS credential %s: its user is not its tenant's and app's", path)
            continue
        out[found["user"]] = found
    return out


def _read(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        return {"user": str(data["user"]), "password": str(data["password"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read NATS credentials {path}: {exc.__class__.__name__}") from None


@dataclass(frozen=True)
class NatsAuth:
    """How one connection authenticates: user/password, or a NATS .creds file; TLS when configured."""

    user: str = ""
    password: str = ""
    creds_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    def __repr__(self) -> str:  # never print the password
        return f"NatsAuth(user={self.user!r}, creds_file={self.creds_file!r}, tls={bool(self.tls_ca or self.tls_cert)})"

    @property
    def enabled(self) -> bool:
        """True when the connection presents an identity."""
        return bool(self.password or self.creds_file)

    def options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect`."""
        opts: dict[str, Any] = {}
        if self.creds_file:
            opts["user_credentials"] = self.creds_file
        elif self.password:
            opts["user"], opts["password"] = self.user, self.password
        if self.user:
            opts["inbox_prefix"] = inbox(self.user)
        if self.tls_ca or self.tls_cert:
            ctx = ssl.create_default_context(cafile=self.tls_ca or None)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key or None)
            opts["tls"] = ctx
        return opts


def for_identity(settings: Any, identity: str) -> NatsAuth:
    """The credentials `identity` connects with: explicit settings (LOCKGATE_NATS_USER/_PASSWORD or
    _NATS_CREDS) first, else the file `{home}/credentials/{identity}.json`, else none (an open server)."""
    tls = {"tls_cert": settings.tls_cert, "tls_key": settings.tls_key, "tls_ca": settings.tls_ca}
    if settings.nats_creds:
        return NatsAuth(user=settings.nats_user, creds_file=settings.nats_creds, **tls)
    if settings.nats_password:
        return NatsAuth(user=settings.nats_user or identity, password=settings.nats_password, **tls)
    path = directory(settings.home) / f"{identity}.json"
    if path.exists():
        found = _read(path)
        return NatsAuth(user=found["user"], password=found["password"], **tls)
    return NatsAuth(**tls)
