"""Test helpers that synchronise on work done, never on the clock."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec
from aiohttp import web

from lockgate import credentials
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.server.natsserver import NatsServer, auth_config
from lockgate.server.registry import ServiceSet
from lockgate.server.service import Progress, ServiceContext
from lockgate.subjects import Subjects
from lockgate.telemetry import Telemetry

# What JetStream answers on whatever reply subject a requester names (a `$KV.<bucket>.<key>` one stores it as the
# key's value): a publish's acknowledgement, a duplicate's, an API answer (STREAM.INFO, STREAM.MSG.GET) and an API
# error. Literal copies for unit tests of decoding; `aim_jetstream_reply` has the server itself write them.
JETSTREAM_JSON: dict[str, bytes] = {
    "ack": b'{"stream":"LG_EVENTS","seq":42}',
    "duplicate": b'{"stream":"LG_EVENTS","seq":42,"duplicate":true}',
    "stream_info": b'{"type":"io.nats.jetstream.api.v1.stream_info_response","total":0,"offset":0,"limit":0,'
                   b'"config":{"name":"LG_EVENTS","subjects":["lg.x.>"],"retention":"limits","max_consumers":-1,'
                   b'"max_msgs":-1,"max_bytes":-1,"max_age":0,"storage":"file","num_replicas":1},'
                   b'"created":"2026-01-01T00:00:00Z","state":{"messages":1,"bytes":64,"first_seq":1,'
                   b'"last_seq":1,"consumer_count":0},"ts":"2026-01-01T00:00:00Z"}',
    "msg_get": b'{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","message":{"subject":"lg.x.y",'
               b'"seq":1,"data":"e30=","time":"2026-01-01T00:00:00Z"}}',
    "error": b'{"type":"io.nats.jetstream.api.v1.stream_info_response","error":{"code":404,"err_code":10059,'
             b'"description":"stream not found"}}',
}


async def aim_jetstream_reply(nc: Any, stream: str, subject: str, bucket: str, key: str, shape: str) -> bytes:
    """Have the nats-server store its own answer of kind `shape` (a JETSTREAM_JSON key) as `key`'s value in KV
    `bucket`, as any identity that may publish on a stream's `subject` or ask the JetStream API can; returns the
    value stored. `subject` is one of `stream`'s (a message is published on it for every shape)."""
    js = nc.jetstream()
    kv = await js.key_value(bucket)
    watcher = await kv.watch(key, include_history=False)  # before the answer is asked for: it is never missed
    try:
        target, msg_id = f"$KV.{bucket}.{key}", {"Nats-Msg-Id": f"aim-{bucket}-{key}-{shape}"}
        published = await js.publish(subject, b"{}", headers=msg_id)
        if shape in ("ack", "duplicate"):
            # a fresh message id is acknowledged as stored; the same one again as a duplicate
            headers = {"Nats-Msg-Id": f"{msg_id['Nats-Msg-Id']}-new"} if shape == "ack" else msg_id
            await nc.publish(subject, b"{}", reply=target, headers=headers)
        elif shape == "msg_get":
            await nc.publish(f"$JS.API.STREAM.MSG.GET.{stream}", b'{"seq":%d}' % published.seq, reply=target)
        else:
            await nc.publish(f"$JS.API.STREAM.INFO.{stream if shape == 'stream_info' else 'NO_SUCH_STREAM'}", b"",
                             reply=target)
        while True:
            entry = await watcher.updates(timeout=5)
            if entry is not None and entry.value and (entry.value.startswith(b'{"stream":')
                                                      or b'"type":"io.nats.jetstream.api.' in entry.value):
                return bytes(entry.value)
    finally:
        await watcher.stop()


async def answer_queries(holder: Bus, rows: Callable[[str, dict[str, Any]], Any]) -> list[str]:
    """Answer named queries on the services' subject in the query service's queue group, as whoever holds the `query`
    NATS credential may: `rows(query, args)` is the answer's rows, None says "not answered here". The names asked are
    returned as they come."""
    asked: list[str] = []

    async def answer(msg: Any) -> None:
        query = json.loads(msg.data)
        asked.append(query["query"])
        got = rows(query["query"], query["args"])
        reply = {"error": "not answered here", "kind": "QueryUnavailable"} if got is None else {"rows": got}
        await holder.nc.publish(msg.reply, json.dumps(reply).encode())

    await holder.nc.subscribe(holder.subjects.query, queue=holder.subjects.query_group, cb=answer)
    await holder.nc.flush()
    return asked


async def eventually(check: Callable[[], bool], progress: Sequence[Progress], timeout_s: float = 30.0,
                     what: str | Callable[[], str] = "condition") -> None:
    """Re-check `check()` each time one of the services reports progress, until true or timeout
    (`what` names the condition in the TimeoutError; a callable is asked then, to say what was seen)."""
    deadline = time.monotonic() + timeout_s
    while True:
        # Counts read before the check, so progress made while it runs wakes the wait below.
        seen = [p.count for p in progress]
        if await asyncio.to_thread(check):
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{what() if callable(what) else what} not reached within {timeout_s:.0f}s")
        waits = [asyncio.create_task(p.wait_for(c + 1, remaining)) for p, c in zip(progress, seen, strict=True)]
        done, pending = await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in done:
            task.exception()  # consume TimeoutError from a waiter; the deadline check above decides


@contextlib.asynccontextmanager
async def identity_buses(tmp_path: Any, prefix: str, identities: Sequence[str] = ("admin", "router", "app")
                         ) -> AsyncIterator[tuple[Settings, dict[str, Bus]]]:
    """A nats-server of its own with lockgate's users and permissions, and a connected Bus for each of `identities`
    with its real credentials (admin's declares the topology): what each identity may do, tried for real."""
    server = NatsServer(tmp_path / "nats", config=auth_config(Subjects(prefix), credentials.ensure(tmp_path)))
    await server.start()
    settings = Settings(prefix=prefix, home=str(tmp_path), nats_url=server.url)
    buses: dict[str, Bus] = {}
    try:
        for identity in identities:
            buses[identity] = Bus(settings.nats_url, Subjects(prefix), name=f"test-{identity}",
                                  auth=credentials.for_identity(settings, identity), manage_topology=identity == "admin")
            await buses[identity].connect()
        yield settings, buses
    finally:
        for bus in buses.values():
            await bus.close()
        server.stop()


async def hang(pid: int) -> None:
    """Stop a child process of this one (SIGSTOP: its connections stay open, nothing answers) and return once it
    has stopped. kill() returns once the stop is sent, not done: a thread of nats-server running on the other core
    stops when it next enters the kernel, and on a loaded machine answered a health check's requests first (a
    ci-local failure). The parent's waitpid reports the stop once every thread has stopped."""
    os.kill(pid, signal.SIGSTOP)
    _, status = await asyncio.to_thread(os.waitpid, pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status


class Process:
    """A long-running CLI process whose output is collected; `started` waits for a readiness line."""

    def __init__(self, args: list[str], env: dict[str, str], ready_text: str, cwd: Any = None) -> None:
        # Its own process group, as a shell starts a job: a test can then send Ctrl-C as a terminal does, to the
        # whole group (`os.killpg(proc.pid, SIGINT)`), the children it started included.
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True, cwd=cwd)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._ready_text = ready_text
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if self._ready_text in line:
                self._ready.set()
        self._ready.set()  # EOF: the process ended; `started` reports it

    def started(self, timeout_s: float) -> bool:
        """True once the readiness line was printed and the process is still running."""
        return self._ready.wait(timeout_s) and self.proc.poll() is None

    @property
    def output(self) -> str:
        return "".join(self.lines)


# "  router      http://127.0.0.1:41234" as `lockgate up` and `lockgate dev up` print their endpoints
_ENDPOINT = re.compile(r"^  ([\w-]+)\s+([a-z][a-z0-9+.-]*://\S+|\S+:\d+)(?:\s|$)")


def printed_endpoints(output: str) -> dict[str, str]:
    """The endpoints a `lockgate up`-style command printed, by name (the URL without any note after it)."""
    return {m[1]: m[2] for line in output.splitlines() if (m := _ENDPOINT.match(line))}


def admin_headers(home: str) -> dict[str, str]:
    """Authorization of the admin key `lockgate up` would make in this home (made on first use)."""
    from lockgate.server.apikeys import bootstrap

    return {"Authorization": f"Bearer {bootstrap(home).admin_key}"}


async def judged(bus: Any, release: str) -> dict[str, str]:
    """The artifacts a gate decision for the registered `release` names, as the gatekeeper's do: those its name is
    bound to (the router admits a release only with a decision about exactly that content)."""
    from lockgate import artifacts

    return dict((await artifacts.release_of(bus, release))["artifacts"])


async def store_pass(bus: Any, release: str, settings: Any, judged: dict[str, str] | None = None) -> None:
    """A PASS for the registered `release` in the gates KV, naming its registered artifacts, signed by a key
    the settings' trust file trusts (a gatekeeper stand-in: like the gatekeeper, it passes no release that
    is not registered; NotFound if the test did not register it). `judged`: the artifacts it names instead, whatever
    the name is bound to (or not), for a test of what a PASS speaks for."""
    from lockgate import artifacts
    from lockgate.contracts import GateDecided
    from lockgate.signing import Signer, trust_file_path, trust_key

    if judged is None:
        judged = dict((await artifacts.release_of(bus, release))["artifacts"])
    signer = Signer.generate()
    trust_key(trust_file_path(settings), signer.public)
    decision = GateDecided(release=release, rules=[], decision="PASS", artifacts=judged)
    await store_decision(bus, signer.sign(decision))


async def store_decision(bus: Any, decision: Any) -> None:
    """`decision` as its release's current one in the gates bucket, as the gatekeeper writes it (before it announces
    it), without the gatekeeper's compare-and-set: the router reads a release's current decision from there only."""
    from lockgate.codec import encode
    from lockgate.subjects import token

    kv = await bus.kv(bus.subjects.kv_gates)
    await kv.put(token(decision.release), encode(decision))


async def gate_decided(bus: Any, decision: Any, msg_id: str | None = None) -> None:
    """A gatekeeper stand-in deciding: `decision` made its release's current one (`store_decision`), then published on
    `gate.decided.<release>`. The router acts on a release's current decision, never on a message alone; a test that
    means a stale, replayed or forged message publishes it without storing it."""
    await store_decision(bus, decision)
    await bus.publish(bus.subjects.gate_decided(decision.release), decision, msg_id=msg_id)


def person(settings: Any, name: str, *roles: str) -> Any:
    """A personal identity under the settings' home, trusted in its trust file with `roles` (made once)."""
    from lockgate.identity import create_identity, identities_dir, load_identity
    from lockgate.signing import trust_file_path, trust_person

    exists = (identities_dir(settings) / f"{name}.key").exists()
    ident = load_identity(settings, name) if exists else create_identity(settings, name)
    trust_person(trust_file_path(settings), name, ident.signer.public, roles)
    return ident


def break_glass(settings: Any, deployment: str, release: str, action: str, reason: str,
                admin: str = "boss", weight: float = 10.0) -> dict[str, Any]:
    """The `break_glass` object `lockgate break-glass` prints, signed now by a trusted admin person (a canary's for
    `weight` percent)."""
    import time

    from lockgate.identity import sign_override

    return sign_override(person(settings, admin, "admin"), deployment=deployment, release=release, action=action,
                         reason=reason, at=int(time.time()), weight=weight if action == "canary" else None)


async def register_model_release(bus: Any, release: str, model: str = "m", endpoint: str = "default", *,
                                 extra_artifacts: dict[str, str] | None = None, app: str = "shop",
                                 tenant: str = "default", **params: Any) -> dict[str, str]:
    """Register a release of `tenant` whose model config sends it to `endpoint` with `model` (the router serves
    it so), plus `extra_artifacts` (`kind/name` -> hash of a registered artifact); returns its artifact map."""
    from lockgate import artifacts

    config = await artifacts.register(bus, "model_config", f"{release}-config",
                                      {"model": model, "endpoint": endpoint, **params})
    arts = {f"model_config/{release}-config": config.hash, **(extra_artifacts or {})}
    await artifacts.register_release(bus, release, app, arts, tenant=tenant)
    return arts


async def chat_releases(context: Any, signer: Any, stable_url: str, canary_url: str, canaries: Sequence[str],
                        **settings: Any) -> None:
    """Deployment `chat` of app `shop`: r1 (model `m`, endpoint `default`) registered and PASSed by `signer`, each
    canary release registered with the model of its name on endpoint `canary`, and the context's settings
    pointing those endpoints at `stable_url` and `canary_url` (plus `settings`)."""
    from lockgate.contracts import GateDecided

    await register_model_release(context.bus, "r1", "m", "default")
    for release in canaries:
        await register_model_release(context.bus, release, release, "canary")
    await store_decision(context.bus, signer.sign(GateDecided(release="r1", rules=[], decision="PASS",
                                                              artifacts=await judged(context.bus, "r1"))))
    context.settings = context.settings.replace(stable_upstream=stable_url, canary_upstream=canary_url,
                                                deployment="chat", app="shop", **settings)


@contextlib.asynccontextmanager
async def recorder(bus: Any, settings: Any) -> AsyncIterator[Any]:
    """A lineage recorder on `bus`: the applied state's only writer, which `apply` asks to record it."""
    svcs = ServiceSet(ServiceContext(bus=bus, telemetry=Telemetry(), settings=settings), ["lineage"])
    await svcs.start()
    # Its subscription on the server before anyone asks: an apply asks at once (another connection's request sent
    # before the server has the SUB gets no responders).
    await bus.nc.flush()
    try:
        yield svcs["lineage"]
    finally:
        await svcs.stop()


async def apply_folder(bus: Any, settings: Any, folder: Any, *, lineage: Any = None) -> Any:
    """`lockgate apply FOLDER` through `bus`, recorded by a lineage recorder on `lineage` (or `bus`)."""
    from lockgate.gitops.documents import load_folder
    from lockgate.gitops.git import provenance
    from lockgate.gitops.plan import diff
    from lockgate.gitops.resolve import resolve
    from lockgate.gitops.state import apply, read_bindings, read_state

    sources = load_folder(folder)
    desired = resolve(sources)
    plan = diff(desired, await read_state(bus), await read_bindings(bus, [r.release for r in desired if r.release]))
    prov = provenance(folder, reads=[r for s in sources for r in s.reads])
    async with recorder(lineage or bus, settings):
        return plan, await apply(bus, plan, desired, prov, directory=str(folder))


def grpc_key(key: str) -> list[Any]:
    """Client interceptors that present `key` as `authorization: Bearer ...` on unary gRPC calls.

    Streaming calls pass `metadata=` themselves: an intercepted stream hides its initial metadata.
    """
    import grpc

    class _Auth(grpc.aio.UnaryUnaryClientInterceptor):
        def _details(self, d: Any) -> Any:
            metadata = grpc.aio.Metadata(*(d.metadata or ()), ("authorization", f"Bearer {key}"))
            return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)

        async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return await continuation(self._details(details), request)

    return [_Auth()]


async def served_events(sub: Any, n: int, timeout_s: float = 10.0) -> list[Any]:
    """The next `n` inference events the routers served, from a subscription to their served subject: which arm
    and release answered is the event's to say (an app key's answer does not)."""
    got: list[Any] = []
    while len(got) < n:
        got += msgspec.json.decode((await sub.next_msg(timeout=timeout_s)).data, type=list[InferenceEvent])
    return got


async def sink_stored(sink: object, timeout_s: float = 30.0, **tables: int) -> None:
    """Wait until the sink's handlers have handled at least N messages for each named table."""
    for table, n in tables.items():
        await sink.progress(table).wait_for(n, timeout_s)  # type: ignore[attr-defined]


def metric_points(reader: Any, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    """One metric's points from an InMemoryMetricReader, by sorted attributes: a counter's value or
    a histogram's count."""
    out: dict[tuple[tuple[str, Any], ...], Any] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        value = point.value if hasattr(point, "value") else point.count
                        out[tuple(sorted((point.attributes or {}).items()))] = value
    return out


def dead_letters(reader: Any) -> int:
    """Dead letters counted by the metrics, all origins together."""
    return int(sum(metric_points(reader, "lockgate.dead_letters").values()))


class Replicas:
    """Services started on their own bus connections, as separate processes would be; `close` stops the
    services, then the connections."""

    def __init__(self) -> None:
        self.buses: list[Any] = []
        self.sets: list[ServiceSet] = []

    async def router(self, bus: Any, settings: Any, store: Any) -> Any:
        """A router replica on `bus` (closed by `close`), serving when this returns."""
        if bus not in self.buses:
            self.buses.append(bus)
        svcs = ServiceSet(ServiceContext(bus=bus, store=store, telemetry=Telemetry(), settings=settings), ["router"])
        await svcs.start()
        self.sets.append(svcs)
        return svcs["router"]

    async def close(self) -> None:
        """Stop every service, then close every connection."""
        for svcs in self.sets:
            await svcs.stop()
        for b in self.buses:
            await b.close()


class Relay:
    """A TCP relay on 127.0.0.1 to `port`: `cut` drops every connection through it and refuses new ones (one
    client partitioned from a server that stays up), `heal` lets connections through again, `hang` holds every
    answer until `release`. `hold_after(subject)`:
    the next publish to a subject starting with `subject` goes through, then the server's bytes to that client wait
    until `release` (a store that applied a write whose answer comes late); `held` is set once it went through."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.open = True
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self._armed: bytes | None = None
        self._flows: list[asyncio.Event] = []
        self.held = asyncio.Event()

    def hang(self) -> None:
        """The server's bytes to every client through the relay wait until `release`: a server that answers
        nothing while its connections stay open (hung, or a partition of its side only)."""
        for flow in self._flows:
            flow.clear()

    def hold_after(self, subject: str) -> None:
        self._armed = subject.encode()
        self.held.clear()

    def release(self) -> None:
        for flow in self._flows:
            flow.set()

    async def start(self) -> int:
        """Listen; returns the relay's port."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        self.open = False
        for w in self._writers:
            w.close()
        self._writers.clear()

    def heal(self) -> None:
        self.open = True

    async def close(self) -> None:
        self.release()
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers += [writer, up_writer]
        flow = asyncio.Event()  # the server's bytes to this client pass while set
        flow.set()
        self._flows.append(flow)

        def watch(data: bytes) -> None:  # client to server: hold the answers after the armed publish
            if self._armed is not None and any(line.split(b" ")[1:2] and line.split(b" ")[1].startswith(self._armed)
                                               for line in data.split(b"\r\n") if line.startswith((b"PUB ", b"HPUB "))):
                self._armed = None
                flow.clear()
                self.held.set()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await src.read(65536):
                    if up:
                        watch(data)
                    else:
                        await flow.wait()
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):  # the other side went, or `cut` closed it
                return
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


async def raw_http(url: str, method: str, path: str, headers: dict[str, bytes], body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (header values as given: HTTP clients refuse to send
    bytes that are not UTF-8 text); the answer's status and body, read to the close."""
    host, port = url.split("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = b"".join(name.encode() + b": " + value + b"\r\n" for name, value in headers.items())
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n".encode() + head
                 + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def run_cli(runtime: Any, *args: str) -> Any:
    """The CLI as a user runs it against an embedded runtime (its home holds the credentials and the trust file), in
    a thread: the CLI waits on the runtime, which answers on this loop."""
    from click.testing import CliRunner

    from lockgate.cli.main import cli

    s = runtime.settings
    env = {"LOCKGATE_HOME": s.home, "LOCKGATE_NATS_URL": s.nats_url, "LOCKGATE_PREFIX": s.prefix, "LOCKGATE_ROLE": ""}
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env, catch_exceptions=False)


async def run_cli_json(runtime: Any, *args: str) -> Any:
    """`run_cli` with `--json`, which must exit 0: its output, decoded."""
    result = await run_cli(runtime, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def delete_topology(settings: Settings) -> None:
    """Delete a prefix's streams and buckets (best effort: a test may not have created every one)."""
    import nats

    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    subjects = Subjects(settings.prefix)
    for spec in subjects.streams.values():
        with contextlib.suppress(Exception):
            await js.delete_stream(spec.name)
    for bucket in (subjects.kv_gates, subjects.kv_routes, subjects.kv_keys, subjects.kv_drift,
                   subjects.kv_eval_cache, subjects.kv_releases, subjects.kv_eval_runs, subjects.kv_audit,
                   subjects.kv_gitops, subjects.kv_budgets, subjects.kv_response_cache, subjects.kv_vetoes):
        with contextlib.suppress(Exception):
            await js.delete_key_value(bucket)
    with contextlib.suppress(Exception):
        await js.delete_object_store(subjects.object_store)
    with contextlib.suppress(Exception):
        await js.delete_object_store(subjects.object_dead_letters)
    await nc.close()


class ChatUpstream(abc.ABC):
    """A test double of an OpenAI-compatible upstream on 127.0.0.1 (`url` ends in /v1): a subclass's `chat` answers
    POST /v1/chat/completions; `client_max_size` is the largest body it takes."""

    client_max_size = 1024 * 1024

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.url = ""

    @abc.abstractmethod
    async def chat(self, request: web.Request) -> web.Response:
        """The answer to one chat completions request."""

    async def __aenter__(self) -> Any:
        app = web.Application(client_max_size=self.client_max_size)
        app.router.add_post("/v1/chat/completions", self.chat)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@contextlib.asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[str]:
    """`app` served on a free loopback port while the block runs; yields its base URL (http://127.0.0.1:PORT)."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def rss_growth_mib(call: Callable[[], Any], times: int) -> float:
    """How much this process's RSS grew (MiB) over `times` awaited `call()`s, with the garbage collector off: what a
    call leaves only a full collection frees counts too. One call first, so the channel's and buffers' first
    allocations are not what is measured."""
    import gc

    def rss() -> float:
        with open("/proc/self/status") as status:
            return int(status.read().split("VmRSS:")[1].split()[0]) / 1024

    await call()
    gc.collect()
    gc.disable()
    try:
        before = rss()
        for _ in range(times):
            await call()
        return rss() - before
    finally:
        gc.enable()
