"""aiohttp's server log for lockgate's HTTP servers: a request aiohttp's parser refused (a NUL in a
header, a folded header line, a line too long) is the client's fault, logged as one warning line.

aiohttp answers such a request itself, before any application code runs (a plain-text 400: it offers
no supported hook for that answer's body, aio-libs/aiohttp#3287), and logs it through the server's
`logger` (an AppRunner argument) as an ERROR with a traceback; anything else it logs there (a handler
that raised) stays an ERROR with its traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp.http import HttpProcessingError


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp.server's logger, with parse errors as one-line warnings."""

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            why = " ".join(str(exc_info.message).split())  # aiohttp's message spans lines (the bytes, a caret)
            self.warning("%s: malformed HTTP, answered %s: %s", str(msg) % args, exc_info.code, why)
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


SERVER_LOG = ServerLog(logging.getLogger("aiohttp.server"), {})
