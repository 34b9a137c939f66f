"""The router's keep-alive client for non-streamed upstream calls (services/router/h1.py), against a
real TCP server that answers as HTTP/1.1 upstreams do (lengths, chunked bodies, closes)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import socket
from collections.abc import AsyncIterator, Callable

import pytest
from yarl import URL

from lockgate.services.router.h1 import BrokenReply, ConnectFailed, H1Pool, Heard, Stalled

pytestmark = pytest.mark.timeout(30)

Answer = Callable[[bytes], bytes | None]  # request bytes -> raw answer (None: close without answering)


class _Upstream:
    """Counts connections and requests; answers each request with `answer` (or closes after it)."""

    def __init__(self, answer: Answer, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self.arrived = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.url = URL()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                self.arrived.set()
                raw = self.answer(request)
                if raw is None:
                    return
                writer.write(raw)
                await writer.drain()
                if self.close_after:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()
            self.closed.set()


@contextlib.asynccontextmanager
async def _serving(answer: Answer, close_after: bool = False) -> AsyncIterator[_Upstream]:
    upstream = _Upstream(answer, close_after)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream.url = URL(f"http://127.0.0.1:{port}/v1/chat/completions")
    try:
        yield upstream
    finally:
        server.close()
        for w in upstream.writers:
            w.close()


def _ok(body: bytes = b'{"ok": true}', extra: bytes = b"") -> Answer:
    return lambda _req: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_calls_reuse_one_connection_and_send_the_headers_and_body() -> None:
    pool = H1Pool()
    async with _serving(_ok(extra=b"x-request-id: req-1\r\nX-RateLimit-Remaining: 9\r\n")) as up:
        for i in range(3):
            answer = await pool.post(up.url, b'{"n": %d}' % i, {"Authorization": "Bearer k", "traceparent": "t"}, 1.0)
            assert (answer.status, answer.body) == (200, b'{"ok": true}')
            assert answer.headers["x-request-id"] == "req-1" and answer.headers["X-RateLimit-Remaining"] == "9"
        assert up.connections == 1 and len(up.requests) == 3
        first = up.requests[0]
        assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"\r\nAuthorization: Bearer k\r\n" in first and first.endswith(b'\r\n\r\n{"n": 0}')
    pool.close()


async def test_chunked_and_read_to_close_bodies() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n5\r\n: 1}\n\r\n0\r\n\r\n"
    pool = H1Pool()
    async with _serving(lambda _req: chunked) as up:
        assert (await pool.post(up.url, b"{}", {}, 1.0)).body == b'{"a": 1}\n'
        assert (await pool.post(up.url, b"{}", {}, 1.0)).body == b'{"a": 1}\n'
        assert up.connections == 1
    async with _serving(lambda _req: b"HTTP/1.0 502 Bad Gateway\r\n\r\nupstream down", close_after=True) as up:
        answer = await pool.post(up.url, b"{}", {}, 1.0)
        assert (answer.status, answer.body) == (502, b"upstream down")
    pool.close()


async def test_connection_close_is_honoured_and_an_idle_connection_the_peer_closed_is_not_reused() -> None:
    pool = H1Pool()
    async with _serving(_ok(extra=b"Connection: close\r\n"), close_after=True) as up:
        await pool.post(up.url, b"{}", {}, 1.0)
        await pool.post(up.url, b"{}", {}, 1.0)
        assert up.connections == 2
    # The upstream drops idle keep-alive connections (as uvicorn does after 5 s): the next call
    # still succeeds, on a new connection, and the request was sent exactly once.
    async with _serving(_ok()) as up:
        await pool.post(up.url, b"{}", {}, 1.0)
        for w in up.writers:
            w.close()
        await up.closed.wait()
        assert (await pool.post(up.url, b"{}", {}, 1.0)).status == 200
        assert up.connections == 2 and len(up.requests) == 2
    pool.close()


async def test_a_cancelled_call_closes_its_connection_and_failures_are_typed() -> None:
    pool = H1Pool()
    async with _serving(lambda _req: b"") as up:  # never answers
        call = asyncio.create_task(pool.post(up.url, b"{}", {}, 1.0))
        await up.arrived.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await up.closed.wait()  # the upstream saw the hang-up (it stops generating)
    async with _serving(lambda _req: None) as up:  # reads the request, closes without a word
        with pytest.raises(BrokenReply):
            await pool.post(up.url, b"{}", {}, 1.0)
    async with _serving(lambda _req: b"SPDY/3 200\r\n\r\n") as up:
        with pytest.raises(BrokenReply):
            await pool.post(up.url, b"{}", {}, 1.0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(ConnectFailed):
        await pool.post(URL(f"http://127.0.0.1:{closed}/v1"), b"{}", {}, 1.0)
    pool.close()


async def test_a_call_notes_the_bytes_of_its_answer_that_came_in_or_waited_unread_as_it_was_cancelled() -> None:
    # The router times an upstream's silence with these notes (looplag, probe p21 F3): a hold of its loop can have kept
    # an answer unread only if bytes of it came in; and bytes still in the socket when the call was cancelled (its
    # client left while the loop was busy) had reached the router as much as bytes taken in.
    pool = H1Pool()
    ticks = itertools.count(1.0)
    async with _serving(lambda _req: b"") as up:  # answers only as the test writes
        heard = Heard(lambda: next(ticks))
        call = asyncio.create_task(pool.open(up.url, b"{}", {}, 1.0, heard))
        await up.arrived.wait()
        # In one step: the answer lands in the socket, and the call is cancelled before the loop reads it.
        up.writers[0].write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert heard.at == 1.0  # noted as the connection closed, the answer unread
        silent = Heard(lambda: next(ticks))  # nothing comes: nothing is noted, cancelled or not
        up.arrived.clear()
        call = asyncio.create_task(pool.open(up.url, b"{}", {}, 1.0, silent))
        await up.arrived.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert silent.at == -math.inf
    async with _serving(_ok()) as up:
        taken = Heard(lambda: next(ticks))
        stream = await pool.open(up.url, b"{}", {}, 1.0, taken)
        assert taken.at > 1.0 and await stream.read() == b'{"ok": true}'  # noted as the answer came in
        stream.release()
        noted = taken.at
        again = await pool.open(up.url, b"{}", {}, 1.0)  # the same connection, for a call that notes nothing
        await again.read()
        again.release()
        assert up.connections == 1 and taken.at == noted  # the next call's bytes are not the first call's
    pool.close()


def _chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


_SSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        + _chunked(b'data: {"a"',  # a line cut across two chunks
                   b': 1}\n\ndata: {"b": 2}\n\n',  # the rest of it and a whole event in one chunk
                   b"data: [DONE]\n\n"))


async def test_a_stream_is_read_by_lines_and_its_connection_reused_once_read_to_the_end() -> None:
    pool = H1Pool()
    async with _serving(lambda _req: _SSE) as up:
        for _ in range(2):
            stream = await pool.open(up.url, b"{}", {}, 1.0)
            assert (stream.status, stream.headers["Content-Type"]) == (200, "text/event-stream")
            lines = []
            while line := await stream.readline():
                lines.append(line)
            stream.release()
            assert lines == [b'data: {"a": 1}\n', b"\n", b'data: {"b": 2}\n', b"\n", b"data: [DONE]\n", b"\n"]
        assert up.connections == 1 and len(up.requests) == 2
    # Bodies with a length and read to the close, the last line without its newline.
    async with _serving(lambda _req: b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\none\ntwo\nz") as up:
        stream = await pool.open(up.url, b"{}", {}, 1.0)
        assert [await stream.readline() for _ in range(4)] == [b"one\n", b"two\n", b"z", b""]
        stream.release()
    async with _serving(lambda _req: b"HTTP/1.0 200 OK\r\n\r\nline\nlast", close_after=True) as up:
        stream = await pool.open(up.url, b"{}", {}, 1.0)
        assert [await stream.readline() for _ in range(3)] == [b"line\n", b"last", b""]
        stream.release()
    pool.close()


async def test_a_stream_let_go_before_its_end_closes_its_connection_and_frees_its_slot() -> None:
    pool = H1Pool(limit=1)
    unfinished = _chunked(b'data: {"a": 1}\n')[:-5]  # no last chunk
    unfinished = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + unfinished
    async with _serving(lambda _req: unfinished) as up:
        stream = await pool.open(up.url, b"{}", {}, 1.0)
        assert await stream.readline() == b'data: {"a": 1}\n'
        stream.release()  # the client went away mid-stream
        await up.closed.wait()  # the upstream saw the hang-up: it stops generating
        async with asyncio.timeout(5):  # the only slot is free again: this call does not wait for it
            again = await pool.open(up.url, b"{}", {}, 1.0)
        again.release()
        assert up.connections == 2
    # A stream whose connection breaks part way raises BrokenReply, and its slot is freed too.
    async with _serving(lambda _req: unfinished, close_after=True) as up:
        stream = await pool.open(up.url, b"{}", {}, 1.0)
        assert await stream.readline() == b'data: {"a": 1}\n'
        with pytest.raises(BrokenReply):
            await stream.readline()
        async with asyncio.timeout(5):
            (await pool.open(up.url, b"{}", {}, 1.0)).release()
    pool.close()


async def test_a_stalled_stream_fails_the_read_that_waits_and_never_the_bytes_already_come() -> None:
    pool = H1Pool()
    silent_after = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(b"data: 1\n\ndata: 2\n\n")[:-5]
    loop = asyncio.get_running_loop()
    head_only = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with _serving(lambda _req: silent_after) as up, _serving(lambda _req: head_only) as other:
        stream = await pool.open(up.url, b"{}", {}, 1.0)
        stream.stall_after(0.1, loop.time() + 30)
        # The consumer is busy with another stream under the same bound until that one stalls: by then the
        # first stream's timer has fired too (it was set earlier), with its bytes waiting unread.
        busy = await pool.open(other.url, b"{}", {}, 1.0)
        busy.stall_after(0.1, loop.time() + 30)
        with pytest.raises(Stalled):
            await busy.readline()
        assert [await stream.readline() for _ in range(4)] == [b"data: 1\n", b"\n", b"data: 2\n", b"\n"]
        with pytest.raises(Stalled):  # then the upstream says nothing for longer than the bound
            await stream.readline()
        await up.closed.wait()  # the connection was dropped: the upstream stops generating
        stream.release()
        # The stream's whole time ran out: the next read fails as it starts.
        stream = await pool.open(up.url, b"{}", {}, 1.0)
        stream.stall_after(10.0, loop.time())
        with pytest.raises(Stalled):
            await stream.readline()
    pool.close()


async def test_an_sse_call_notes_its_data_events_not_its_keep_alives_taken_in_or_unread_as_it_closes() -> None:
    # Probe p41 F1: an upstream that sends `: keep-alive` comments (or Anthropic's ping events) and never a token was
    # heard, so never silent: its canary was never judged. Only data events are heard, a chunk boundary in their line
    # or not, and the bytes still unread in the socket as the call closes are peeked at, not taken for an answer.
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    pool = H1Pool()
    ticks = itertools.count(1.0)
    async with _serving(lambda _req: b"") as up:  # answers only as the test writes
        heard = Heard(lambda: next(ticks), sse=True)
        call = asyncio.create_task(pool.open(up.url, b"{}", {}, 1.0, heard))
        await up.arrived.wait()
        up.writers[-1].write(head + _chunk(b": keep-alive\n\n") + _chunk(b'event: ping\ndata: {"type": "ping"}\n\n'))
        stream = await call
        for line in (b": keep-alive\n", b"\n", b"event: ping\n", b'data: {"type": "ping"}\n', b"\n"):
            assert await stream.readline() == line
        assert heard.at == -math.inf  # neither a comment nor a ping is progress
        up.writers[-1].write(_chunk(b": keep-alive\n\n"))  # in one step: it lands in the socket, and the call ends
        stream.release()
        assert heard.at == -math.inf  # peeked at: a keep-alive
        up.arrived.clear()
        heard = Heard(lambda: next(ticks), sse=True)
        call = asyncio.create_task(pool.open(up.url, b"{}", {}, 1.0, heard))
        await up.arrived.wait()
        up.writers[-1].write(head + _chunk(b': keep-alive\n\ndata: {"choices"') + _chunk(b": 1}\n\n"))
        stream = await call
        assert await stream.readline() == b": keep-alive\n"
        assert await stream.readline() == b"\n"
        assert await stream.readline() == b'data: {"choices": 1}\n' and heard.at > -math.inf  # split by a chunk's end
        noted = heard.at
        up.writers[-1].write(_chunk(b"data: {}\n\n"))  # unread as the call ends: progress, peeked at
        stream.release()
        assert heard.at > noted
        up.arrived.clear()
        error = Heard(lambda: next(ticks), sse=True)  # an error answer to a stream: its bytes are progress
        call = asyncio.create_task(pool.open(up.url, b"{}", {}, 1.0, error))
        await up.arrived.wait()
        up.writers[-1].write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\n\r\n{}")
        (await call).release()
        assert error.at > heard.at
    pool.close()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)
