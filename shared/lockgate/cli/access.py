"""How the CLI reaches data: ask the query service over NATS, or open ClickHouse directly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import nats
import nats.errors
import nats.js.errors

from lockgate import credentials, natsclient, queryclient
from lockgate.bus import Bus
from lockgate.codec import to_json
from lockgate.config import Settings
from lockgate.credentials import NotAllowed
from lockgate.errors import BusUnavailable, StoreUnavailable
from lockgate.permissions import ROLES, Grant, grant, inbox, query_subject
from lockgate.redact import shown_url
from lockgate.subjects import Subjects

T = TypeVar("T")


def query(settings: Settings, name: str, direct: bool = False, role: str = "viewer", **args: Any) -> Any:
    """Run a named query. chDB allows one process per data path, so while a stack runs the CLI asks
    its query service over NATS; with --clickhouse (or no stack running) it opens ClickHouse itself."""
    if not direct:
        with contextlib.suppress(_NoStack):
            return asyncio.run(_over_nats(settings, name, args, chosen_role(role)))
    return _direct(settings, name, args, direct)


def store_url(settings: Settings) -> str:
    """The ClickHouse of the stack at `settings.home`: the configured URL, else chDB beside JetStream's data
    under the home, where `lockgate up` keeps it."""
    if settings.clickhouse_url != Settings().clickhouse_url:
        return settings.clickhouse_url
    return f"chdb://{(Path(settings.home) / 'clickhouse').resolve()}"


def _network_reason(exc: BaseException) -> str | None:
    """Why a connection failed, as the OS said it (`connection refused`), from the chain of errors under `exc`
    (clickhouse-connect wraps urllib3's, which keeps the socket's as `reason`); None if no socket error is in it."""
    seen: set[int] = set()
    cause: Any = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and not cause.__class__.__module__.startswith("urllib3"):
            return (cause.strerror or str(cause) or "timed out").lower()
        reason = getattr(cause, "reason", None)
        cause = cause.__cause__ or cause.__context__ or (reason if isinstance(reason, BaseException) else None)
    return None


def _direct(settings: Settings, name: str, args: dict[str, Any], asked: bool) -> Any:
    # The query service's own registry, so both paths check arguments and build rows alike.
    from lockgate.services.query import registry
    from lockgate.store import open_store
    from lockgate.store.client import chdb_in_use, chdb_path

    url = store_url(settings)
    why = "" if asked else f"no running stack answers at {shown_url(settings.nats_url)}, and "
    path = chdb_path(url)
    if path is not None and not path.is_dir():
        # Opening it would create an empty database and answer every query from it: 0 rows, exit 0, wrongly.
        # No stack to ask and nothing to read: the exit code of every command that finds no stack (1), not 3,
        # which says the thing asked for does not exist.
        raise BusUnavailable(f"{why}there is no database at {path}: give the running stack's --nats URL (as "
                       f"`lockgate up` printed it) or its --home, or start one with `lockgate up`")
    if path is not None and chdb_in_use(path):  # a running stack's: chDB opens a directory in one process only
        raise StoreUnavailable(f"{why}the database at {path} is in use by the stack running from it, which answers "
                               "queries only over NATS: give its --nats URL (as `lockgate up` printed it)")
    try:
        store = open_store(url, settings.database)
    except StoreUnavailable as exc:
        refused = _network_reason(exc)
        if refused:  # the socket's own words, not urllib3's pool and retry text around them (probe p70 F8)
            raise StoreUnavailable(f"{why}cannot reach ClickHouse at {shown_url(url)}: {refused}") from None
        raise StoreUnavailable(
            f"{why}ClickHouse at {url} could not be opened ({exc.message}); start one with `lockgate up`"
        ) from None
    try:
        rows = registry.run(store, name, args)
    finally:
        store.close()
    # Through the one encoder and back, as a reply from the query service is: a datetime becomes
    # the same ISO string either way, so output never depends on which path answered.
    return queryclient.decode_reply(to_json({"rows": rows}), name)


def chosen_role(default: str) -> str:
    """The role to connect as: `--role` / LOCKGATE_ROLE when given, else the command's default."""
    ctx = click.get_current_context(silent=True)
    explicit = ctx.find_root().obj.get("role") if ctx is not None and ctx.find_root().obj else None
    return explicit or default


def command() -> str:
    """The command being run, as typed (`lockgate artifact register`), for errors that name it."""
    ctx = click.get_current_context(silent=True)
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["lockgate", *reversed(names)])


def subject_covers(have: str, need: str) -> bool:
    """True if the NATS subject pattern `have` matches every subject `need` (itself a pattern) matches."""
    h, n = have.split("."), need.split(".")
    for i, token in enumerate(h):
        if token == ">":
            return len(n) > i
        if i >= len(n) or n[i] == ">" or token not in ("*", n[i]):
            return False
    return len(h) == len(n)


def covers(have: Grant, need: Grant) -> bool:
    """True if `have` allows every publish and subscription `need` does (patterns compared as NATS matches them)."""
    return all(any(subject_covers(h, n) for h in have.publish) for n in need.publish) and \
        all(any(subject_covers(h, n) for h in have.subscribe) for n in need.subscribe)


def require(settings: Settings, role: str, doing: str, need: Callable[[str], Grant]) -> None:
    """Refuse at once (NotAllowed) what the permission table says `role` may not do, naming the roles that may:
    before, the CLI asked and waited for a NATS timeout (a refused JetStream request gets no answer), then printed
    nats-py's traceback. `need(r)` is what doing it asks of role `r`. Only a lockgate role is checked, by the user
    it connects as: another user's grants (LOCKGATE_NATS_USER, an open server) are the server's to know."""
    user = credentials.for_identity(settings, role).user
    if user not in ROLES:
        return
    s = Subjects(settings.prefix)
    if covers(grant(s, user), need(user)):
        return
    able = [r for r in ROLES if covers(grant(s, r), need(r))]
    raise NotAllowed(f"role {user!r} may not {doing}: use --role {' or '.join(able)}")


def role_needs(settings: Settings, role: str) -> Callable[[str], Grant]:
    """What a command that runs as `role` at least needs: that role's grant, less its own reply inbox."""
    g = grant(Subjects(settings.prefix), role)
    own = f"{inbox(role)}.>"
    return lambda _: Grant(publish=g.publish, subscribe=[x for x in g.subscribe if x != own])


def with_bus(settings: Settings, work: Callable[[Bus], Awaitable[T]], role: str = "viewer") -> T:
    """Run `work` with a Bus connected as the chosen role (a short-lived CLI connection); `role` is the
    command's default, the least it needs: a --role that may not do what it may is refused before connecting."""
    needed, role = role, chosen_role(role)
    require(settings, role, f"run `{command()}`", role_needs(settings, needed))

    async def run() -> T:
        bus = Bus(settings.nats_url, Subjects(settings.prefix), name=f"lockgate-cli-{role}",
                  auth=credentials.for_identity(settings, role), manage_topology=False, wait_for_server=False)
        await bus.connect()
        try:
            return await work(bus)
        except (TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
            raise unanswered(bus, exc) from None
        finally:
            await bus.close()

    return asyncio.run(run())


def unanswered(bus: Bus, exc: Exception) -> NotAllowed | BusUnavailable:
    """Why a request of the CLI got no answer, in one line: the server refused this connection a subject (a
    refused request gets no answer, so it times out), or nothing answered in time."""
    who = repr(bus.auth.user) if bus.auth.user else "a connection without credentials"
    if bus.denied:
        return NotAllowed(f"{who} may not run `{command()}`: NATS refused it {bus.denied[-1]} (permissions "
                          "violation); use a role that may (--role operator to register and evaluate, approver "
                          "to review)")
    return BusUnavailable(f"NATS at {shown_url(bus.url)} did not answer `{command()}` ({who}) in time "
                          f"({exc.__class__.__name__}): is the stack, and its JetStream, running?")


async def _quiet(exc: Exception) -> None:
    """nats-py logs a traceback for every connection error; the CLI reports them in one line instead."""


class _NoStack(Exception):
    """Nothing answers queries at the NATS URL: fall back to opening ClickHouse directly."""


class Refusals:
    """The subjects the server refused a short CLI connection. nats-server answers a refused publish or subscription
    with an -ERR of its own, never on the request's inbox: unheard, a refused request waits out its whole timeout and
    is then blamed on whoever should have answered it (probe p11: 37 s, then "the query service did not answer")."""

    def __init__(self) -> None:
        self.subjects: list[str] = []
        self._any = asyncio.Event()

    async def record(self, exc: Exception) -> None:
        """nats-py's error callback: keep a refused subject; drop the rest, as `_quiet` does."""
        text = str(exc)
        if "permissions violation" in text.lower():
            # 'nats: permissions violation for publish to "lg.query.cli"' (nats-py lowercases the server's message)
            self.subjects.append(text.rpartition(" to ")[2].strip().strip('"'))
            self._any.set()

    async def first(self, call: Awaitable[T], refused: Callable[[str], Exception]) -> T:
        """Await `call`, or raise `refused(subject)` as soon as the server refuses this connection anything: a
        request whose publish or reply subscription was refused is never answered."""
        pending = asyncio.ensure_future(call)
        denied = asyncio.ensure_future(self._any.wait())
        try:
            await asyncio.wait({pending, denied}, return_when=asyncio.FIRST_COMPLETED)
            if pending.done():  # an answer (or its error) that came with a refusal is still the answer
                return await pending
            raise refused(self.subjects[0])
        finally:
            pending.cancel()
            denied.cancel()


async def connect_once(settings: Settings, role: str, purpose: str, refusals: Refusals | None = None) -> Any:
    """A short connection to the stack's NATS as `role` (None if nothing answers at the URL), for CLI
    commands that must not hang when no stack runs (Bus.connect retries for ever). NotAllowed, saying
    `purpose`, if a stack answers but refuses the role's credentials. `refusals` hears the subjects the
    server refuses it afterwards."""
    auth = credentials.for_identity(settings, role)
    # A cluster's URLs are tried one by one: without reconnects nats-py gives up after the first server of its pool,
    # and a CLI given three nodes said no stack ran while one of them was down (probe p30).
    for server in [u.strip() for u in settings.nats_url.split(",") if u.strip()]:
        try:
            # max_reconnect_attempts=1: with 0, nats-py retries a refused first connect for ever.
            return await natsclient.connect([server], connect_timeout=1, max_reconnect_attempts=1,
                                            reconnect_time_wait=0.1, allow_reconnect=False,
                                            error_cb=_quiet if refusals is None else refusals.record, **auth.options())
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            if "authorization violation" in str(exc).lower() or isinstance(exc, nats.errors.AuthorizationError):
                where = credentials.directory(settings.home)
                raise NotAllowed(f"NATS at {shown_url(settings.nats_url)} refused role {role!r}, so {purpose}: no "
                                 f"valid credentials in {where} (pass --home DIR or LOCKGATE_HOME as given to "
                                 f"`lockgate up`)") from None
    return None


async def _over_nats(settings: Settings, name: str, args: dict[str, Any], role: str) -> Any:
    # A stack that runs but refuses us is said so, rather than falling back to opening ClickHouse.
    refusals = Refusals()
    nc = await connect_once(settings, role, "the query was not answered", refusals)
    if nc is None:
        raise _NoStack
    user = credentials.for_identity(settings, role).user
    who = repr(user) if user else "a connection without credentials"

    def refused(subject: str) -> NotAllowed:
        # A user the CLI cannot check (LOCKGATE_NATS_USER, or another user's file as the role's): `require` could
        # not refuse it before connecting, so the server's refusal is the answer, at once and in one line.
        return NotAllowed(f"{who} may not run `{command()}`: NATS refused it {subject} (permissions violation); "
                          "ask as a user that may: one of the stack's roles (viewer, operator, approver or admin)")

    try:
        return await refusals.first(
            queryclient.request(nc, query_subject(Subjects(settings.prefix), role), name, args), refused)
    except queryclient.NoQueryService:
        raise _NoStack from None
    finally:
        await nc.close()
