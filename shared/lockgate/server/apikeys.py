"""Lockgate API keys: random virtual keys scoped to a tenant and app, with a role, hashed at rest.

A key may also name the deployments it may send traffic to (`deployments`); none means every one,
which is what keys made before the field existed decode to.

The plaintext `lg-...` key is shown once (returned by `create`); `{home}/apikeys.json` (0600; `api_keys_file`,
LOCKGATE_API_KEYS_FILE, names another) keeps only its sha256, so a copy of the file does not let anyone call the
router or the gRPC gateway. Services re-read the file when it changes (another inode too: a file replaced by a rename,
or a Kubernetes Secret volume's symlink swap), so a key created or revoked by the CLI takes effect on the next request
without a restart. Commands change it one at a time (lockgate.filelock), so two at once both count.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec

from lockgate import documents, filelock
from lockgate.contracts.names import NAME_RULE, is_name
from lockgate.errors import ConfigError, LockgateError, NotFound
from lockgate.ticks import Idle, ticking

if TYPE_CHECKING:
    from lockgate.config import Settings

Role = Literal["app", "viewer", "operator", "approver", "admin"]
ROLES: tuple[str, ...] = ("app", "viewer", "operator", "approver", "admin")
# The roles that may change a deployment's route (the router's admin API; `lockgate rollout` checks --role alike).
ROUTE_CHANGERS: tuple[str, ...] = ("operator", "admin")
PREFIX = "lg-"
FILE = "apikeys.json"


class AuthError(LockgateError):
    """A request carried no API key, or one that is unknown or revoked (HTTP 401, gRPC UNAUTHENTICATED)."""


class Forbidden(LockgateError):
    """The API key is valid but its role or scope does not allow this (HTTP 403, gRPC PERMISSION_DENIED)."""


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """One key as stored: its hash, never the key itself."""

    id: str
    hash: str
    tenant: str
    app: str
    role: Role = "app"
    created_at: float = 0.0
    revoked_at: float = 0.0
    description: str = ""
    # The deployments this key may send traffic to and report events of; empty: every deployment. The
    # default keeps files written before scopes existed loading, with the access they had.
    deployments: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """Who this key is, for audit records and reasons (never the secret)."""
        return f"apikey:{self.id}({self.role}@{self.tenant}/{self.app})"

    @property
    def scope(self) -> str:
        """The deployments this key may use, as people read it."""
        return ", ".join(self.deployments) if self.deployments else "every deployment"

    @property
    def tenants(self) -> str | None:
        """Whose deployments and releases this key may use and roll out: its tenant's; None (every tenant's) for
        an admin key, which acts on every deployment (as it takes no deployment scope), though never to mix
        tenants on one (the router's domain.same_tenant)."""
        return None if self.role == "admin" else self.tenant

    def may_use(self, deployment: str) -> bool:
        """Whether this key may send traffic to (or report events of) `deployment`."""
        return in_scope(self.deployments, deployment)


class _File(msgspec.Struct):
    keys: list[ApiKey] = []


_decoder = msgspec.json.Decoder(_File)
_encoder = msgspec.json.Encoder()


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class KeyStore:
    """The API keys of one home directory (or of the file `path` names); reads are cached and refreshed when the file
    changes."""

    def __init__(self, home: str | Path, *, path: str | Path = "") -> None:
        self.path = Path(path) if path else Path(home) / FILE
        self._file = str(self.path)  # os.stat on every request: skip Path's conversion
        self._by_hash: dict[str, ApiKey] = {}
        # Presented keys already hashed (the same few keys call all day): a dict lookup, not a sha256
        # per request. Only keys that matched a record are kept, and the memo is bounded.
        self._digests: dict[str, str] = {}
        self._stamp: tuple[int, int, int] | None = None

    @classmethod
    def of(cls, settings: Settings) -> KeyStore:
        """The key store the settings name: `api_keys_file`, else the home's apikeys.json."""
        return cls(settings.home, path=settings.api_keys_file)

    # reading
    def _refresh(self) -> None:
        try:
            # stat follows symlinks: a Secret volume's update (its `..data` link swapped) is a new inode here
            st = os.stat(self._file)
        except FileNotFoundError:
            self._by_hash, self._stamp = {}, None
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            data = _decoder.decode(self.path.read_bytes())
        except (OSError, msgspec.DecodeError) as exc:
            raise ConfigError(f"cannot read API keys from {self.path}: {exc}") from None
        self._by_hash = {k.hash: k for k in data.keys}
        self._stamp = stamp

    def keys(self) -> list[ApiKey]:
        """Every key ever created (revoked ones included), oldest first."""
        self._refresh()
        return sorted(self._by_hash.values(), key=lambda k: k.created_at)

    def problem(self) -> str:
        """Why every key is refused ("" when the store holds one): no file, a file with no key, or one that does not
        read. A service that checks keys is not ready while there is one (a pod without the key store mounted said
        ready and answered 401 to every key, probe p86 F1); a revoked key still counts, as a store someone keeps."""
        try:
            self._refresh()
        except ConfigError as exc:
            return exc.message
        if self._by_hash:
            return ""
        return (f"no API keys in {self.path}: create one with `lockgate keys create`, or mount the key store there "
                "(LOCKGATE_API_KEYS_FILE names another file)")

    def problems(self) -> list[str]:
        """`problem`, as a service's readiness problems list (Service.problems)."""
        return [problem] if (problem := self.problem()) else []

    def say_problem(self, log: logging.Logger) -> None:
        """Log once at start why every key is refused, if it is; readiness says it from then on (`problem`)."""
        if problem := self.problem():
            log.warning("%s; every request is refused (401) and this service is not ready until the store holds a key",
                        problem)

    def authenticate(self, key: str | None) -> ApiKey:
        """The live key record for a presented key; AuthError when missing, unknown or revoked."""
        if not key:
            raise AuthError("missing API key: send `Authorization: Bearer lg-...` (see `lockgate keys create`)")
        if not key.isascii():
            # lockgate's keys are ASCII; an HTTP server keeps a header's non-UTF-8 bytes as surrogates,
            # which no hash takes (a 500 on every path, the admin API's too, instead of this 401)
            raise AuthError("invalid API key: unknown or revoked")
        self._refresh()
        digest = self._digests.get(key)
        if digest is None:
            digest = _digest(key)
            if digest in self._by_hash:
                if len(self._digests) >= 4096:
                    self._digests.clear()
                self._digests[key] = digest
        found = self._by_hash.get(digest)
        # compare_digest keeps the final check constant-time even though the lookup is by hash
        if found is None or not hmac.compare_digest(found.hash, digest) or found.revoked_at:
            raise AuthError("invalid API key: unknown or revoked")
        return found

    def authenticate_sender(self, key: str | None) -> ApiKey:
        """The live key record for a presented key that may send data (`require_sender`): AuthError as
        `authenticate`, Forbidden for a key of a role that only reads or operates."""
        found = self.authenticate(key)
        require_sender(found)
        return found

    # writing
    @contextlib.contextmanager
    def _changing(self) -> Iterator[list[ApiKey]]:
        """The keys as the file holds them now, to change in place: written back when the block ends without an
        error. The file's lock is held from the read to the write (filelock), so a change another command makes
        meanwhile is read here, not overwritten: a revocation is never lost to a `keys create` running with it."""
        with filelock.locked(self.path):
            self._stamp = None  # read under the lock, whatever was read before it
            keys = self.keys()
            yield keys
            filelock.replace(self.path, _encoder.encode(_File(keys=keys)))
            self._stamp = None

    def create(self, tenant: str, app: str, role: str = "app", description: str = "",
               deployments: Iterable[str] = ()) -> tuple[str, ApiKey]:
        """A new key: (plaintext shown once, stored record); `deployments` empty: every deployment."""
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        # Every event and budget of the key carries these names: one outside the grammar would have each of
        # them refused downstream (dead-lettered), not the key now.
        for kind, name in (("tenant", tenant), ("app", app)):
            if not is_name(name):
                raise ConfigError(f"invalid {kind} {name!r} for an API key: {NAME_RULE}")
        scope = deployment_scope(role, deployments)
        plain = PREFIX + secrets.token_urlsafe(32)
        rec = ApiKey(id=secrets.token_hex(6), hash=_digest(plain), tenant=tenant, app=app, role=role,  # type: ignore[arg-type]
                     created_at=time.time(), description=description, deployments=scope)
        with self._changing() as keys:
            keys.append(rec)
        return plain, rec

    def rescope(self, key_id: str, deployments: Iterable[str]) -> tuple[ApiKey, ApiKey]:
        """Set the deployments a live key may use (empty: every one); (before, after). Services read the
        file again on their next request, so the key keeps working, within its new scope."""
        with self._changing() as keys:
            i = self._index(keys, key_id)
            if keys[i].revoked_at:
                raise ConfigError(f"API key {key_id!r} is revoked: create a new key instead")
            before = keys[i]
            keys[i] = msgspec.structs.replace(before, deployments=deployment_scope(before.role, deployments))
            return before, keys[i]

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key by id (it stays listed, marked revoked)."""
        with self._changing() as keys:
            i = self._index(keys, key_id)
            keys[i] = msgspec.structs.replace(keys[i], revoked_at=keys[i].revoked_at or time.time())
            return keys[i]

    def _index(self, keys: list[ApiKey], key_id: str) -> int:
        """Where the key of id `key_id` is in `keys` (NotFound if none is)."""
        for i, k in enumerate(keys):
            if k.id == key_id:
                return i
        raise NotFound(f"no API key with id {key_id!r} in {self.path}")


def in_scope(deployments: tuple[str, ...], deployment: str) -> bool:
    """The scope rule: an empty scope is every deployment, else the deployment must be one of it."""
    return not deployments or deployment in deployments


def event_out_of_scope(deployments: tuple[str, ...], deployment: str, app: str) -> str:
    """Why a key of scope `deployments` may not report an event of `deployment` ("" when it may). An event
    counts in its deployment's drift and canary analysis; one naming none counts as the deployment named
    like its app (`app`, the key's: drift groups by `deployment or app`), so a scoped key must name a
    deployment of its own."""
    if in_scope(deployments, deployment):
        return ""
    return (f"is for deployment {deployment!r}" if deployment else
            f"names no deployment (it would count as deployment {app!r}, its app's name)")


def owns_release(key: ApiKey, bundle: Mapping[str, Any] | None) -> bool:
    """Whether `key` may read the gate decisions of the release bound to `bundle` (None: a name never bound).

    Only the binding (the create-only releases bucket) says whose a release is, never the request or the
    decision (whose tenant is the eval request's). A release of another tenant or app, and one nobody bound,
    are alike to the key: callers answer both as an unknown release, so a key learns no other release's name.
    A bundle without a tenant or app (lockgate writes both into every binding) is nobody's."""
    return bound_to(bundle, key.tenant, key.app)


def bound_to(bundle: Mapping[str, Any] | None, tenant: str, app: str) -> bool:
    """Whether a release's binding (`owns_release`) is `tenant`'s and `app`'s: what an application's own NATS user
    may read the decisions of (services/gateway/reads.py), as a key of that tenant and app may."""
    return bundle is not None and bundle.get("tenant") == tenant and bundle.get("app") == app


def deployment_scope(role: str, deployments: Iterable[str]) -> tuple[str, ...]:
    """The checked scope of a key of `role`: deployment names in the grammar, each once, in the order given.
    Every role but admin takes one: an app key's traffic and events, and what a viewer, approver or operator
    key may read or change in the admin API; an admin key acts on every deployment (keys, break-glass)."""
    scope = tuple(dict.fromkeys(deployments))
    if scope and role == "admin":
        raise ConfigError("an admin key acts on every deployment and takes no deployment scope: make an operator "
                          "key scoped to them instead")
    for name in scope:
        if not is_name(name):
            raise ConfigError(f"invalid deployment {name!r} for an API key: {NAME_RULE}")
    return scope


def widens(before: tuple[str, ...], after: tuple[str, ...]) -> bool:
    """Whether a key scoped to `after` may use a deployment it could not use scoped to `before` (empty: every
    deployment): a grant, which the CLI undoes when the audit log does not take it; a narrowing is a revocation."""
    if not before:
        return False
    return not after or not set(after) <= set(before)


_T = TypeVar("_T")


async def while_allowed(items: AsyncIterator[_T], check: Callable[[], object], *,
                        every_s: float) -> AsyncIterator[_T]:
    """The items of a stream a key opened (a route watch, a decision watch) while the key still may have them: `check`
    (the key authenticated and its scope checked again; `KeyStore.authenticate` is a stat of the file while it is
    unchanged) runs before each item is yielded and every `every_s` seconds between, and its AuthError or Forbidden
    ends the stream. A key revoked or rescoped is so refused a stream it opened before, as its next call is, and is
    given nothing that came after. (decisionwatch.verified looks again at the trust roots the same way.)"""
    async with contextlib.aclosing(ticking(items, every_s)) as ticks:
        async for item in ticks:
            check()
            if not isinstance(item, Idle):
                yield item


# role checks
_RANK = {"app": 0, "viewer": 1, "approver": 2, "operator": 3, "admin": 4}


def require_role(key: ApiKey, *roles: str) -> None:
    """Forbidden unless the key has one of `roles` (admin may do anything an operator may)."""
    if key.role in roles or (key.role == "admin" and "operator" in roles):
        return
    raise Forbidden(f"{key.label} may not do this: requires role {' or '.join(roles)}")


# Who may put data in: traffic through the router, inference events over gRPC, spans over OTLP. What a key sends is
# billed to its tenant, counted in drift and taken as a deployment's canary evidence, so it is an application's
# (an admin key may do anything); a viewer's, approver's or operator's key reads or operates the rollouts.
SENDERS: tuple[str, ...] = ("app", "admin")


def require_sender(key: ApiKey) -> None:
    """Forbidden unless the key's role may send traffic, inference events and spans (SENDERS)."""
    if key.role not in SENDERS:
        raise Forbidden(f"{key.label} may not send traffic, inference events or spans: that requires role app (or "
                        f"admin), and a {key.role} key only reads or operates rollouts; send with an app key "
                        f"(`lockgate keys create --tenant {key.tenant} --app {key.app}`)")


class Bootstrap(msgspec.Struct, frozen=True):
    """The first keys of a home: an admin key and an app key for the demo, with where they are. A key an operator
    revoked is not made again: its field is "" and `withheld` says, in one line each, which and how to make one."""

    admin_key: str
    app_key: str
    admin_file: str
    app_file: str
    withheld: tuple[str, ...] = ()


def bootstrap(home: str | Path, *, tenant: str = "default", app: str = "default", keys_file: str = "") -> Bootstrap:
    """Create the first admin key and an app key once (plaintext in 0600 files under home/credentials).

    A file holds the key alone (`lg-...`), what `Authorization: Bearer $(cat FILE)` sends; its id is in `lockgate
    keys list`. Homes made before hold `<id> <key>`: such a file of a live key is rewritten to the key alone.
    A key is made when none was (a new home), or when its file is lost or holds a key this home does not know while
    the last one `up` made is live; once an operator revoked the last one `up` made, it stays revoked and none is
    made in its place (a new one is `lockgate keys create`, which the audit log records). Before (probe p77 F1), a
    revoked one was replaced by the next `up`, a new admin key in the same file, with no audit row."""
    home = Path(home)
    creds = home / "credentials"
    admin_file, app_file = creds / "router-admin.key", creds / "router-app.key"
    store = KeyStore(home, path=keys_file)  # the store the stack's services read (Settings.api_keys_file)
    keys: dict[Path, str] = {}
    withheld: list[str] = []
    for path, role, who in ((admin_file, "admin", "first admin"), (app_file, "app", "demo app")):
        description = f"{who} key made by `lockgate up`"
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text()
            plain = _key_of(text)
            with contextlib.suppress(AuthError):
                store.authenticate(plain)  # live: kept
                if text.strip() != plain:
                    _write_key(creds, path, plain)
                keys[path] = plain
                continue
        made = [k for k in store.keys() if k.role == role and k.description == description]
        if made and made[-1].revoked_at:
            last = made[-1]
            keys[path] = ""
            withheld.append(f"the {who} key `up` made ({last.id}, in {path}) was revoked and stays so: make a new "
                            f"one with `lockgate keys create --tenant {last.tenant} --app {last.app} --role {role}`")
            continue
        plain, _ = store.create(tenant, app, role, description=description)
        _write_key(creds, path, plain)
        keys[path] = plain
    return Bootstrap(admin_key=keys[admin_file], app_key=keys[app_file], admin_file=str(admin_file),
                     app_file=str(app_file), withheld=tuple(withheld))


def _key_of(text: str) -> str:
    """The key in a credentials file: the key alone, or the last field of `<id> <key>` (homes made before)."""
    fields = text.split()
    return fields[-1] if fields else ""


def _write_key(creds: Path, path: Path, plain: str) -> None:
    creds.mkdir(parents=True, exist_ok=True, mode=0o700)
    filelock.replace(path, f"{plain}\n".encode())  # a reader sees the old file or the new one, never half a key


def read_credential(path: str | Path) -> str:
    """The plaintext key in a credentials file written by `bootstrap` (ConfigError if absent)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"no API key at {path} ({exc.strerror}): start the stack with `lockgate up --home DIR` "
                          "or pass the key explicitly") from None
    return _key_of(documents.parse(data, "text", where=f"API key file {path}"))
