"""A small HTTP/1.1 keep-alive client for the router's upstream calls, streamed or not.

Why not aiohttp's ClientSession: per call it builds a request object, a response object, a payload,
a timer and a connection wrapper, and was the largest single share of the router's CPU per request;
this client writes one buffer and reads the answer on a pooled connection (bench_stacks: about half
the CPU of the bare proxy hop). A stream's body is read as it arrives, line by line, and its
connection goes back to the pool once the stream was read to its end.

What it does: POST with a known body length; answers with Content-Length, chunked, or
read-to-close bodies; `Connection: close` honoured; redirects are not followed (an upstream API does
not redirect, and following one could carry lockgate's credential elsewhere: the 3xx is the answer);
idle connections reused per origin (http and https) for at most `keepalive_s`, and never after the
peer closed them. A call cancelled part way, or a stream let go before its end (a timeout, a client
that left), closes its connection: the upstream sees it and stops.
Calls in flight are bounded per endpoint (`Slots`), and within an endpoint per tenant, with a bounded wait for a slot
(`NoSlot` after it). Before, one pool of 1000 slots served every tenant and endpoint and its wait had no bound: one
tenant's 1000 calls to its own slow upstream held them all, and every other tenant's requests waited for a slot until
their first-byte timeout, recorded as their healthy upstream's silence (probe p37 F1).
The caller's timeouts stay the caller's: only the connect bound and the slot's wait are applied here.
A call may note when its answer last made progress at the router (`Heard`), for a caller that times the upstream's
silence: for an SSE stream an event with data, not the keep-alives a queueing gateway sends while no token comes.
"""

from __future__ import annotations

import asyncio
import fcntl
import math
import socket
import ssl
import sys
import termios
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from typing import NoReturn

from yarl import URL

from lockgate import __version__

_MAX_HEAD = 64 * 1024
_READ = 64 * 1024  # the most one read of a body takes
_USER_AGENT = f"lockgate/{__version__}"


class ConnectFailed(Exception):
    """The connection could not be opened (refused, unresolvable, reset during the TLS handshake)."""


class ConnectTimedOut(ConnectFailed):
    """The connection was not accepted within the connect timeout."""


class Stalled(TimeoutError):
    """A stream's next bytes did not come within its stall bound, or its time ran out (`Stream.stall_after`)."""


class NoSlot(Exception):
    """No slot of the endpoint came free for the call within its wait: the router's own capacity, no call was made.
    `in_use`, `limit`: the endpoint's slots; `mine`, `share`: the calling tenant's of them, and the most it may hold."""

    def __init__(self, in_use: int, limit: int, mine: int, share: int) -> None:
        super().__init__(f"{in_use} of {limit} connections in use, {mine} of them the tenant's (at most {share})")
        self.in_use, self.limit, self.mine, self.share = in_use, limit, mine, share


class BrokenReply(Exception):
    """The connection failed after the request was sent, or the answer was not valid HTTP/1.1."""


class Answer:
    """One upstream answer: status, headers (last value of a repeated name) and the whole body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


# How much of a line not ended yet an SSE scan keeps: enough to tell `data:` and `event: ping` by their start.
_LINE_START = 16


class Progress:
    """Tells an SSE stream's progress from its keep-alives, line by line: a `data:` line is progress, except in an
    `event: ping` event (Anthropic's keep-alive); comment lines (`:`, OpenRouter's `: OPENROUTER PROCESSING`, a proxy's
    `: keep-alive`), blank lines and other fields are not. A stream of `data:` events with empty deltas counts as
    progress: telling a token from an empty delta takes decoding each event's JSON in its API's shape, on every chunk of
    every stream, and such an answer is still timed by its endpoint's `total_s`.

    `feed` scans the raw bytes of a connection (a chunked body's framing included: its size lines are neither, and a
    split of `data:` itself by a chunk boundary hides that one event only); `line` takes one line of the body."""

    __slots__ = ("_ping", "_tail")

    def __init__(self) -> None:
        self._ping = False  # the event under way is a ping
        self._tail = b""  # the start of the line not ended yet

    def line(self, line: bytes) -> bool:
        """Whether `line` (one line of the stream, its end of line or not) is progress."""
        if line.startswith(b"data:"):
            return not self._ping
        if line.startswith(b"event:"):
            self._ping = line[6:].strip() == b"ping"
        elif not line.strip():  # the event ended
            self._ping = False
        return False

    def feed(self, data: bytes) -> bool:
        """Whether `data`, the bytes after those fed before (a line may go on from them), holds progress: bytes scanned,
        no JSON decoded (this is every chunk of every stream)."""
        buf = self._tail + data if self._tail else data
        if not self._ping and b"ping" not in buf:  # no ping event under way or beginning: any `data:` line is progress
            start = buf.rfind(b"\n") + 1
            self._tail = buf[start:start + _LINE_START]
            return buf.startswith(b"data:") or b"\ndata:" in buf
        lines = buf.split(b"\n")
        tail = lines.pop()
        self._tail = tail[:_LINE_START]
        found = False
        for line in lines:
            if self.line(line):
                found = True
        return found or (tail.startswith(b"data:") and not self._ping)  # a data line on its way is progress


class Heard:
    """When one call's answer last made progress at the router, on the caller's clock (`at`; -inf: none yet): as its
    connection took the bytes in, or, when the connection closed with bytes still unread in its socket, as it closed.
    Progress is any bytes of an answer, but for an SSE stream (`sse`, until the answer's head says otherwise, `plain`)
    only an event with data (`Progress`): an upstream that sends keep-alives and never a token was silent. Before, any
    bytes were heard, and a canary whose streams sent `: keep-alive` comments and no token was never judged: each
    hang-up was the client's, no call was unanswered, and the canary was paused at its weight or promoted (probe p41).

    A caller timing the upstream's silence needs it because its own loop may have been held (looplag): bytes that came
    during a hold were there, unread, and the silence ended with them; where none came, the hold hid nothing."""

    __slots__ = ("_clock", "_sse", "at")

    def __init__(self, clock: Callable[[], float], sse: bool = False) -> None:
        self._clock = clock
        self._sse = Progress() if sse else None
        self.at = -math.inf

    def note(self) -> None:
        """The answer made progress now."""
        self.at = self._clock()

    def feed(self, data: bytes) -> None:
        """Bytes of the answer are here now (after those fed before): noted if they are progress."""
        if self._sse is None or self._sse.feed(data):
            self.note()

    def plain(self) -> None:
        """The answer is no SSE stream (its head came, and is no 200): its bytes, the head's first, are progress."""
        if self._sse is not None:
            self._sse = None
            self.note()

    def closed(self, writer: asyncio.StreamWriter) -> None:
        """The call's connection closes: bytes of the answer still unread in its socket were here (a loop busy when
        they came did not read them). Of an SSE stream they are peeked at, to tell keep-alives; on TLS, where they
        cannot be, they are taken for progress (the upstream is not blamed for what the router could not read)."""
        count = _unread(writer)
        if not count:
            return
        seen = None if self._sse is None or writer.get_extra_info("ssl_object") is not None else _peek(writer, count)
        if seen is None:
            self.note()
        else:
            self.feed(seen)


class _Reader(asyncio.StreamReader):
    """A StreamReader that feeds its call's Heard the bytes that come in (the protocol feeds it as they are read)."""

    heard: Heard | None = None

    def feed_data(self, data: bytes) -> None:
        if self.heard is not None and data:
            self.heard.feed(data)
        super().feed_data(data)


class _Conn:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: _Reader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def usable(self, now: float, keepalive_s: float) -> bool:
        return not (self.reader.at_eof() or self.writer.is_closing() or now - self.idle_since > keepalive_s)

    def close(self) -> None:
        # A call cancelled (its client left) while bytes of its answer waited in the socket, unread because the loop
        # was busy: they had reached the router, as much as bytes already taken in.
        heard, self.reader.heard = self.reader.heard, None
        if heard is not None:
            heard.closed(self.writer)
        self.writer.close()


def _unread(writer: asyncio.StreamWriter) -> int:
    """How many bytes the connection's socket holds not read yet (FIONREAD; 0 when it cannot tell)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        count = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):  # closed already, or no such request for it
        return 0
    return int.from_bytes(count, sys.byteorder)


def _peek(writer: asyncio.StreamWriter, count: int) -> bytes | None:
    """Up to `count` bytes unread in the connection's socket, left there (MSG_PEEK); None when they cannot be read."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        # The transport's socket wrapper reads nothing: a socket object on its descriptor, detached (not closed) after.
        raw = socket.socket(fileno=sock.fileno())
    except (OSError, ValueError):
        return None
    try:
        return raw.recv(min(count, _READ), socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return None
    finally:
        raw.detach()


class Slots:
    """One endpoint's slots: at most `limit` calls in flight at once, of which at most `share` of one tenant's. A call
    that finds none free waits in its tenant's line, for a bounded time; a slot let go goes to the call waiting longest
    of the tenants below their share, so a tenant at its share never holds up another's calls. The lines are per
    tenant, so handing a slot over looks at the tenants waiting, not at every call: a tenant flooding an endpoint
    makes a long line of its own only."""

    __slots__ = ("_by", "_lines", "_seq", "_used", "limit", "share")

    def __init__(self, limit: int, share: int) -> None:
        self.limit, self.share = limit, share
        self._used = 0
        self._by: dict[str, int] = {}  # tenant -> its slots in use
        self._lines: dict[str, deque[tuple[int, asyncio.Future[None]]]] = {}  # tenant -> its calls waiting, in order
        self._seq = 0  # the order calls began waiting in, across the lines

    def _free_for(self, tenant: str) -> bool:
        return self._used < self.limit and self._by.get(tenant, 0) < self.share

    def _take(self, tenant: str) -> None:
        self._used += 1
        self._by[tenant] = self._by.get(tenant, 0) + 1

    async def take(self, tenant: str, wait_s: float | None) -> Slot:
        """A slot for a call of `tenant`, waited for at most `wait_s` seconds (None: no bound); NoSlot after that.
        A slot free now is free for nobody waiting (`free` hands each one over as it frees), so it is taken at once."""
        if self._free_for(tenant):
            self._take(tenant)
            return Slot(self, tenant)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        entry = (self._seq, waiter)
        line = self._lines.setdefault(tenant, deque())
        line.append(entry)
        try:
            async with asyncio.timeout(wait_s):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.free(tenant)  # handed over just as the wait ended: give it to the next in line
            else:
                self._leave(tenant, entry)
            if isinstance(exc, TimeoutError):
                raise NoSlot(self._used, self.limit, self._by.get(tenant, 0), self.share) from None
            raise
        return Slot(self, tenant)

    def _leave(self, tenant: str, entry: tuple[int, asyncio.Future[None]]) -> None:
        """A waiting call gave up: out of its line (mostly its head: calls of one tenant wait alike and give up in
        the order they came)."""
        line = self._lines.get(tenant)
        if line is None:
            return
        if line and line[0] is entry:
            line.popleft()
        elif entry in line:
            line.remove(entry)
        if not line:
            del self._lines[tenant]

    def free(self, tenant: str) -> None:
        """A call of `tenant` let go of its slot: hand slots over, each to the call waiting longest of the tenants
        below their share."""
        self._used -= 1
        left = self._by[tenant] - 1
        if left:
            self._by[tenant] = left
        else:
            del self._by[tenant]
        while self._lines and self._used < self.limit:
            first: str | None = None
            for who, line in self._lines.items():
                if self._by.get(who, 0) < self.share and (first is None or line[0][0] < self._lines[first][0][0]):
                    first = who
            if first is None:
                return
            line = self._lines[first]
            _, waiter = line.popleft()
            if not line:
                del self._lines[first]
            if waiter.done():  # cancelled (its client left, or its wait ran out), its task not yet run: skipped
                continue
            self._take(first)
            waiter.set_result(None)


class Slot:
    """One call's slot on an endpoint (`Slots.take`), let go once by `free()`."""

    __slots__ = ("_slots", "_tenant")

    def __init__(self, slots: Slots, tenant: str) -> None:
        self._slots: Slots | None = slots
        self._tenant = tenant

    def free(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.free(self._tenant)


class H1Pool:
    """Keep-alive connections per origin. Calls in flight are bounded per endpoint (a key the caller names, `slot`):
    at most `limit` on one endpoint, of which at most the fraction `share` of one tenant's, so neither a slow endpoint
    nor a busy tenant takes the connections of the others."""

    def __init__(self, limit: int = 1000, keepalive_s: float = 60.0, max_idle_per_origin: int = 256,
                 share: float = 1.0) -> None:
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._limit = limit
        self._share = max(1, math.floor(limit * share))  # a tenant may always have one call in flight
        self._slots: dict[Hashable, Slots] = {}
        self._keepalive_s = keepalive_s
        self._max_idle = max_idle_per_origin
        self._ssl: ssl.SSLContext | None = None
        self._heads: dict[URL, tuple[tuple[str, str, int], bytes]] = {}

    async def post(self, url: URL, body: bytes, headers: Mapping[str, str], connect_timeout_s: float | None) -> Answer:
        """POST `body` to `url` and read the whole answer; ConnectFailed/ConnectTimedOut before the
        request left, BrokenReply after."""
        stream = await self.open(url, body, headers, connect_timeout_s)
        try:
            body = await stream.read()
        finally:
            stream.release()
        return Answer(stream.status, stream.headers, body)

    def slots(self, endpoint: Hashable) -> Slots:
        """The slots of `endpoint` (made on first use)."""
        found = self._slots.get(endpoint)
        if found is None:
            found = self._slots[endpoint] = Slots(self._limit, self._share)
        return found

    async def slot(self, endpoint: Hashable, tenant: str, wait_s: float | None) -> Slot:
        """A slot for a call of `tenant` to `endpoint`, waited for at most `wait_s` seconds; NoSlot after that."""
        return await self.slots(endpoint).take(tenant, wait_s)

    async def open(self, url: URL, body: bytes, headers: Mapping[str, str], connect_timeout_s: float | None,
                   heard: Heard | None = None, slot: Slot | None = None) -> Stream:
        """POST `body` to `url` and return once the answer's head arrived: its body is read from the
        Stream as it comes (an SSE stream's lines), and the Stream must be released. `heard`: fed the answer's
        bytes as they come in, until the Stream is released. `slot`: the call's (`slot`), which the Stream lets go;
        without one, a slot of the URL's origin is waited for as long as a connection (NoSlot after that)."""
        try:
            origin, request = self._request(url, body, headers)
            if slot is None:
                slot = await self.slot(origin, "", connect_timeout_s)
        except BaseException:
            if slot is not None:  # the caller's: the call fails before it started, and lets go of it
                slot.free()
            raise
        try:
            conn = self._reuse(origin)
            if conn is not None:
                try:
                    return await self._start(origin, conn, request, heard, slot)
                except _Stale:
                    pass  # the peer closed it while idle and read nothing: a new connection is safe
            conn = await self._connect(origin, connect_timeout_s)
            try:
                return await self._start(origin, conn, request, heard, slot)
            except _Stale:
                raise BrokenReply("the upstream closed the connection without answering") from None
        except BaseException:
            slot.free()
            raise

    def close(self) -> None:
        """Close every idle connection (calls in flight close their own)."""
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _request(self, url: URL, body: bytes, headers: Mapping[str, str]) -> tuple[tuple[str, str, int], bytes]:
        """The origin to call and the request's bytes."""
        origin, start = self._head(url)
        lines = [start]
        for name, value in headers.items():
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:  # no header smuggling
                raise ValueError(f"header {name!r} has a line break")
            lines.append(f"{name}: {value}\r\n".encode())
        lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
        lines.append(body)
        return origin, b"".join(lines)

    def _head(self, url: URL) -> tuple[tuple[str, str, int], bytes]:
        # The request line and Host per URL: the same few upstream URLs on every call.
        known = self._heads.get(url)
        if known is None:
            if url.scheme not in ("http", "https") or not url.host:
                raise ConnectFailed(f"unsupported upstream URL scheme {url.scheme!r}")
            port = url.port or (443 if url.scheme == "https" else 80)
            host = url.raw_host or url.host
            if ":" in host:  # an IPv6 literal goes in brackets
                host = f"[{host}]"
            host_header = host if url.is_default_port() else f"{host}:{port}"
            start = (f"POST {url.raw_path_qs} HTTP/1.1\r\nHost: {host_header}\r\n"
                     f"User-Agent: {_USER_AGENT}\r\n").encode()
            if len(self._heads) > 1024:  # endpoints reloaded many times: forget the old ones
                self._heads.clear()
            known = self._heads[url] = ((url.scheme, url.host, port), start)
        return known

    def _reuse(self, origin: tuple[str, str, int]) -> _Conn | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.usable(now, self._keepalive_s):
                return conn
            conn.close()
        return None

    async def _connect(self, origin: tuple[str, str, int], timeout_s: float | None) -> _Conn:
        scheme, host, port = origin
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        loop = asyncio.get_running_loop()
        reader = _Reader(limit=_MAX_HEAD, loop=loop)
        try:
            async with asyncio.timeout(timeout_s):  # as asyncio.open_connection, with a reader that notes its bytes
                transport, protocol = await loop.create_connection(
                    lambda: asyncio.StreamReaderProtocol(reader, loop=loop), host, port, ssl=tls)
        except TimeoutError:
            raise ConnectTimedOut(f"no connection within {timeout_s} s") from None
        except OSError as exc:  # refused, unreachable, unresolvable (socket.gaierror), TLS failure (SSLError)
            raise ConnectFailed(str(exc)) from None
        return _Conn(reader, asyncio.StreamWriter(transport, protocol, reader, loop))

    async def _start(self, origin: tuple[str, str, int], conn: _Conn, request: bytes, heard: Heard | None,
                     slot: Slot) -> Stream:
        """Send the request and read the answer's head (1xx interim answers skipped)."""
        reader = conn.reader
        reader.heard = heard
        got_any = False
        try:
            conn.writer.write(request)
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial:
                        raise _Stale from None
                    raise
                got_any = True
                status, headers, length, chunked, close = _parse_head(head)
                if status >= 200 or status == 101:
                    break  # 1xx interim answers (100 Continue, 103 Early Hints) are skipped
            if heard is not None and status != 200:  # an error answer to a stream is no stream: its bytes are progress
                heard.plain()
        except _Stale:
            conn.close()
            raise
        except BaseException as exc:
            conn.close()  # a cancelled or failed call leaves the connection in an unknown state
            if not got_any and isinstance(exc, ConnectionResetError | BrokenPipeError):
                raise _Stale from None
            if isinstance(exc, _BROKEN):
                raise BrokenReply(f"{type(exc).__name__}: {exc}") from None
            raise
        if status in (204, 304):
            length, chunked = 0, False
        return Stream(self, origin, conn, status, headers, length, chunked, close, slot)

    def _done(self, origin: tuple[str, str, int], conn: _Conn, reusable: bool, slot: Slot) -> None:
        """A Stream let go of its connection: back to the idle list if its answer was read whole."""
        slot.free()
        if not reusable:
            conn.close()
            return
        conn.reader.heard = None  # the call is over: bytes on this connection from now on are another call's
        idle = self._idle.setdefault(origin, [])
        if len(idle) < self._max_idle:
            conn.idle_since = time.monotonic()
            idle.append(conn)
        else:
            conn.close()


class Stream:
    """One answer whose body is read as it arrives: by lines (an SSE stream) or whole. `release()`
    returns its connection to the pool when the body was read to its end, and closes it otherwise
    (the upstream sees the close and stops generating)."""

    __slots__ = ("_buf", "_chunk_left", "_chunked", "_close", "_conn", "_deadline", "_eof", "_left", "_origin",
                 "_loop", "_pool", "_since", "_slot", "_stall", "_timer", "headers", "status")

    def __init__(self, pool: H1Pool, origin: tuple[str, str, int], conn: _Conn, status: int,
                 headers: dict[str, str], length: int | None, chunked: bool, close: bool, slot: Slot) -> None:
        self._pool: H1Pool | None = pool
        self._slot = slot
        self._origin = origin
        self._conn = conn
        self.status = status
        self.headers = headers
        self._chunked = chunked
        self._left = None if chunked else length  # bytes of a Content-Length body still unread
        self._chunk_left = 0  # bytes of the current chunk still unread
        self._close = close or (length is None and not chunked)  # no length: the body runs to the close
        self._eof = length == 0 and not chunked
        self._buf = b""
        self._stall = self._deadline = 0.0
        self._since: float | None = None  # when the read now waiting for bytes began
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def stall_after(self, seconds: float, deadline: float) -> None:
        """From now on a read fails with Stalled when the body's next bytes take more than `seconds`,
        or the loop's clock passes `deadline`.

        One timer for the whole stream, which looks at the read in progress when it fires, instead of
        a timeout armed and cancelled around every line: a stream of many small events pays a time
        stamp per read. The timer fails only a read that is waiting, never bytes already buffered."""
        loop = self._loop = asyncio.get_running_loop()
        self._stall, self._deadline = seconds, deadline
        self._timer = loop.call_at(min(loop.time() + seconds, deadline), self._check)

    def _check(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        since = self._since
        if since is not None and (now - since >= self._stall or now >= self._deadline):
            self._timer = None
            self._conn.reader.set_exception(Stalled(f"no bytes for {now - since:.3g} s"))
            return
        if now >= self._deadline:  # no read is waiting: the next one fails as it starts
            self._timer = None
            return
        self._timer = loop.call_at(min((now if since is None else since) + self._stall, self._deadline), self._check)

    async def readline(self) -> bytes:
        """The next line, its b"\n" included; the last one may lack it; b"" at the end of the body."""
        buf = self._buf
        end = buf.find(b"\n")
        while end < 0 and not self._eof:
            piece = await self._piece()
            end = piece.find(b"\n")
            if end >= 0:
                end += len(buf)
            buf += piece
        if end < 0:  # the body ended without a final newline
            self._buf = b""
            return buf
        self._buf = buf[end + 1:]
        return buf[:end + 1]

    async def read(self) -> bytes:
        """The rest of the body."""
        if self._left and not self._buf:  # a body of known length, none of it read yet: one read
            try:
                data = await self._conn.reader.readexactly(self._left)
            except BaseException as exc:
                self._fail(exc)
            self._left, self._eof = 0, True
            return data
        parts = [self._buf]
        self._buf = b""
        while not self._eof:
            parts.append(await self._piece())
        return b"".join(parts)

    def release(self) -> None:
        """Let go of the connection (once; later calls do nothing)."""
        pool, self._pool = self._pool, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if pool is not None:
            pool._done(self._origin, self._conn, self._eof and not self._close, self._slot)

    async def _piece(self) -> bytes:
        """The next bytes of the body as they arrive (BrokenReply if the connection fails first)."""
        reader = self._conn.reader
        if self._loop is not None:
            self._since = now = self._loop.time()
            if now >= self._deadline:
                self._fail(Stalled("the stream's time ran out"))
        try:
            if self._chunked:
                if self._chunk_left == 0:
                    size_line = await reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, up to the blank line
                            continue
                        self._eof = True
                        return b""
                    self._chunk_left = size
                data = await reader.read(self._chunk_left)
                if not data:
                    raise asyncio.IncompleteReadError(b"", self._chunk_left)
                self._chunk_left -= len(data)
                if self._chunk_left == 0:
                    await reader.readexactly(2)  # the chunk's CRLF
                return data
            if self._left is None:  # read to close
                data = await reader.read(_READ)
                self._eof = not data
                return data
            data = await reader.read(min(self._left, _READ))
            if not data:
                raise asyncio.IncompleteReadError(b"", self._left)
            self._left -= len(data)
            self._eof = self._left == 0
            return data
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._since = None

    def _fail(self, exc: BaseException) -> NoReturn:
        self._close = True  # a cancelled or failed read leaves the connection in an unknown state
        self.release()
        if isinstance(exc, _BROKEN):
            raise BrokenReply(f"{type(exc).__name__}: {exc}") from None
        raise exc


# What a connection that failed after the request left raises (a cancellation stays itself).
_BROKEN = (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


class _Stale(Exception):
    """A reused connection the peer had closed: nothing came back, so nothing was processed."""


def _parse_head(head: bytes) -> tuple[int, dict[str, str], int | None, bool, bool]:
    """Status, headers (as sent), Content-Length, whether the body is chunked, and whether the
    connection closes after this answer."""
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    status_line = lines[0]
    if not status_line.startswith("HTTP/1.") or len(status_line) < 12:
        raise ValueError(f"not an HTTP/1.x status line: {status_line[:40]!r}")
    status = int(status_line[9:12])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"malformed header line {line[:40]!r}")
        headers[name.strip()] = value.strip()
    length: int | None = None
    close = status_line.startswith("HTTP/1.0")  # 1.0 closes unless it says keep-alive
    chunked = False
    for name, value in headers.items():
        low = name.lower()
        if low == "content-length":
            length = int(value)
            if length < 0:
                raise ValueError(f"negative Content-Length {value!r}")
        elif low == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif low == "connection":
            close = value.lower() == "close" or (close and value.lower() != "keep-alive")
    return status, headers, length, chunked, close
