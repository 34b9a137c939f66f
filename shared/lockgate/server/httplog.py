"""aiohttp's server log for lockgate's HTTP servers: a request aiohttp's parser refused (a NUL in a
header, a folded header line, a line too long) is the client's fault, logged as one warning line.

aiohttp answers such a request itself, before any application code runs (a plain-text 400: it offers
no supported hook for that answer's body, aio-libs/aiohttp#3287), and logs it through the server's
`logger` (an AppRunner argument) as an ERROR with a traceback; anything else it logs there (a handler
that raised) stays an ERROR with its traceback.

The parser's message quotes the bytes it refused (`b'Authorization: Bearer lg-...\\r'`): an API key sent
with a stray control byte, a cookie, any credential a client put in that line. The log keeps the reason
and the header's name, never those bytes: scrubbing them would miss every secret of a shape it does not
know (a cookie, a custom header's token).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from aiohttp.http import HttpProcessingError

# A Python repr of the request's bytes or text, as aiohttp quotes them (`b'...'`, `'...'`, `"..."`), and the
# `: ` or space before it.
_QUOTED = re.compile(r"""(?::?\s)?b?(['"])(?:\\.|(?!\1).)*\1""")
# ... whose line is a header's: `b'Name: value'`. Its name is the useful part of the reason, and no secret.
_HEADER = re.compile(r"""(?::?\s)?b?['"]([A-Za-z0-9-]{1,64}):""")


def _withheld(quoted: re.Match[str]) -> str:
    header = _HEADER.match(quoted.group())
    return f", in header {header.group(1)}" if header else " (the request's bytes are not logged)"


def reason(exc: HttpProcessingError) -> str:
    """aiohttp's reason for refusing a request, on one line, without the request's bytes it quotes."""
    text = " ".join(str(exc.message).split())  # aiohttp's message spans lines (the bytes, a caret under one)
    return _QUOTED.sub(_withheld, text).removesuffix(" ^")


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp.server's logger, with parse errors as one-line warnings."""

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.warning("%s: malformed HTTP, answered %s: %s", str(msg) % args, exc_info.code, reason(exc_info))
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


SERVER_LOG = ServerLog(logging.getLogger("aiohttp.server"), {})
