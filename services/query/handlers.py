"""NATS request/reply edge of the query service: decode the request, run the named query off the
event loop, reply with rows or with the error's kind and message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec

from lockgate.codec import to_json
from lockgate.errors import ConfigError, LockgateError, ReplyTooLarge
from lockgate.queryclient import QueryRequest
from lockgate.server.service import Progress
from lockgate.services.query import registry
from lockgate.store import Store

log = logging.getLogger("lockgate.query")

_requests = msgspec.json.Decoder(QueryRequest)


def error_reply(exc: BaseException) -> bytes:
    """`{"error", "kind"}`: a LockgateError keeps its class name so the client raises the same one."""
    if isinstance(exc, LockgateError):
        return to_json({"error": exc.message, "kind": type(exc).__name__})
    return to_json({"error": f"{type(exc).__name__}: {exc}", "kind": "LockgateError"})


class QueryHandlers:
    """Answers one request at a time per subscription; the store serialises queries anyway."""

    def __init__(self, store: Store, max_payload: int) -> None:
        self.store = store
        self.max_payload = max_payload
        self.answered = Progress()

    async def answer(self, data: bytes) -> bytes:
        """The reply bytes for one request (never raises: every failure is an error reply)."""
        name = "?"
        try:
            try:
                request = _requests.decode(data)
            except msgspec.DecodeError as exc:
                raise ConfigError(f'a query request is {{"query": name, "args": {{...}}}}: {exc}') from None
            name = request.query
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
        """Reply to one request (a caller that gave up meanwhile is not an error)."""
        reply = await self.answer(msg.data)
        with contextlib.suppress(Exception):
            await msg.respond(reply)
        await self.answered.bump()
