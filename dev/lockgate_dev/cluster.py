"""The distributed topology on one machine: a three-node JetStream cluster on loopback with the users
of "Trust and access", streams and buckets with three replicas, and every service as its own
`lockgate serve` process (two replicas of each one that scales), the simulator as the upstream.

What `lockgate dev cluster` runs and what the cluster fault tests start: the same processes and
settings a deployment has, only the URLs are loopback ones.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lockgate import credentials
from lockgate.errors import ConfigError
from lockgate.server.apikeys import bootstrap
from lockgate.server.natscluster import NatsCluster
from lockgate.server.natsserver import _die_with_parent, auth_config
from lockgate.subjects import Subjects

# Services that scale as processes sharing durable consumers, queue groups and KV: two of each here.
SCALED = ("router", "evaluator", "drift", "cost", "gateway", "otlp")
# One each: the lineage recorder and the gatekeeper (whose audit chain takes one entry at a time).
SINGLE = ("lineage", "gatekeeper")
# The store's owners share one process: on chDB one process owns the data path (on a ClickHouse
# server the sink scales out like the others).
STORE = ("sink", "query")
# Ports a scaled service binds: 0 picks a free one, printed at start.
_PORTS = {"router": ["--router-port", "0"], "gateway": ["--grpc-port", "0"],
          "otlp": ["--otlp-grpc-port", "0", "--otlp-http-port", "0"]}
LOCKGATE = [sys.executable, "-m", "lockgate.cli"]
# The last line `lockgate serve` prints at start, after its endpoints.
SERVING = "queued events are flushed first"
# "  router      http://127.0.0.1:41234" as `lockgate serve` prints its endpoints
_ENDPOINT = re.compile(r"^  ([\w-]+)\s+([a-z][a-z0-9+.-]*://\S+|\S+:\d+)(?:\s|$)")


@dataclass
class ServiceProcess:
    """One `lockgate serve ...` (or `lockgate sim`) process; ready once it prints `ready_text`."""

    name: str
    args: list[str]
    env: dict[str, str]
    ready_text: str = SERVING
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    endpoints: dict[str, str] = field(default_factory=dict)
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        """Start the process; `wait_ready` returns once it serves."""
        self._ready.clear()
        self.endpoints = {}
        # Like the nats-servers, killed with whoever started them (a test run killed -9 leaves no orphans).
        # PR_SET_PDEATHSIG follows the starting thread: call this from the event loop's thread.
        self.proc = subprocess.Popen([*LOCKGATE, *self.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=self.env,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True, name=f"read:{self.name}").start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)
            if m := _ENDPOINT.match(line):
                self.endpoints[m[1]] = m[2]
            elif self.ready_text in line:
                # `serve` prints it after its endpoints; the simulator prints its URL on that line
                if m := re.search(r"https?://\S+", line):
                    self.endpoints[self.name] = m[0]
                self._ready.set()
        self._ready.set()  # EOF: the process ended; wait_ready reports it

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until the process serves and has printed its endpoints; ConfigError if it exits or stalls."""
        assert self.proc is not None
        if not self._ready.wait(timeout_s):
            raise ConfigError(f"{self.name} did not start within {timeout_s:.0f}s:\n{self.tail()}")
        if self.proc.poll() is not None:
            raise ConfigError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def started(self) -> bool:
        """True once ready and still running."""
        return self._ready.is_set() and self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 15) -> str:
        """The last lines the process printed."""
        return "".join(self.lines[-n:])

    def kill(self) -> None:
        """kill -9: no flush, no goodbye (a crashed pod)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self) -> None:
        """Send SIGTERM without waiting (`stop` then waits)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the process flushes its buffers and closes its consumers), SIGKILL after `timeout_s`."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.terminate()
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Topology:
    """The cluster and its processes, under one home (credentials, keys, trust file, chDB, JetStream)."""

    def __init__(self, home: str | Path, *, prefix: str = "lg", scaled_replicas: int = 2,
                 stream_replicas: int = 3, nodes: int = 3, extra_env: dict[str, str] | None = None,
                 clickhouse_url: str = "", services: tuple[str, ...] = (*SINGLE, *SCALED)) -> None:
        self.home = Path(home).resolve()
        # chDB under the home unless a ClickHouse server is given; on a server the sink and the query
        # service run as processes of their own, as compose.yaml and deploy/k8s run them.
        self.clickhouse_url = clickhouse_url or f"chdb://{self.home / 'clickhouse'}"
        self.services = services
        self.prefix = prefix
        self.home.mkdir(parents=True, exist_ok=True)
        passwords = credentials.ensure(self.home)  # one user per service, role and the SDK: 0600 files
        self.keys = bootstrap(self.home)  # the router's first admin and app API keys
        self.nats = NatsCluster(self.home / "nats", size=nodes,
                                config=auth_config(Subjects(prefix), passwords))
        self.stream_replicas = stream_replicas
        self.scaled_replicas = scaled_replicas
        self.extra_env = extra_env or {}
        self.processes: dict[str, ServiceProcess] = {}

    def env(self, **more: str) -> dict[str, str]:
        """The environment of a lockgate process (or a CLI call) on this topology."""
        return {**os.environ, "LOCKGATE_NATS_URL": self.nats.url, "LOCKGATE_HOME": str(self.home),
                "LOCKGATE_PREFIX": self.prefix, "PYTHONUNBUFFERED": "1", "LOCKGATE_REPLICAS": str(self.stream_replicas),
                "LOCKGATE_CLICKHOUSE_URL": self.clickhouse_url, **self.extra_env, **more}

    def _add(self, name: str, args: list[str], ready_text: str = SERVING, **env: str) -> ServiceProcess:
        proc = ServiceProcess(name, args, self.env(**env), ready_text)
        self.processes[name] = proc
        return proc

    async def start(self, timeout_s: float = 120.0) -> None:
        """The cluster, admin's declaration of the topology (`_declare`), the simulator and the store's owner,
        then every other service together; returns once all serve."""
        try:
            await self.nats.start(timeout_s)
            await asyncio.to_thread(self._declare, timeout_s)
            first = [self._add("simulator", ["sim", "--port", "0"], ready_text="simulator listening on")]
            if self.clickhouse_url.startswith("chdb://"):
                first.append(self._add("store", ["serve", *STORE]))
            else:
                first += [self._add(name, ["serve", name]) for name in STORE]
            for proc in first:
                proc.start()
            await asyncio.gather(*(asyncio.to_thread(p.wait_ready, timeout_s) for p in first))
            upstream = first[0].endpoints["simulator"]
            others = [self._add(name, ["serve", name], LOCKGATE_STABLE_UPSTREAM=upstream,
                                LOCKGATE_CANARY_UPSTREAM=upstream) for name in SINGLE if name in self.services]
            for name in (n for n in SCALED if n in self.services):
                for i in range(1, self.scaled_replicas + 1):
                    others.append(self._add(f"{name}-{i}", ["serve", name, *_PORTS.get(name, [])],
                                            LOCKGATE_STABLE_UPSTREAM=upstream, LOCKGATE_CANARY_UPSTREAM=upstream))
            for proc in others:
                proc.start()
            await asyncio.gather(*(asyncio.to_thread(p.wait_ready, timeout_s) for p in others))
        except BaseException:
            self.stop()
            raise

    def _declare(self, timeout_s: float) -> None:
        """Streams, buckets and every interest stream's readers with their replicas, as admin, before any service
        starts: a deployment's install step (`lockgate --role admin topology apply`). No service may declare another
        service's consumer (the sink makes its own), and an event sent before a reader's service first starts is
        kept for it only once its consumer is declared."""
        done = subprocess.run([*LOCKGATE, "--role", "admin", "topology", "apply", "--json"], env=self.env(),
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise ConfigError(f"`lockgate --role admin topology apply` exited {done.returncode}: "
                              f"{(done.stderr or done.stdout).strip()}")

    def replicas(self, service: str) -> list[ServiceProcess]:
        """The processes running `service`, in order."""
        return [p for n, p in self.processes.items() if n == service or n.rpartition("-")[0] == service]

    def endpoints(self) -> dict[str, str]:
        """Every endpoint served, named by process ("router-1", "gateway-2/grpc", ...)."""
        out = {f"nats-{i + 1}": url for i, url in enumerate(self.nats.urls)}
        for name, proc in self.processes.items():
            for what, url in proc.endpoints.items():
                if what in ("nats", "clickhouse") and what != name:
                    continue  # every process prints the cluster's URLs; chDB is the home's
                out[name if what in (name, name.rpartition("-")[0]) else f"{name}/{what}"] = url
        return out

    async def restart(self, name: str, timeout_s: float = 120.0) -> None:
        """Start one process again (after a kill or stop) and wait until it serves."""
        proc = self.processes[name]
        proc.start()
        await asyncio.to_thread(proc.wait_ready, timeout_s)

    def stop(self) -> None:
        """Stop the services together (each flushes its buffers), then the store's owners, then the cluster."""
        first = [p for n, p in self.processes.items() if n not in ("simulator", "store", *STORE)]
        for group in (first, [p for p in self.processes.values() if p not in first]):
            for proc in group:
                proc.terminate()
            for proc in group:
                proc.stop()
        self.nats.stop()


async def run_cluster(home: str | Path, prefix: str, replicas: int) -> None:
    """`lockgate dev cluster`: start the topology, print where everything is, run until signalled."""
    from lockgate.cli.render import console
    from lockgate.cli.stack import _until_signalled

    topology = Topology(home, prefix=prefix, scaled_replicas=replicas)
    console.print(f"starting 3 nats-servers and {len(SINGLE) + 1 + replicas * len(SCALED)} service processes ...")
    try:
        await topology.start()
        console.print("[bold green]lockgate cluster is up[/bold green] (JetStream R3, one process per service)")
        for name, url in topology.endpoints().items():
            console.print(f"  [bold]{name:<16}[/bold] {url}")
        console.print(f"  [bold]{'home':<16}[/bold] {topology.home}  (credentials, API keys, trust file, chDB)")
        console.print(f"[dim]CLI: LOCKGATE_NATS_URL={topology.nats.url} LOCKGATE_HOME={topology.home} "
                      "lockgate status[/dim]", soft_wrap=True)
        console.print("[dim]Ctrl-C stops every process, then the cluster.[/dim]")
        await _until_signalled()
        console.print("stopping: every service flushes its buffers, then the cluster stops ...")
    finally:
        await asyncio.to_thread(topology.stop)
    console.print("stopped cleanly.")
