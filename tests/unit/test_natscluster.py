"""A cluster node's configuration: its name, routes to the others (never itself), route credentials, users kept."""

from __future__ import annotations

import errno
import json
import socket

import pytest

from lockgate.server.natscluster import free_ports, knows_meta_leader, node_config

pytestmark = pytest.mark.timeout(10)


def test_node_config_routes_to_the_other_nodes_with_their_own_password() -> None:
    base = json.dumps({"authorization": {"users": [{"user": "sink", "password": "p"}]}})
    conf = json.loads(node_config("n2", "lockgate", "127.0.0.1", 7002, [7001, 7002, 7003], "secret", base))
    assert conf["server_name"] == "n2"
    assert conf["authorization"]["users"][0]["user"] == "sink"  # the services' users are on every node
    cluster = conf["cluster"]
    assert (cluster["name"], cluster["listen"]) == ("lockgate", "127.0.0.1:7002")
    assert cluster["authorization"] == {"user": "route", "password": "secret"}
    assert cluster["routes"] == ["nats-route://route:secret@127.0.0.1:7001", "nats-route://route:secret@127.0.0.1:7003"]


def test_free_ports_are_distinct() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(p > 0 for p in ports)


def test_a_free_port_is_refused_to_any_other_bind_but_a_servers_listener() -> None:
    # Closed again at once, a port was anyone's until its node listened: taken meanwhile (another server's port 0,
    # a connection's local port), the node exited and the cluster elected no leader.
    for port in free_ports(3):
        with socket.socket() as other, pytest.raises(OSError) as refused:
            other.bind(("127.0.0.1", port))
        assert refused.value.errno == errno.EADDRINUSE
        with socket.socket() as server:  # as Go's listeners (nats-server's) bind
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen()


@pytest.mark.parametrize(("line", "known"), [
    ("[7] 2026/12/06 13:50:35.227605 [INF] Self is new JetStream cluster metadata leader", True),
    ("[7] 2026/12/06 13:50:35.224539 [INF] JetStream cluster new metadata leader: n1/lockgate", True),
    ("[7] 2026/12/06 13:50:35.224539 [INF] JetStream cluster new remote metadata leader", True),
    ("[7] 2026/12/06 13:54:44.313438 [INF] JetStream cluster no metadata leader", False),
    ("[7] 2026/12/06 13:54:06.783643 [WRN] JetStream has not established contact with a meta leader", False),
])
def test_a_leader_is_known_from_a_line_that_names_one(line: str, known: bool) -> None:
    assert knows_meta_leader(line) is known


def test_monitoring_listens_on_the_nodes_host_only_when_asked() -> None:
    args = ("n1", "lockgate", "127.0.0.1", 7001, [7001, 7002], "secret")
    assert "http" not in json.loads(node_config(*args))
    assert json.loads(node_config(*args, monitor_port=8222))["http"] == "127.0.0.1:8222"
