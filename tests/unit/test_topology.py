"""The configuration lockgate declares for its streams and buckets, and how a stream that differs is told apart
(`config_differences`): the sink names what differs instead of changing it (it may not: probe p1)."""

from __future__ import annotations

import pytest
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig, StreamSource

from lockgate.bus import WRITE_ONCE, config_differences, topology
from lockgate.permissions import grant
from lockgate.subjects import Subjects

S = Subjects("lg")
DECLARED = {cfg.name: cfg for cfg, _ in topology(S, 1)}


def as_the_server_reports(cfg: StreamConfig) -> StreamConfig:
    # nats-server fills in what a create left out with its defaults.
    filled = {"retention": RetentionPolicy.LIMITS, "storage": StorageType.FILE, "num_replicas": 1,
              "duplicate_window": 120.0, "max_msgs": -1, "max_bytes": -1, "max_consumers": -1}
    return cfg.evolve(**{k: v for k, v in filled.items() if getattr(cfg, k) in (None, 0, 0.0)})


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_a_stream_as_declared_does_not_differ(name: str) -> None:
    assert config_differences(DECLARED[name], as_the_server_reports(DECLARED[name])) == []


@pytest.mark.parametrize(("change", "named"), [
    ({"sources": [StreamSource(name="LG_DLQ")]}, ["sources"]),  # the probe's: copies of a subject into the bucket
    ({"max_age": 60.0}, ["max_age"]),  # decisions aged out
    ({"max_msgs_per_subject": 1, "num_replicas": 3}, ["max_msgs_per_subject", "num_replicas"]),
    ({"allow_direct": True}, ["allow_direct"]),
])
def test_each_setting_that_differs_is_named(change: dict[str, object], named: list[str]) -> None:
    gates = DECLARED["KV_lg_gates"]
    assert config_differences(gates, as_the_server_reports(gates).evolve(**change)) == named


def test_the_releases_bucket_is_declared_write_once() -> None:
    releases = DECLARED["KV_lg_releases"]
    assert {k: getattr(releases, k) for k in WRITE_ONCE} == WRITE_ONCE
    assert releases.discard == DiscardPolicy.NEW and releases.deny_purge


def test_the_sink_may_create_every_declared_stream_and_update_none() -> None:
    publish = set(grant(S, "sink").publish)
    assert {f"$JS.API.STREAM.CREATE.{name}" for name in DECLARED} <= publish
    assert not [p for p in publish if ".STREAM.UPDATE." in p or p in (">", "$JS.>", "$JS.API.>")]
