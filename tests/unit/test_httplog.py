"""The one log line of a request aiohttp's parser refused: text known to be safe (the error's kind, a header aiohttp
names itself, a sentence it raises whole), never anything of the request (probe p54 F1, p58 F4)."""

from __future__ import annotations

import pytest
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    ContentLengthError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)

from lockgate.server.httplog import reason

SECRET = "lg-S4Vi-o9mKphY_9AXecCG-E_43jIqZCM0gDprnQhZshc"
AUTH_CTL = f"Authorization: Bearer {SECRET}\x01".encode()
COOKIE_CR = f"Cookie: s={SECRET}\r".encode()
TE_TOKEN = f"Transfer-Encoding: chunked;token={SECRET}".encode()


@pytest.mark.parametrize("exc,logged", [
    # llhttp's form (aiohttp's C parser): the reason, the refused line's repr, a caret under the byte.
    (BadHttpMessage(f"Invalid header value char:\n\n  {AUTH_CTL!r}\n  {' ' * 70}^"), "malformed request"),
    (BadHttpMessage(f"Missing expected LF after header value:\n\n  {COOKIE_CR!r}\n  {' ' * 50}^"),
     "malformed request"),
    # The apostrophe of "can't" is no quote: before (probe p58 F4) the bytes after the real quote went out whole.
    (BadHttpMessage(f"Transfer-Encoding can't be present with Content-Length:\n\n  {TE_TOKEN!r}\n  {' ' * 20}^"),
     "malformed request"),
    # aiohttp gives a request target bare, unquoted: before (probe p58 F4) it went out whole, a password with it.
    (InvalidURLError(f"http://alice:{SECRET}@/v1/models"), "invalid URL"),
    (InvalidURLError(f"{SECRET}:notaport"), "invalid URL"),  # CONNECT's authority-form
    (InvalidURLError(f"Invalid char in url query:\n\n  {f'GET /?k={SECRET}'.encode()!r}\n  ^"), "invalid URL"),
    # aiohttp's Python parser (AIOHTTP_NO_EXTENSIONS) quotes them in its own words.
    (InvalidHeader(f"x-api-key: {SECRET}\x00".encode()), "invalid header"),
    (InvalidHeader(SECRET.encode()), "invalid header"),  # a line without a colon: bytes, though a token
    (InvalidHeader("Content-Length"), "invalid header, in header Content-Length"),  # named by aiohttp, a str
    (LineTooLong(f"X-Token: {SECRET}".encode() + b"...", 8190), "line too long (over 8190 bytes)"),
    (BadStatusLine(f"GET /v1/models?api_key={SECRET} HTTP/1.1".encode()), "bad status line"),  # type: ignore[arg-type]
    (BadHttpMethod(f"GE\x01T /?key={SECRET}'s"), "bad HTTP method"),
    (BadHttpMethod("\x16\x03\x01"), "Received HTTPS traffic on an HTTP port"),
    (BadHttpMessage("Too many headers received"), "Too many headers received"),
    (BadHttpMessage(f"Duplicate '{SECRET}' header found."), "malformed request"),
    (TransferEncodingError(f"Not enough data to satisfy transfer length header. {SECRET}"), "bad chunked body"),
    (ContentLengthError(f"Not enough data to satisfy content length header. {SECRET}"),
     "body shorter than its Content-Length"),
])
def test_the_reason_keeps_no_byte_of_the_request(exc: BadHttpMessage, logged: str) -> None:
    assert reason(exc) == logged
    assert SECRET[3:15] not in reason(exc)
