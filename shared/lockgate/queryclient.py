"""Ask the query service: named read-only queries over NATS request/reply.

Services and the CLI read ClickHouse only through here; the query service (and the sink, which
writes) are the only processes that open it. The wire protocol is `{"query": name, "args": {...}}`
answered by `{"rows": ...}` or `{"error": message, "kind": LockgateError subclass name}`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors

from lockgate import errors
from lockgate.codec import to_json
from lockgate.errors import LockgateError, QueryUnavailable, ReplyTooLarge
from lockgate.permissions import query_subject

if TYPE_CHECKING:
    from lockgate.bus import Bus

# Long enough for a lineage walk or a rollup over a large ledger; a service's caller nacks and
# retries when it passes.
TIMEOUT_S = 30.0


class QueryRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a client sends on `subjects.query`."""

    query: str
    args: dict[str, Any] = {}


class QueryReply(msgspec.Struct, kw_only=True):
    """What the query service answers: rows (any JSON) or an error with its kind."""

    rows: msgspec.Raw = msgspec.Raw(b"null")
    error: str | None = None
    kind: str = ""


class NoQueryService(QueryUnavailable):
    """Nothing subscribes to the query subject: no stack or query service runs at this NATS URL."""


_replies = msgspec.json.Decoder(QueryReply)


def error_for(kind: str, message: str) -> LockgateError:
    """The LockgateError subclass named by a reply's `kind` (the root class for anything else)."""
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, LockgateError):
        return cls(message)
    return LockgateError(message)


def decode_reply(data: bytes, name: str, into: Any = Any) -> Any:
    """The rows of a reply as `into`, or the error it carries raised as its LockgateError."""
    try:
        reply = _replies.decode(data)
        if reply.error is not None:
            raise error_for(reply.kind, reply.error)
        return msgspec.json.decode(reply.rows, type=into)
    except msgspec.ValidationError as exc:
        raise LockgateError(f"the reply to query {name!r} has an unexpected shape: {exc}") from None
    except msgspec.DecodeError as exc:
        raise LockgateError(f"the reply to query {name!r} is not JSON: {exc}") from None


async def request(nc: Any, subject: str, name: str, args: Mapping[str, Any] | None = None, *,
                  into: Any = Any, timeout_s: float = TIMEOUT_S) -> Any:
    """Ask query `name` on a raw nats-py connection; NoQueryService when nobody listens."""
    data = to_json(QueryRequest(query=name, args=dict(args or {})))
    try:
        msg = await nc.request(subject, data, timeout=timeout_s)
    except nats.errors.NoRespondersError:
        raise NoQueryService(f"no query service answers on {subject} (start the stack, or "
                             "`lockgate serve query` beside the sink)") from None
    except nats.errors.TimeoutError:
        raise QueryUnavailable(f"the query service did not answer {name!r} within {timeout_s:g} s") from None
    except nats.errors.MaxPayloadError:
        raise ReplyTooLarge(f"the arguments of query {name!r} do not fit in one NATS message") from None
    except nats.errors.Error as exc:
        raise QueryUnavailable(f"cannot ask the query service {name!r}: {exc!r}") from None
    return decode_reply(msg.data, name, into)


async def ask(bus: Bus, name: str, args: Mapping[str, Any] | None = None, *, into: Any = Any,
              timeout_s: float = TIMEOUT_S) -> Any:
    """Ask query `name` over the process's bus connection."""
    return await request(bus.nc, query_subject(bus.subjects, bus.auth.user), name, args, into=into,
                         timeout_s=timeout_s)


async def ask_pages(bus: Bus, name: str, args: Mapping[str, Any], *,
                    after: Callable[[dict[str, Any]], dict[str, Any]], page: int = 500,
                    timeout_s: float = TIMEOUT_S) -> list[dict[str, Any]]:
    """Every row of a query paged by key (`pages`), all at once."""
    return [row async for got in pages(bus, name, args, after=after, page=page, timeout_s=timeout_s) for row in got]


async def pages(bus: Bus, name: str, args: Mapping[str, Any], *, after: Callable[[dict[str, Any]], dict[str, Any]],
                page: int = 500, alone: Mapping[str, Any] | None = None,
                timeout_s: float = TIMEOUT_S) -> AsyncIterator[list[dict[str, Any]]]:
    """Every row of a query paged by key, a page at a time: `after(last row)` gives the arguments that start the next
    page. A page too large for one NATS message is asked again at half the size. A row too large alone raises
    ReplyTooLarge, or with `alone` (the arguments that ask for the query's light form of a row, its key at least) is
    asked again in that form and comes as a page of its own: never skipped unseen, nor read again for ever."""
    first = page
    cursor: dict[str, Any] = {}
    while True:
        try:
            got = await ask(bus, name, {**args, **cursor, "limit": page}, into=list[dict[str, Any]],
                            timeout_s=timeout_s)
        except ReplyTooLarge:
            if page > 1:
                page //= 2
                continue
            if alone is None:
                raise
            got = await ask(bus, name, {**args, **cursor, **alone, "limit": 1}, into=list[dict[str, Any]],
                            timeout_s=timeout_s)
            page = first  # the rows after it are most likely of the usual size: in pages as large again
            if got:
                yield got
                cursor = after(got[-1])
                continue
            return
        yield got
        if len(got) < page:
            return
        cursor = after(got[-1])
