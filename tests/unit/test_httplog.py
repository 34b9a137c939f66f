"""The one log line of a request aiohttp's parser refused: its reason and header, never the bytes it quotes."""

from __future__ import annotations

import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, BadStatusLine, InvalidHeader, LineTooLong

from lockgate.server.httplog import reason

SECRET = "lg-S4Vi-o9mKphY_9AXecCG-E_43jIqZCM0gDprnQhZshc"
AUTH_CTL = f"Authorization: Bearer {SECRET}\x01".encode()
COOKIE_CR = f"Cookie: s={SECRET}\r".encode()


@pytest.mark.parametrize("exc,logged", [
    # llhttp's form (aiohttp's C parser): the reason, the refused line's repr, a caret under the byte.
    (BadHttpMessage(f"Invalid header value char:\n\n  {AUTH_CTL!r}\n  {' ' * 70}^"),
     "Invalid header value char, in header Authorization"),
    (BadHttpMessage(f"Missing expected LF after header value:\n\n  {COOKIE_CR!r}\n  {' ' * 50}^"),
     "Missing expected LF after header value, in header Cookie"),
    # aiohttp's Python parser (AIOHTTP_NO_EXTENSIONS) quotes them in its own words.
    (InvalidHeader(f"x-api-key: {SECRET}\x00".encode()), "Invalid HTTP header, in header x-api-key"),
    (LineTooLong(f"X-Token: {SECRET}".encode() + b"...", 8190),
     "Got more than 8190 bytes when reading, in header X-Token."),
    (BadStatusLine(f"GET /v1/models?api_key={SECRET} HTTP/1.1".encode()),  # its repr of a repr
     "Bad status line (the request's bytes are not logged)"),
    (BadHttpMethod(f"GE\x01T /?key={SECRET}'s"), "Bad HTTP method in status line (the request's bytes are not logged)"),
    (BadHttpMessage("Too many headers received"), "Too many headers received"),
])
def test_the_reason_keeps_no_byte_of_the_request(exc: BadHttpMessage, logged: str) -> None:
    assert reason(exc) == logged
    assert SECRET[3:15] not in reason(exc)
