"""aiohttp's server log for lockgate's HTTP servers: a request aiohttp's parser refused (a NUL in a
header, a folded header line, a line too long) is the client's fault, logged as one warning line.

aiohttp answers such a request itself, before any application code runs (a plain-text 400: it offers
no supported hook for that answer's body, aio-libs/aiohttp#3287), and logs it through the server's
`logger` (an AppRunner argument) as an ERROR with a traceback; anything else it logs there (a handler
that raised) stays an ERROR with its traceback.

The parser's message holds the bytes it refused (`b'Authorization: Bearer lg-...\\r'`, a request target
`http://user:lg-...@/`): an API key sent with a stray control byte, a cookie, any credential a client put
in that line. The log keeps only text known to be safe: the kind of error (from its class), a sentence
aiohttp raises word for word, the header's name where aiohttp gives it apart from the bytes, the limit a
line passed. Taking the bytes out of the message instead cannot be done safely: the message has no fixed
shape (a target aiohttp gives bare, an apostrophe in a reason read as a quote, probe p58 F4).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
    TransferEncodingError,
)

# Each class's kind, most specific first (a BadHttpMethod is a BadStatusLine, every one a HttpProcessingError).
_KINDS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (BadHttpMethod, "bad HTTP method"),
    (BadStatusLine, "bad status line"),
    (InvalidURLError, "invalid URL"),
    (InvalidHeader, "invalid header"),
    (LineTooLong, "line too long"),
    (TransferEncodingError, "bad chunked body"),
    (ContentLengthError, "body shorter than its Content-Length"),
    (ContentEncodingError, "bad Content-Encoding"),
    (PayloadEncodingError, "bad body encoding"),
    (BadHttpMessage, "malformed request"),
    (HttpProcessingError, "HTTP error"),
)
# Sentences aiohttp raises whole, with nothing of the request in them: logged as they are.
_SENTENCES = frozenset({
    "Received HTTPS traffic on an HTTP port",
    "Too many headers received",
    "Too many trailers received",
    "Missing 'Host' header in request.",
    "Request has invalid `Transfer-Encoding`",
    "Data after `Connection: close`",
    "Bad line ending, expected CRLF",
})
# An HTTP token (RFC 9110 5.6.2), as a header's name is.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")


def _kind(exc: HttpProcessingError) -> str:
    return next(kind for cls, kind in _KINDS if isinstance(exc, cls))


def _detail(exc: HttpProcessingError) -> str:
    """What aiohttp gives apart from the request's bytes: a header it names itself (a str; the bytes it
    quotes are bytes, a line without a colon among them), the limit a line passed."""
    if isinstance(exc, InvalidHeader) and exc.args and isinstance(exc.args[0], str) and _TOKEN.fullmatch(exc.args[0]):
        return f", in header {exc.args[0]}"
    if isinstance(exc, LineTooLong) and len(exc.args) > 1 and isinstance(exc.args[1], int):
        return f" (over {exc.args[1]} bytes)"
    return ""


def reason(exc: HttpProcessingError) -> str:
    """Why aiohttp refused a request, on one line, in text known to hold nothing of the request."""
    if exc.message in _SENTENCES:
        return str(exc.message)
    return _kind(exc) + _detail(exc)


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp.server's logger, with parse errors as one-line warnings."""

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.warning("%s: malformed HTTP, answered %s: %s", str(msg) % args, exc_info.code, reason(exc_info))
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


SERVER_LOG = ServerLog(logging.getLogger("aiohttp.server"), {})
