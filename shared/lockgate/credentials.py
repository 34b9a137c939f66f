"""NATS credentials: generated once per identity under `{home}/credentials/` (0600), and the
connection options (user, password or creds file, TLS, a private reply inbox) built from them."""

from __future__ import annotations

import json
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lockgate.errors import ConfigError
from lockgate.permissions import IDENTITIES, inbox


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
            # O_EXCL + 0600 from the start: the secret is never readable by others, not even briefly.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump({"user": identity, "password": secrets.token_urlsafe(32)}, fh)
        out[identity] = _read(path)["password"]
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
