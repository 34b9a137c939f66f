"""Server and client stacks for the router's data plane, compared on one minimal proxy hop.

Every stack runs the same hop in its own process: authenticate the bearer key (lockgate's KeyStore,
as the router does), POST the chat completion body to the simulator, return its bytes. Nothing else
(no events, no tracing): the figures are the stack's own cost, the floor under lockgate's router.
The same load generator as the router bench (tests/bench/loadgen.py, a child process, keep-alive) drives each
stack in turn, round after round, so a machine shared with other work slows them all alike.

Stacks (server / event loop / upstream client):
- aiohttp.web / uvloop / aiohttp: the router's current stack
- aiohttp.web / asyncio / aiohttp: what uvloop buys
- aiohttp low-level server (aiohttp.web_server.Server, no router, no middlewares) / uvloop / aiohttp
- granian RSGI (embedded in the process's loop, HTTP in Rust) / uvloop / aiohttp, when granian is installed
- aiohttp.web / uvloop / httpx.AsyncClient, when httpx is installed
- aiohttp.web / uvloop / the router's HTTP/1.1 keep-alive pool (h1.py, its non-streamed upstream calls)
- granian RSGI / uvloop / the h1 pool, when granian is installed
- aiohttp low-level server / uvloop / the h1 pool: what the router's Application, routing and middlewares cost
- uvicorn ASGI with httptools (llhttp, as uvicorn's fastest setting) / uvloop / the h1 pool, when uvicorn
  and httptools are installed

Figures per stack at concurrency 8: added p50/p99 over the simulator called directly, requests/s, and
the server process's CPU per request (user + system from /proc, every thread, granian's Rust runtime
included); requests/s at concurrency 32. Run alone: `python -m tests.bench.bench_stacks` (prints JSON).
granian, httpx, uvicorn and httptools are not lockgate dependencies: they are the `bench` dependency group, which
`make bench` installs (`uv sync --group bench` before running this alone); a stack whose packages are missing is
listed under "skipped".
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

from lockgate.server.apikeys import AuthError, KeyStore, bearer, bootstrap
from tests.bench import loadgen
from tests.bench.common import BenchEnv, bench_env, percentiles, sim_process

N_REQUESTS = 2000
ROUNDS = 3
STACKS: dict[str, tuple[str, str, str, str | None]] = {  # name: (server, loop, client, packages it needs)
    "aiohttp-web/uvloop/aiohttp": ("web", "uvloop", "aiohttp", None),
    "aiohttp-web/asyncio/aiohttp": ("web", "asyncio", "aiohttp", None),
    "aiohttp-lowlevel/uvloop/aiohttp": ("lowlevel", "uvloop", "aiohttp", None),
    "granian-rsgi/uvloop/aiohttp": ("granian", "uvloop", "aiohttp", "granian"),
    "aiohttp-web/uvloop/httpx": ("web", "uvloop", "httpx", "httpx"),
    "aiohttp-web/uvloop/h1pool": ("web", "uvloop", "h1", None),
    "granian-rsgi/uvloop/h1pool": ("granian", "uvloop", "h1", "granian"),
    "aiohttp-lowlevel/uvloop/h1pool": ("lowlevel", "uvloop", "h1", None),
    "uvicorn-httptools/uvloop/h1pool": ("uvicorn", "uvloop", "h1", "uvicorn,httptools"),
}
_JSON = {"Content-Type": "application/json"}
_UNAUTHORIZED = b'{"error": {"message": "invalid API key", "type": "invalid_request_error"}}'


# -- the upstream clients ------------------------------------------------------------------------------


class _AiohttpClient:
    def __init__(self, base: str) -> None:
        import aiohttp

        self.url = base + "/chat/completions"
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000), auto_decompress=False)

    async def post(self, body: bytes) -> tuple[int, bytes]:
        async with self.session.post(self.url, data=body, headers=_JSON) as resp:
            return resp.status, await resp.read()


class _HttpxClient:
    def __init__(self, base: str) -> None:
        import httpx

        self.url = base + "/chat/completions"
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))

    async def post(self, body: bytes) -> tuple[int, bytes]:
        resp = await self.client.post(self.url, content=body, headers=_JSON)
        return resp.status_code, resp.content


class _H1Pool:
    """The router's own keep-alive client for non-streamed calls (services/router/h1.py)."""

    def __init__(self, base: str) -> None:
        from yarl import URL

        from lockgate.services.router.h1 import H1Pool

        self.url = URL(base + "/chat/completions")
        self.pool = H1Pool()

    async def post(self, body: bytes) -> tuple[int, bytes]:
        answer = await self.pool.post(self.url, body, _JSON, 10.0)
        return answer.status, answer.body


def _client(kind: str, base: str) -> Any:
    return {"aiohttp": _AiohttpClient, "httpx": _HttpxClient, "h1": _H1Pool}[kind](base)


# -- the servers ----------------------------------------------------------------------------------------


async def _serve(server: str, client_kind: str, upstream: str, home: str) -> None:
    """Serve the hop on 127.0.0.1 until killed; print the URL once listening."""
    from aiohttp import web
    from aiohttp.web_server import Server

    keys = KeyStore(home)
    client = _client(client_kind, upstream)

    def allowed(authorization: str | None) -> bool:
        try:
            keys.authenticate(bearer(authorization))
        except AuthError:
            return False
        return True

    async def hop(request: web.BaseRequest) -> web.Response:
        if not allowed(request.headers.get("Authorization")):
            return web.Response(status=401, body=_UNAUTHORIZED, content_type="application/json")
        status, data = await client.post(await request.read())
        return web.Response(status=status, body=data, content_type="application/json")

    if server == "granian":
        port = _free_port()
        await _serve_granian(client, allowed, port)
        return
    if server == "uvicorn":
        await _serve_uvicorn(client, allowed, _free_port())
        return
    if server == "web":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", hop)
        runner: web.BaseRunner = web.AppRunner(app, access_log=None, handle_signals=False)
    else:
        runner = web.ServerRunner(Server(hop, access_log=None), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"serving at http://{host}:{port}", flush=True)
    await asyncio.Event().wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve_granian(client: Any, allowed: Any, port: int) -> None:
    from granian.constants import Interfaces
    from granian.server.embed import Server as Granian

    class App:
        async def __rsgi__(self, scope: Any, proto: Any) -> None:
            if not allowed(scope.headers.get("authorization")):
                proto.response_bytes(401, [("content-type", "application/json")], _UNAUTHORIZED)
                return
            status, data = await client.post(await proto())
            proto.response_bytes(status, [("content-type", "application/json")], data)

    server = Granian(App(), address="127.0.0.1", port=port, interface=Interfaces.RSGI, log_enabled=False)
    # embedded: granian's HTTP runtime is one Rust thread
    await _serve_until_killed(server.serve(), port)


async def _serve_uvicorn(client: Any, allowed: Any, port: int) -> None:
    import uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        authorization = next((v.decode() for k, v in scope["headers"] if k == b"authorization"), None)
        if not allowed(authorization):
            status, data = 401, _UNAUTHORIZED
        else:
            body, more = b"", True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            status, data = await client.post(body)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http="httptools", loop="none",
                                           lifespan="off", access_log=False, log_level="warning"))
    await _serve_until_killed(server.serve(), port)


async def _serve_until_killed(serve: Any, port: int) -> None:
    """Run an embedded server (its workers tasks of this process's loop) and print the URL once it accepts."""
    task = asyncio.get_running_loop().create_task(serve)
    for _ in range(200):  # ready when the port accepts
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            break
        except OSError:
            await asyncio.sleep(0.05)  # start-up poll of a child server, not test synchronisation
    print(f"serving at http://127.0.0.1:{port}", flush=True)
    await task


@contextlib.asynccontextmanager
async def _stack_process(name: str, upstream: str, home: str) -> AsyncIterator[tuple[str, int]]:
    server, loop, client, _ = STACKS[name]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.bench_stacks", "--serve", server, loop, client, upstream, home,
        stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if "serving at" not in line:
            raise RuntimeError(f"stack {name} did not start: {line!r}")
        yield line.rsplit(" at ", 1)[1].strip() + "/v1", proc.pid
    finally:
        proc.terminate()
        await proc.wait()


# -- the comparison -------------------------------------------------------------------------------------


async def _load(url: str, key: str, n: int, concurrency: int) -> tuple[list[float], float]:
    samples, seconds, _ = await loadgen.remote(url, key, n, concurrency)
    return samples, seconds


def _cpu_s(pid: int) -> float:
    from tests.bench.bench_router import _cpu_s as cpu

    return cpu(pid)


def available() -> list[str]:
    """The stacks whose packages are installed."""
    return [name for name, (*_, packages) in STACKS.items()
            if packages is None or all(importlib.util.find_spec(p) is not None for p in packages.split(","))]


async def run(env: BenchEnv) -> dict[str, Any]:
    """Each available stack against the same simulator, interleaved round by round."""
    key = bootstrap(env.home).admin_key
    names = available()
    async with contextlib.AsyncExitStack() as es:
        sim = await es.enter_async_context(sim_process(env, "models:\n  m:\n    default: fine thanks\n"))
        served = {n: await es.enter_async_context(_stack_process(n, sim, env.home)) for n in names}
        for url, _ in served.values():
            await _load(url, key, 300, 8)  # warm-up: connections, caches
        direct: list[float] = []
        c8: dict[str, list[float]] = {n: [] for n in names}
        secs8 = dict.fromkeys(names, 0.0)
        secs32 = dict.fromkeys(names, 0.0)
        cpu = dict.fromkeys(names, 0.0)
        for r in range(ROUNDS):
            samples, _ = await _load(sim, key, N_REQUESTS, 8)
            direct += samples
            # each round in another order, so no stack always follows the same neighbour
            for n in names[r % len(names):] + names[:r % len(names)]:
                url, pid = served[n]
                cpu0 = _cpu_s(pid)
                samples, seconds = await _load(url, key, N_REQUESTS, 8)
                cpu[n] += _cpu_s(pid) - cpu0
                c8[n] += samples
                secs8[n] += seconds
                _, seconds = await _load(url, key, N_REQUESTS, 32)
                secs32[n] += seconds
    d = percentiles(direct)
    out: dict[str, Any] = {"requests_per_round": N_REQUESTS, "rounds": ROUNDS, "direct_concurrency_8": d,
                           "hop": "bearer key check (KeyStore), body to the simulator, its bytes back",
                           "skipped": [n for n in STACKS if n not in names]}
    for n in names:
        p = percentiles(c8[n])
        out[n] = {"added_p50_ms": round(p["p50_ms"] - d["p50_ms"], 3),
                  "added_p99_ms": round(p["p99_ms"] - d["p99_ms"], 3),
                  "rps_concurrency_8": round(N_REQUESTS * ROUNDS / secs8[n], 1),
                  "rps_concurrency_32": round(N_REQUESTS * ROUNDS / secs32[n], 1),
                  "cpu_per_request_ms": round(cpu[n] * 1000.0 / (N_REQUESTS * ROUNDS), 3)}
    return out


async def _main() -> None:
    async with bench_env() as env:
        print(json.dumps(await run(env), indent=2))


if __name__ == "__main__":
    import uvloop

    if len(sys.argv) == 7 and sys.argv[1] == "--serve":
        server, loop, client, upstream, home = sys.argv[2:]
        main = _serve(server, client, upstream, home)
        if loop == "uvloop":
            uvloop.run(main)
        else:
            asyncio.run(main)
    else:
        uvloop.run(_main())
