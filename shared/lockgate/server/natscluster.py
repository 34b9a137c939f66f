"""A JetStream cluster of real nats-servers on one host: routes on loopback, the same users on every
node, readiness read from the servers' logs (a metadata leader known), not guessed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import aiohttp

from lockgate.errors import ConfigError
from lockgate.retry import RetryPolicy
from lockgate.server.natsserver import NatsServer

# Logged by every node once the JetStream metadata group has a leader ("Self is new JetStream cluster
# metadata leader" on the leader itself, "JetStream cluster new metadata leader: n2/lockgate" elsewhere), but
# also as "JetStream cluster no metadata leader" by a node that has none (seen 38 s into a start that elected none).
_META_LEADER, _NO_META_LEADER = "metadata leader", "no metadata leader"
# Catching up takes from milliseconds to seconds: polled, as a readiness probe is.
_HEALTHY = RetryPolicy(attempts=1_000_000, initial_s=0.05, max_s=0.5)


def knows_meta_leader(line: str) -> bool:
    """Whether a nats-server log line says the node knows its JetStream metadata leader."""
    return _META_LEADER in line and _NO_META_LEADER not in line


class NotHealthy(Exception):
    """A node's /healthz is not yet ok."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports nothing listens on, kept from everything but a server's own listener for a minute. Routes must be
    configured before a node starts (JetStream refuses to cluster without them), so unlike client ports they
    cannot be left to the server to pick.

    A port merely closed again was anyone's until its node bound it: on a shared machine another server's port 0,
    any connection's local port, could take one; its node then exited after "Server is ready" (the route
    listener comes later), its peers knew no leader within a minute, and a cluster test failed with "no
    JetStream metadata leader". Each port is left in TIME_WAIT instead: the kernel hands it to no
    port-0 bind or outgoing connection and refuses it to a plain bind, while a listener with SO_REUSEADDR
    (every Go server's, nats-server's) binds it."""
    ports: list[int] = []
    with contextlib.ExitStack() as held:  # all at once, so that no two are the same
        for _ in range(count):
            listener = held.enter_context(socket.socket())
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, 0))
            listener.listen(1)
            client = held.enter_context(socket.create_connection(listener.getsockname()[:2]))
            accepted, _ = listener.accept()
            accepted.close()  # the accepted side closes first: TIME_WAIT is on the listener's port
            client.close()
            ports.append(listener.getsockname()[1])
    return ports


def node_config(name: str, cluster: str, host: str, route_port: int, route_ports: list[int],
                route_password: str, base: str = "", monitor_port: int = 0) -> str:
    """One node's configuration: `base` (users, TLS: `auth_config`) plus its name and the cluster block.
    Routes authenticate with a password of their own, so nothing else on the host can join the cluster.
    With `monitor_port`, the node serves its monitoring endpoints (`/healthz`) there, on `host` only."""
    conf = json.loads(base) if base else {}
    conf["server_name"] = name
    if monitor_port:
        conf["http"] = f"{host}:{monitor_port}"
    conf["cluster"] = {
        "name": cluster,
        "listen": f"{host}:{route_port}",
        "authorization": {"user": "route", "password": route_password},
        "routes": [f"nats-route://route:{route_password}@{host}:{p}" for p in route_ports if p != route_port],
    }
    return json.dumps(conf, indent=1)


class NatsCluster:
    """`size` nats-servers forming one JetStream cluster; `url` lists every node for clients."""

    def __init__(self, root: str | Path, *, size: int = 3, host: str = "127.0.0.1", config: str = "",
                 name: str = "lockgate", tls: bool = False) -> None:
        self.root = Path(root)
        self.host = host
        self.name = name
        ports = free_ports(2 * size, host)  # at once, so that no two are the same
        route_ports, self.monitor_ports = ports[:size], ports[size:]
        password = secrets.token_urlsafe(24)
        self._leader_known = [threading.Event() for _ in range(size)]
        self.nodes = [
            NatsServer(self.root / f"n{i + 1}", host=host, tls=tls, on_line=self._watcher(i),
                       config=node_config(f"n{i + 1}", name, host, port, route_ports, password, config,
                                          self.monitor_ports[i]))
            for i, port in enumerate(route_ports)
        ]

    def _watcher(self, index: int) -> Callable[[str], None]:
        event = self._leader_known[index]

        def on_line(line: str) -> None:
            if knows_meta_leader(line):
                event.set()

        return on_line

    @property
    def urls(self) -> list[str]:
        """Every node's client URL."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """The comma-separated server list a lockgate client takes (LOCKGATE_NATS_URL)."""
        return ",".join(self.urls)

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start every node, then wait until each knows the JetStream metadata leader."""
        # Together: a node waits for its routes before JetStream is ready, so one by one would stall.
        await asyncio.gather(*(self._start(i, timeout_s) for i in range(len(self.nodes))))

    async def _start(self, index: int, timeout_s: float) -> None:
        self._leader_known[index].clear()
        await self.nodes[index].start(timeout_s)
        if not await asyncio.to_thread(self._leader_known[index].wait, timeout_s):
            raise ConfigError(f"nats-server n{index + 1} saw no JetStream metadata leader within {timeout_s:.0f}s")

    async def restart(self, index: int, timeout_s: float = 60.0) -> None:
        """Start a stopped or killed node again on its ports and store; returns once it is healthy: it knows
        the leader and its replicas of every stream and consumer have caught up (nats-server's `/healthz`,
        the probe its own Helm chart uses). Knowing the leader is not enough: a stream whose replica there
        is still catching up can leave the next stream-info request unanswered."""
        await self._start(index, timeout_s)
        url = f"http://{self.host}:{self.monitor_ports[index]}/healthz"

        async def healthy() -> None:
            async with aiohttp.ClientSession() as http, http.get(url) as resp:
                if resp.status != 200:
                    raise NotHealthy(f"nats-server n{index + 1}: {await resp.text()}")

        try:
            await asyncio.wait_for(_HEALTHY.call(healthy, retry_on=(NotHealthy, aiohttp.ClientError),
                                                 what=f"nats-server n{index + 1} health"), timeout_s)
        except (TimeoutError, NotHealthy, aiohttp.ClientError) as exc:
            raise ConfigError(f"nats-server n{index + 1} not healthy within {timeout_s:.0f}s: {exc}") from None

    def kill(self, index: int) -> None:
        """kill -9 one node (its store stays for the restart)."""
        self.nodes[index].kill()

    def stop(self) -> None:
        """Stop every node gracefully."""
        for node in self.nodes:
            node.stop()
