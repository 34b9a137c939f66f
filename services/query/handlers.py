"""NATS request/reply edge of the query service: decode the request, run the named query off the
event loop, reply with rows or with the error's kind and message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec

from lockgate.codec import UNDECODABLE, to_json, undecodable
from lockgate.errors import ConfigError, LockgateError, QueryUnavailable, ReplyTooLarge
from lockgate.permissions import is_inbox
from lockgate.queryclient import QueryRequest
from lockgate.server.service import Progress
from lockgate.services.query import registry
from lockgate.store import Store

log = logging.getLogger("lockgate.query")

_requests = msgspec.json.Decoder(QueryRequest)

OPERATOR_SQL = "sql"
# Operator queries waiting for their turn beyond this are answered "busy" at once (each may run 25 s).
MAX_SQL_WAITING = 8
# Requests whose reply is no inbox are dropped; logged at most once this often (each may be one of a flood).
REFUSED_LOG_S = 60.0


def error_reply(exc: BaseException) -> bytes:
    """`{"error", "kind"}`: a LockgateError keeps its class name so the client raises the same one."""
    if isinstance(exc, LockgateError):
        return to_json({"error": exc.message, "kind": type(exc).__name__})
    return to_json({"error": f"{type(exc).__name__}: {exc}", "kind": "LockgateError"})


class QueryHandlers:
    """Answers named queries one at a time (the store serialises them anyway), and operator SQL one at a
    time beside them, in its own read-only session: an operator's query may run for a minute, and in
    the named queries' turn it made every service's query wait that long (and time out)."""

    def __init__(self, store: Store, max_payload: int) -> None:
        self.store = store
        self.max_payload = max_payload
        self.answered = Progress()
        self._sql_turn = asyncio.Lock()
        self._sql_waiting = 0
        self._sql_tasks: set[asyncio.Task[None]] = set()
        self.refused = Progress()  # requests whose reply was no requester's inbox: never answered
        self._refused_unlogged = 0
        self._refused_log_at = 0.0  # monotonic time from which the next refusal is logged

    async def answer(self, request: QueryRequest) -> bytes:
        """The reply bytes for one request (never raises: every failure is an error reply)."""
        name = request.query
        try:
            rows = await asyncio.to_thread(registry.run, self.store, name, request.args)
            reply = to_json({"rows": rows})
        except Exception as exc:  # the caller gets the message; the service keeps serving
            if not isinstance(exc, LockgateError):
                log.exception("query %s failed", name)
            return error_reply(exc)
        if len(reply) > self.max_payload:
            # NATS would refuse to send it and the caller would only see a timeout.
            return error_reply(ReplyTooLarge(
                f"the result of query {name!r} is {len(reply):,} bytes, more than the {self.max_payload:,} "
                "one NATS message may carry; ask for fewer rows (a smaller --limit or a narrower filter)"))
        return reply

    async def on_request(self, msg: Any) -> None:
        """Reply to one request (a caller that gave up meanwhile is not an error); operator SQL is
        answered in its own turn, so the next named query need not wait for it."""
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
            task = asyncio.create_task(self._answer_sql(msg, request), name="query:operator-sql")
            self._sql_tasks.add(task)
            task.add_done_callback(self._sql_tasks.discard)
            return
        await self._respond(msg, await self.answer(request))

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
        """Wait for the operator queries being answered (the subscription is drained first)."""
        if self._sql_tasks:
            await asyncio.gather(*self._sql_tasks, return_exceptions=True)
