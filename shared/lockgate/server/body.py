"""Reading a request's body in lockgate's aiohttp servers (the router, its admin API, the OTLP receiver)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from lockgate.errors import UnreadableBody


async def read_body(request: web.Request) -> bytes:
    """The body with its Content-Encoding undone (aiohttp undoes gzip and deflate), or UnreadableBody
    saying why not: aiohttp raises a bare exception for a corrupt stream, which handlers turned into a
    500 and a traceback in the log for what is the client's mistake."""
    try:
        return await request.read()
    except RequestPayloadError:
        request.content.feed_eof()  # else aiohttp reads on after the answer, fails again and logs a traceback
        encoding = request.headers.get("Content-Encoding", "")
        raise UnreadableBody(f"the request body is not valid {encoding} data (Content-Encoding: {encoding})"
                             if encoding else "the request body ended before its declared length") from None


def closing(response: web.StreamResponse) -> web.StreamResponse:
    """The answer to an UnreadableBody, with the connection closed after it (`Connection: close`): the
    parser stopped inside that body, so what follows on the connection cannot be read as a request."""
    response.force_close()
    return response
