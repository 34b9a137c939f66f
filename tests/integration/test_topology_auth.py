"""Who may change a stream's or bucket's configuration, on a real nats-server with the users of `lockgate
nats-config`: the sink creates lockgate's topology where it is missing and changes nothing that exists; admin
alone applies lockgate's configuration (`lockgate topology apply`).

Before (probe p1), the sink's user could send STREAM.UPDATE for every stream and bucket: it added to the gates bucket
a source copying `lg.dlq.<x>.>` (which it may publish) onto `$KV.lg_gates.>`, then wrote a release's superseded
signed PASS over the BLOCK that replaced it, and a route serving a BLOCKed release into the routes bucket."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest
from click.testing import CliRunner
from nats.js.api import StreamConfig, StreamSource, SubjectTransform

from lockgate.bus import TOPOLOGY_APPLY, Bus, config_differences, topology
from lockgate.cli.main import cli
from lockgate.config import Settings
from lockgate.server.natsserver import NatsServer
from lockgate.server.runtime import Runtime
from tests.integration.test_nats_auth import _bus, secured  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(90)


def _declared(bus: Bus, stream: str) -> StreamConfig:
    return next(cfg for cfg, _ in topology(bus.subjects, 1) if cfg.name == stream)


def _with_source(cfg: StreamConfig, bus: Bus) -> StreamConfig:
    # The probe's: the dead-letter subjects the sink may publish, copied into the bucket's keys.
    bucket = cfg.name.removeprefix("KV_")
    return cfg.evolve(sources=[StreamSource(
        name=bus.subjects.streams["dlq"].name,
        subject_transforms=[SubjectTransform(src=f"{bus.subjects.prefix}.dlq.forge.>", dest=f"$KV.{bucket}.>")])])


async def _differences(admin: Bus, stream: str) -> list[str]:
    return config_differences(_declared(admin, stream), (await admin.js.stream_info(stream)).config)


@pytest.mark.parametrize("bucket", ["kv_gates", "kv_routes", "kv_releases"])
async def test_the_sink_cannot_change_a_buckets_configuration(secured, bucket: str) -> None:  # noqa: F811
    _, settings, admin = secured
    sink = await _bus(settings, "sink")
    try:
        stream = f"KV_{getattr(admin.subjects, bucket)}"
        attack = _with_source((await sink.js.stream_info(stream)).config, sink)
        if bucket == "kv_releases":  # and lift its write-once rule
            attack = attack.evolve(max_msgs_per_subject=10, discard_new_per_subject=False)
        js = sink.nc.jetstream(timeout=2)  # a refused request is never answered
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await js.update_stream(attack)
        assert sink.refused(f"$JS.API.STREAM.UPDATE.{stream}") is not None
        # A create of the existing stream with the attacker's configuration: nats-server refuses it as it stands.
        with pytest.raises(nats.js.errors.BadRequestError) as refused:
            await sink.js.add_stream(attack)
        assert refused.value.err_code == 10058
    finally:
        await sink.close()
    assert await _differences(admin, stream) == []
    assert (await admin.js.stream_info(stream)).config.sources is None


async def test_the_sink_creates_the_topology_names_what_differs_and_admin_applies_it(
        tmp_path: Path, unique: str, chdb_url: str, caplog: pytest.LogCaptureFixture) -> None:
    from lockgate import credentials
    from lockgate.server.natsserver import auth_config
    from lockgate.subjects import Subjects

    server = NatsServer(tmp_path / "nats", config=auth_config(Subjects(unique), credentials.ensure(tmp_path)))
    await server.start()
    settings = Settings(prefix=unique, home=str(tmp_path), nats_url=server.url, clickhouse_url=chdb_url,
                        database=unique, router_port=0, grpc_port=0, otlp_grpc_port=0, otlp_http_port=0)
    try:
        # `lockgate serve sink` on an empty server: it declares every stream and bucket (as compose and k8s run it).
        sink = Runtime(settings, services=["sink"], embedded_nats=False)
        await sink.start()
        try:
            assert sink.buses[0].topology_differs == [] and sink.buses[0].denied == []
        finally:
            await sink.stop()
        admin = await _bus(settings, "admin")
        try:
            gates = f"KV_{admin.subjects.kv_gates}"
            for cfg, _ in topology(admin.subjects, 1):
                assert await _differences(admin, cfg.name) == [], cfg.name
            # Someone changed a bucket (or an upgrade brings new limits): the sink names it and leaves it.
            changed = _with_source((await admin.js.stream_info(gates)).config, admin).evolve(max_age=3600)
            await admin.js.update_stream(changed)
            sink = Runtime(settings, services=["sink"], embedded_nats=False)
            with caplog.at_level(logging.ERROR, logger="lockgate.bus"):
                await sink.start()
            try:
                assert sink.buses[0].topology_differs == [f"{gates} (max_age, sources)"]
                assert sink.buses[0].denied == []  # it asked for nothing it may not do
                assert TOPOLOGY_APPLY in caplog.text and gates in caplog.text
            finally:
                await sink.stop()
            assert await _differences(admin, gates) == ["max_age", "sources"]
            # Only admin applies lockgate's configuration: a viewer is refused before anything is sent.
            args = ["--home", settings.home, "--nats", settings.nats_url, "--prefix", settings.prefix]
            viewer = await asyncio.to_thread(CliRunner().invoke, cli, [*args, "--role", "viewer", "topology", "apply"])
            assert viewer.exit_code != 0 and "use --role admin" in viewer.output, viewer.output
            applied = await asyncio.to_thread(CliRunner().invoke, cli, [*args, "topology", "apply", "--json"])
            assert applied.exit_code == 0, applied.output
            assert f"{gates} (max_age, sources)" in applied.output
            assert await _differences(admin, gates) == []
        finally:
            await admin.close()
    finally:
        server.stop()
