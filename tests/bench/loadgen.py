"""The router benches' load generator: `concurrency` keep-alive HTTP/1.1 connections, each sending
chat completions one after another and timing each answer (a streamed one to its first event).

Why not aiohttp's client, as before: on this 2-core machine it spent about 0.6 ms of CPU per request,
more than the router it was measuring, and every millisecond it takes is one the router and the
simulator wait for a core. Here each connection is an asyncio Protocol that writes one buffer and
scans the answer for its end, so the cores go to what is measured. In production the clients run
elsewhere. Only what the benches need: POST, answers with Content-Length or chunked bodies.

    python -m tests.bench.loadgen URL N CONCURRENCY [--stream]     (prints JSON; key in LOCKGATE_BENCH_KEY)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any, NamedTuple
from urllib.parse import urlsplit


class _Connection(asyncio.Protocol):
    """One keep-alive connection; `call` sends a request and waits for its whole answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._done: asyncio.Future[None] | None = None
        self._length: int | None = None  # the body's length, or -1 for a chunked body
        self._head = 0  # where the body starts
        self._first: float | None = None  # when the first streamed event arrived
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if self._length is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            self._head = end + 4
            at = head.find(b"content-length:")
            if at < 0:
                self._length = -1  # chunked (the benches' upstreams send one or the other)
            else:
                eol = head.find(b"\r\n", at)
                self._length = int(head[at + 15:eol if eol >= 0 else len(head)])
        if self._first is None and buf.find(b"data:", self._head) >= 0:
            self._first = time.perf_counter()
        if (buf.endswith(b"\r\n0\r\n\r\n") if self._length < 0 else len(buf) - self._head >= self._length):
            assert self._done is not None
            self._done.set_result(None)

    async def call(self, request: bytes) -> float | None:
        """Send one request; when its answer ended, the time its first streamed event came (or None)."""
        self._buf.clear()
        self._length, self._first = None, None
        self._done = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(request)
        await self._done
        if self.status != 200:
            raise RuntimeError(f"HTTP {self.status}: {bytes(self._buf[self._head:])[:200]!r}")
        return self._first


async def load(url: str, key: str, n: int, concurrency: int, stream: bool = False) -> tuple[list[float], float]:
    """n requests over `concurrency` connections: per-request ms (to the first event when `stream`) and
    the total seconds."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/") + "/chat/completions"
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\n").encode()
    loop = asyncio.get_running_loop()
    conns = [(await loop.create_connection(_Connection, parts.hostname, parts.port))[1] for _ in range(concurrency)]
    samples: list[float] = []
    todo = iter(range(n))

    async def worker(w: int, conn: _Connection) -> None:
        for i in todo:
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}],
                               "user": f"u{w}-{i}", "stream": stream}).encode()
            request = head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            t0 = time.perf_counter()
            first = await conn.call(request)
            samples.append(((first if stream and first is not None else time.perf_counter()) - t0) * 1000.0)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(w, c) for w, c in enumerate(conns)))
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
    return samples, time.perf_counter() - t0


class Load(NamedTuple):
    """What one run of the load generator measured: per-request ms, seconds in all, its own CPU seconds."""

    samples: list[float]
    seconds: float
    cpu_s: float


async def remote(url: str, key: str, n: int, concurrency: int, stream: bool = False) -> Load:
    """Run the load generator in a child process, so its CPU is its own and not the bench's."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.loadgen", url, str(n), str(concurrency), *(["--stream"] if stream else []),
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "LOCKGATE_BENCH_KEY": key})
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"load generator failed against {url}")
    data = json.loads(out)
    return Load(data["samples"], data["seconds"], data["cpu_s"])


async def _main(url: str, n: int, concurrency: int, stream: bool) -> dict[str, Any]:
    cpu0 = time.process_time()
    samples, seconds = await load(url, os.environ.get("LOCKGATE_BENCH_KEY", ""), n, concurrency, stream)
    return {"samples": samples, "seconds": seconds, "cpu_s": time.process_time() - cpu0}


if __name__ == "__main__":
    import uvloop

    print(json.dumps(uvloop.run(_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), "--stream" in sys.argv))))
