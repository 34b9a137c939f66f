"""A cluster node's configuration: its name, routes to the others (never itself), route credentials, users kept."""

from __future__ import annotations

import json

import pytest

from lockgate.server.natscluster import free_ports, node_config

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


def test_monitoring_listens_on_the_nodes_host_only_when_asked() -> None:
    args = ("n1", "lockgate", "127.0.0.1", 7001, [7001, 7002], "secret")
    assert "http" not in json.loads(node_config(*args))
    assert json.loads(node_config(*args, monitor_port=8222))["http"] == "127.0.0.1:8222"
