"""NATS request/reply edge of the query service: decode the request, run the named query off the
event loop, reply with rows or with the error's kind and message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from lockgate.codec import UNDECODABLE, to_json, undecodable
from lockgate.errors import ConfigError, LockgateError, QueryUnavailable, ReplyTooLarge
from lockgate.permissions import is_inbox
from lockgate.queryclient import QueryRequest
from lockgate.server.service import Progress
from lockgate.services.query import registry
from lockgate.store import Store
from lockgate.store.client import READONLY_SETTINGS

log = logging.getLogger("lockgate.query")

_requests = msgspec.json.Decoder(QueryRequest)

OPERATOR_SQL = "sql"
# Operator queries waiting for their turn beyond this are answered "busy" at once (each may run 25 s).
MAX_SQL_WAITING = 8
# Requests whose reply is no inbox are dropped; logged at most once this often (each may be one of a flood).
REFUSED_LOG_S = 60.0
# The bounds of every named query, set on each query (never in its text): the operator session's, but for readonly
# (a named query's text is lockgate's own). Without them a viewer's legal `served_events` since 1970 was built whole
# in the process's memory before its size was checked, and a scan ran as long as it took.
# max_block_size is operator SQL's alone: it bounds what one block read block by block may bring past the byte bound
# (`Store.readonly_rows`), and named queries are read whole, their text lockgate's own.
NAMED_QUERY_SETTINGS = {k: v for k, v in READONLY_SETTINGS.items() if k not in ("readonly", "max_block_size")}
# Named queries answered at once per lane, each in a store session of its own (one session answers one query at a
# time); one lane for the services (the gatekeeper's, the router's, the evaluator's reads), one for the CLI's roles.
LANE_WIDTH = 2
# The roles' named queries waiting for their turn beyond this are answered "busy" at once; the services' always wait.
MAX_CLI_WAITING = 16


class Lane:
    """Named queries of one kind of caller, as many at a time as it has sessions: a slow one of the CLI's delays only
    the CLI's."""

    def __init__(self, name: str, sessions: list[Store], max_waiting: int | None) -> None:
        self.name = name
        self.max_waiting = max_waiting
        self.waiting = 0  # asked and not answered yet, running or queued
        self._free: asyncio.Queue[Store] = asyncio.Queue()
        for session in sessions:
            self._free.put_nowait(session)

    @property
    def full(self) -> bool:
        """Whether one more request would wait past the lane's bound."""
        return self.max_waiting is not None and self.waiting >= self.max_waiting

    async def take(self) -> Store:
        """A free session (waits for one, holding no thread)."""
        return await self._free.get()

    def give_back(self, session: Store) -> None:
        """Return a session taken with `take`."""
        self._free.put_nowait(session)


def error_reply(exc: BaseException) -> bytes:
    """`{"error", "kind"}`: a LockgateError keeps its class name so the client raises the same one."""
    if isinstance(exc, LockgateError):
        return to_json({"error": exc.message, "kind": type(exc).__name__})
    return to_json({"error": f"{type(exc).__name__}: {exc}", "kind": "LockgateError"})


def _encoded(store: Store, name: str, args: Any) -> bytes:
    """A query's reply, run and encoded in a worker thread: a megabyte's encoding on the event loop held up everything
    sharing the process (in `lockgate up`, the router: its /healthz took 3.4 s; probe p44 F1)."""
    return to_json({"rows": registry.run(store, name, args)})


class QueryHandlers:
    """Answers named queries in two lanes, the services' (`subjects.query`) and the CLI's roles'
    (`subjects.query_cli`, the only one they may publish to), each a few at a time in store sessions of its own, and
    operator SQL one at a time beside them, in its own read-only session. Before, every named query was answered
    one at a time in the subscription's callback: four legal requests of a viewer made the gatekeeper's reads wait
    30 times as long, and an operator's query in that turn made every service's wait (and time out).

    `session()` opens a store session for a lane (bounded by NAMED_QUERY_SETTINGS); without one every lane
    shares `store` (one query at a time, as ClickHouse's session allows)."""

    def __init__(self, store: Store, max_payload: int, *, cli_subject: str = "",
                 session: Callable[[], Store] | None = None) -> None:
        self.store = store
        self.max_payload = max_payload
        # Operator SQL stops reading a result once it passes what one reply may carry (or its own 16 MB bound).
        store.readonly_result_bytes = min(store.readonly_result_bytes, max_payload)
        self.cli_subject = cli_subject
        self.answered = Progress()
        # The sessions this object opened, closed by `finish`.
        self.sessions = [session() for _ in range(2 * LANE_WIDTH)] if session is not None else []
        services, cli = (self.sessions[:LANE_WIDTH], self.sessions[LANE_WIDTH:]) if session is not None else ([store],
                                                                                                          [store])
        self.lanes = {"services": Lane("services", services, None), "cli": Lane("cli", cli, MAX_CLI_WAITING)}
        self._sql_turn = asyncio.Lock()
        self._sql_waiting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused = Progress()  # requests whose reply was no requester's inbox: never answered
        self._refused_unlogged = 0
        self._refused_log_at = 0.0  # monotonic time from which the next refusal is logged

    async def answer(self, request: QueryRequest, store: Store | None = None) -> bytes:
        """The reply bytes for one request, run on `store` (else the service's); never raises: every failure is an
        error reply."""
        name = request.query
        try:
            reply = await asyncio.to_thread(_encoded, store or self.store, name, request.args)
        except Exception as exc:  # the caller gets the message; the service keeps serving
            if not isinstance(exc, LockgateError):
                log.exception("query %s failed", name)
            return error_reply(exc)
        if len(reply) > self.max_payload:
            # NATS would refuse to send it and the caller would only see a timeout.
            return error_reply(ReplyTooLarge(
                f"the result of query {name!r} is {len(reply):,} bytes, more than the {self.max_payload:,} "
                "one NATS message may carry; ask for fewer rows or narrow the query"))
        return reply

    async def on_request(self, msg: Any) -> None:
        """Reply to one request (a caller that gave up meanwhile is not an error), in a task of its own: operator
        SQL in its own turn, a named query in its caller's lane, so the next request need not wait for either."""
        if not is_inbox(msg.reply):
            await self._refuse(msg)
            return
        try:
            request = _requests.decode(msg.data)
        except UNDECODABLE as exc:  # a request nested too deeply too: answered, never left to time out
            await self._respond(msg, error_reply(ConfigError(
                f'a query request is {{"query": name, "args": {{...}}}}: {undecodable(exc)}')))
            return
        if request.query == OPERATOR_SQL:
            if self._sql_waiting >= MAX_SQL_WAITING:
                await self._respond(msg, error_reply(QueryUnavailable(
                    f"the query service is busy with {self._sql_waiting} operator queries; retry shortly")))
                return
            self._sql_waiting += 1
            self._spawn(self._answer_sql(msg, request), "query:operator-sql")
            return
        lane = self.lanes["cli" if self.cli_subject and msg.subject == self.cli_subject else "services"]
        if lane.full:
            await self._respond(msg, error_reply(QueryUnavailable(
                f"the query service is busy with {lane.waiting} queries of the CLI's roles; retry shortly")))
            return
        lane.waiting += 1
        self._spawn(self._answer_named(lane, msg, request), f"query:{lane.name}")

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_named(self, lane: Lane, msg: Any, request: QueryRequest) -> None:
        try:
            session = await lane.take()
            try:
                reply = await self.answer(request, session)
            finally:
                lane.give_back(session)
        finally:
            lane.waiting -= 1
        await self._respond(msg, reply)

    async def _answer_sql(self, msg: Any, request: QueryRequest) -> None:
        try:
            async with self._sql_turn:  # waiting here holds no thread: the executor is the whole process's
                reply = await self.answer(request)
        finally:
            self._sql_waiting -= 1
        await self._respond(msg, reply)

    async def _refuse(self, msg: Any) -> None:
        # Any stack role may ask, and names the reply subject: answering one that is no inbox published the rows
        # where the requester chose (a KV key's subject stored them as that key's value). The query identity may
        # publish on inboxes only (permissions.py), so the server would refuse the answer anyway.
        await self.refused.bump()
        self._refused_unlogged += 1
        now = time.monotonic()
        if now < self._refused_log_at:
            return
        log.warning("query: dropped %d request(s) on %s whose reply is not a requester's inbox (the latest: %r); "
                    "only `_INBOX.` subjects are answered. Logged at most once every %g s",
                    self._refused_unlogged, msg.subject, msg.reply, REFUSED_LOG_S)
        self._refused_unlogged, self._refused_log_at = 0, now + REFUSED_LOG_S

    async def _respond(self, msg: Any, reply: bytes) -> None:
        # Counted before the reply leaves: a caller holding its answer finds it counted already.
        await self.answered.bump()
        with contextlib.suppress(Exception):
            await msg.respond(reply)

    async def finish(self) -> None:
        """Wait for the queries being answered (the subscription is drained first), then close the lanes' sessions."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for session in self.sessions:
            if session is not self.store:  # an in-memory store's lanes share it
                with contextlib.suppress(Exception):
                    session.close()
        self.sessions = []
