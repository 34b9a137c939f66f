"""deploy/nats/cluster.conf, for real: the committed file is what `lockgate nats-config --cluster`
prints, and three nats-servers started with exactly that text (per-node name, store and loopback
addresses on the command line, as compose passes `--name`) form a JetStream cluster where every
lockgate identity logs in to the LOCKGATE account, streams are replicated three times, and nothing
crosses between LOCKGATE and the SYS system account."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import nats
import nats.errors
import pytest
from click.testing import CliRunner

from lockgate.bus import Bus
from lockgate.cli.main import cli
from lockgate.credentials import NatsAuth
from lockgate.permissions import IDENTITIES
from lockgate.server.natsaccounts import (
    ACCOUNT,
    ROUTE_PASSWORD,
    ROUTES_VARIABLE,
    SYSTEM_USER,
    cluster_config,
    routes,
)
from lockgate.server.natscluster import free_ports, knows_meta_leader
from lockgate.server.natsserver import NatsServer, env_password
from lockgate.subjects import Subjects

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def test_committed_cluster_config_is_the_generated_one() -> None:
    printed = CliRunner().invoke(cli, ["nats-config", "--cluster"])
    assert printed.exit_code == 0, printed.output
    assert (ROOT / "deploy/nats/cluster.conf").read_text() == printed.output, \
        "regenerate: lockgate nats-config --cluster > deploy/nats/cluster.conf"
    assert printed.output == cluster_config(Subjects("lg"))


def on_loopback(config: str, route_port: int) -> str:
    """The committed file with its route listener on loopback, and nothing else changed (the routes
    are the environment's). Not `--cluster` on the command line: nats-server then drops the file's
    route authorization (seen with 2.15: a node with the wrong route password joined)."""
    assert config.count('"port": 6222') == 1
    return config.replace('"port": 6222', f'"listen": "127.0.0.1:{route_port}"')


class Cluster:
    """Three nodes from the committed configuration; the passwords are the nodes' environment."""

    def __init__(self, root: Path, config: str, size: int = 3) -> None:
        self.config, self.root = config, root
        self.route_ports = free_ports(size)
        self._leader = [threading.Event() for _ in self.route_ports]
        self.lines: list[list[str]] = [[] for _ in self.route_ports]
        self.monitors: list[int] = []  # each node's monitoring port (loopback)
        self.nodes = [self.node(i, port) for i, port in enumerate(self.route_ports)]

    def node(self, i: int, route_port: int) -> NatsServer:
        """Node `i` listening for routes on `route_port`, soliciting every node of the cluster."""
        (monitor,) = free_ports(1)
        self.monitors.append(monitor)
        return NatsServer(self.root / f"n{i + 1}", config=on_loopback(self.config, route_port),
                          on_line=self._watch(i), args=["--name", f"n{i + 1}", "-m", str(monitor)])

    def _watch(self, index: int):
        def on_line(line: str) -> None:
            self.lines[index].append(line)
            if knows_meta_leader(line):
                self._leader[index].set()
        return on_line

    async def start(self) -> None:
        await asyncio.gather(*(node.start(60) for node in self.nodes))
        for event in self._leader:
            # A node exits after "Server is ready" if its route port is taken (the route listener comes later), and
            # then the others elect no leader: its fatal line says why.
            assert await asyncio.to_thread(event.wait, 60), \
                f"no JetStream metadata leader; {[line for lines in self.lines for line in lines if '[FTL]' in line]}"

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)


@pytest.fixture
async def accounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
        tuple[Cluster, dict[str, str]]]:
    # As the deployment docs say to make them: nats-server parses a substituted variable as a value, so a
    # password must read as one string (a letter first, no spaces): "p" + hex.
    passwords = {i: "p" + secrets.token_hex(24) for i in (*IDENTITIES, SYSTEM_USER)}
    for identity, password in passwords.items():
        monkeypatch.setenv(env_password(identity), password)
    # The committed file (the test above holds it to the generator), for the prefix `lg`.
    cluster = Cluster(tmp_path / "nats", (ROOT / "deploy/nats/cluster.conf").read_text())
    route_password = "p" + secrets.token_hex(24)
    monkeypatch.setenv(ROUTE_PASSWORD, route_password)
    monkeypatch.setenv(ROUTES_VARIABLE, routes([f"127.0.0.1:{p}" for p in cluster.route_ports], route_password))
    try:
        await cluster.start()
        yield cluster, passwords
    finally:
        for node in cluster.nodes:
            node.stop()


async def _connect(url: str, user: str, password: str) -> nats.NATS:
    return await nats.connect(url, user=user, password=password, allow_reconnect=False, connect_timeout=10)


async def _connz(system: nats.NATS, server_id: str) -> list[dict]:
    """The connections of the LOCKGATE account on one node, as the system account sees them."""
    reply = await system.request(f"$SYS.REQ.SERVER.{server_id}.CONNZ",
                                 json.dumps({"acc": ACCOUNT, "auth": True, "limit": 1024}).encode(), timeout=10)
    return json.loads(reply.data)["data"]["connections"]


async def test_every_identity_logs_in_to_the_lockgate_account_and_streams_are_r3(accounts) -> None:
    cluster, passwords = accounts
    node = cluster.nodes[0].url
    clients = {i: await _connect(node, i, passwords[i]) for i in IDENTITIES}
    system = await _connect(node, SYSTEM_USER, passwords[SYSTEM_USER])
    admin = Bus(cluster.url, Subjects("lg"), name="test-admin", replicas=3,
                auth=NatsAuth(user="admin", password=passwords["admin"]))
    try:
        server_id = system._server_info["server_id"]
        seen = {(c.get("authorized_user"), c.get("account")) for c in await _connz(system, server_id)}
        assert {(i, ACCOUNT) for i in IDENTITIES} <= seen
        # The services' streams live in the account, on all three nodes.
        await admin.connect()
        info = await admin.js.stream_info(admin.subjects.streams["events"].name)
        assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2
        # The system account has no JetStream: lockgate's streams are not there to read.
        names = await admin.js.streams_info()
        assert names and all(s.config.num_replicas == 3 for s in names)
        # The sink (which declares them in compose and k8s) may create them only: on a cluster too, its create of
        # each as it stands is answered, not refused as differing, and it asks for no update.
        sink = Bus(cluster.url, Subjects("lg"), name="test-sink", replicas=3, update_topology=False,
                   auth=NatsAuth(user="sink", password=passwords["sink"]))
        await sink.connect()
        assert (sink.topology_differs, sink.denied) == ([], [])
        await sink.close()
        reply = json.loads((await system.request("$JS.API.STREAM.NAMES", b"{}", timeout=5)).data)
        assert not reply.get("streams") and "not enabled" in reply["error"]["description"], reply
    finally:
        await admin.close()
        for c in [*clients.values(), system]:
            await c.close()


async def test_nothing_crosses_between_the_accounts(accounts) -> None:
    cluster, passwords = accounts
    node = cluster.nodes[0].url  # one node: a crossing message would be queued before the next one
    admin = await _connect(node, "admin", passwords["admin"])
    system = await _connect(node, SYSTEM_USER, passwords[SYSTEM_USER])
    try:
        got_admin, got_system = asyncio.Queue(), asyncio.Queue()

        async def to(queue: asyncio.Queue):
            async def cb(msg) -> None:
                await queue.put(msg.data)
            return cb

        await admin.subscribe("probe.cross", cb=await to(got_admin))
        await system.subscribe("probe.cross", cb=await to(got_system))
        await admin.flush()
        await system.flush()
        await admin.publish("probe.cross", b"from-lockgate")
        assert await asyncio.wait_for(got_admin.get(), 10) == b"from-lockgate"
        await system.publish("probe.cross", b"from-sys")
        await system.flush()
        # The system subscriber's first message is its own account's: lockgate's never reached it ...
        assert await asyncio.wait_for(got_system.get(), 10) == b"from-sys"
        # ... and lockgate's subscriber never saw the system account's.
        await admin.publish("probe.cross", b"again")
        assert await asyncio.wait_for(got_admin.get(), 10) == b"again"
        assert got_system.empty()
    finally:
        await admin.close()
        await system.close()


async def test_an_identity_is_no_user_of_the_system_account(accounts) -> None:
    cluster, passwords = accounts
    for user, password in [(SYSTEM_USER, passwords["admin"]), ("admin", passwords[SYSTEM_USER])]:
        with pytest.raises(nats.errors.Error):
            await nats.connect(cluster.nodes[1].url, user=user, password=password, allow_reconnect=False,
                               max_reconnect_attempts=0, connect_timeout=5)


async def test_a_node_without_the_route_password_does_not_join(accounts, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, _ = accounts
    # The intruder reads the same file with a password of its own guessing.
    monkeypatch.setenv(ROUTE_PASSWORD, "pwrong")
    monkeypatch.setenv(ROUTES_VARIABLE, routes([f"127.0.0.1:{p}" for p in cluster.route_ports], "pwrong"))
    (port,) = free_ports(1)
    cluster.lines.append([])
    intruder = cluster.node(3, port)
    refused = threading.Event()
    watch = intruder.on_line

    def on_line(line: str) -> None:
        watch(line)
        if "Authorization Violation" in line:
            refused.set()

    intruder.on_line = on_line
    try:
        await intruder.start(60)
        # The cluster's nodes refuse its routes: it is told so on every attempt, and none lets it in.
        assert await asyncio.to_thread(refused.wait, 60)
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{cluster.monitors[0]}/routez") as resp:
            peers = {r.get("remote_name") for r in (await resp.json())["routes"]}
        assert {"n2", "n3"} <= peers and "n4" not in peers, peers
    finally:
        intruder.stop()


async def test_a_route_port_is_its_nodes_alone_until_it_listens(tmp_path: Path) -> None:
    # Chosen before the node starts (the other nodes' routes name it), a route port was anyone's until the node
    # listened on it: another process's bind or a connection's local port took one now and then on a loaded
    # machine, the node exited after "Server is ready" and the other two elected no JetStream metadata leader.
    (port,) = free_ports(1)
    with socket.socket() as other, pytest.raises(OSError, match="in use"):
        other.bind(("127.0.0.1", port))
    listening = threading.Event()
    # Its route to itself only: JetStream clusters nothing without a route.
    node = NatsServer(tmp_path / "n1", config=json.dumps({"server_name": "n1", "cluster": {
        "name": "solo", "listen": f"127.0.0.1:{port}", "routes": [f"nats-route://127.0.0.1:{port}"]}}),
        on_line=lambda line: f"Listening for route connections on 127.0.0.1:{port}" in line and listening.set())
    try:
        await node.start(60)
        assert await asyncio.to_thread(listening.wait, 60), "the node did not listen for routes on its port"
        assert node.proc is not None and node.proc.poll() is None
    finally:
        node.stop()
