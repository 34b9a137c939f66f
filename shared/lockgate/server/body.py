"""Reading a request's body in lockgate's aiohttp servers (the router, its admin API, the OTLP receiver)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from lockgate.errors import BodyTooLarge, UnreadableBody


async def read_body(request: web.Request) -> bytes:
    """The body with its Content-Encoding undone (aiohttp undoes gzip and deflate), or UnreadableBody
    saying why not: aiohttp raises a bare exception for a corrupt stream, which handlers turned into a
    500 and a traceback in the log for what is the client's mistake, and answers a body over the app's
    `client_max_size` in plain text, not in the API's own error shape (BodyTooLarge, 413)."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLarge(f"the request body is too large: {exc.text}") from None
    except RequestPayloadError:
        request.content.feed_eof()  # else aiohttp reads on after the answer, fails again and logs a traceback
        encoding = request.headers.get("Content-Encoding", "")
        raise UnreadableBody(f"the request body is not valid {encoding} data (Content-Encoding: {encoding})"
                             if encoding else "the request body ended before its declared length") from None


def closing(response: web.StreamResponse) -> web.StreamResponse:
    """The answer to an UnreadableBody, with the connection closed after it (`Connection: close`): the
    server stopped inside that body, so what follows on the connection cannot be read as a request."""
    response.force_close()
    return response
