"""Who may change a stream's or bucket's configuration, on a real nats-server with the users of `lockgate
nats-config`: the sink creates lockgate's topology where it is missing and changes nothing that exists; admin
alone applies lockgate's configuration (`lockgate topology apply`).

Before (probe p1), the sink's user could send STREAM.UPDATE for every stream and bucket: it added to the gates bucket
a source copying `lg.dlq.<x>.>` (which it may publish) onto `$KV.lg_gates.>`, then wrote a release's superseded
signed PASS over the BLOCK that replaced it, and a route serving a BLOCKed release into the routes bucket."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest
from click.testing import CliRunner
from nats.js.api import StreamConfig, StreamSource, SubjectTransform

from lockgate.bus import KEPT_BY_OPERATOR, TOPOLOGY_APPLY, Bus, config_differences, topology
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


async def test_topology_apply_leaves_a_kept_bucket_that_differs_names_it_and_applies_the_rest(
        tmp_path: Path, unique: str, caplog: pytest.LogCaptureFixture) -> None:
    from lockgate import credentials
    from lockgate.server.natsserver import auth_config
    from lockgate.subjects import Subjects, token

    subjects = Subjects(unique)
    releases, gates = f"KV_{subjects.kv_releases}", f"KV_{subjects.kv_gates}"
    # A home made before the releases bucket was write-once, and a gates bucket someone aged: made on the store
    # before the server ran with lockgate's users.
    server = NatsServer(tmp_path / "nats")
    await server.start()
    try:
        old = Bus(server.url, subjects, name="test-old")
        await old.connect()
        try:
            await old.js.delete_key_value(subjects.kv_releases)
            plain = await old.js.create_key_value(bucket=subjects.kv_releases, history=1)
            await plain.create(token("r0"), b'{"release": "r0"}')
            await old.js.update_stream((await old.js.stream_info(gates)).config.evolve(max_age=3600))
        finally:
            await old.close()
    finally:
        server.stop()
    server = NatsServer(tmp_path / "nats", config=auth_config(subjects, credentials.ensure(tmp_path)))
    await server.start()
    settings = Settings(prefix=unique, home=str(tmp_path), nats_url=server.url)
    left = f"{releases} (allow_rollup_hdrs, deny_purge, discard_new_per_subject): {KEPT_BY_OPERATOR}"
    try:
        # A service names it, as any stream that differs, but as the server operator's to change.
        sink = Bus(settings.nats_url, subjects, name="test-sink", update_topology=False,
                   auth=credentials.for_identity(settings, "sink"))
        with caplog.at_level(logging.ERROR, logger="lockgate.bus"):
            await sink.connect()
        try:
            assert sink.topology_differs == [left, f"{gates} (max_age)"] and sink.denied == []
            assert "nats-server's own tools" in caplog.text and releases in caplog.text
        finally:
            await sink.close()
        # Admin applies the rest and leaves the kept bucket, asking nothing nats-server refuses it (the update of
        # it would go unanswered): named, exit 5 (not allowed), its result on stdout.
        args = ["--home", settings.home, "--nats", settings.nats_url, "--prefix", settings.prefix,
                "topology", "apply"]
        applied = await asyncio.to_thread(CliRunner().invoke, cli, [*args, "--json"])
        assert applied.exit_code == 5, applied.output
        assert json.loads(applied.stdout) == {"changed": [f"{gates} (max_age)"], "left": [left]}
        assert "kept stream(s) differ" in applied.stderr
        again = await asyncio.to_thread(CliRunner().invoke, cli, args)
        assert again.exit_code == 5, again.output
        assert f"left {left}" in again.stdout and "0 changed" in again.stdout
        admin = await _bus(settings, "admin")  # declares as the embedded process does: with update
        try:
            assert admin.denied == [] and admin.topology_differs == [left]
            assert await _differences(admin, gates) == []
            assert await _differences(admin, releases) == ["allow_rollup_hdrs", "deny_purge", "discard_new_per_subject"]
            assert (await (await admin.kv(subjects.kv_releases)).get(token("r0"))).value == b'{"release": "r0"}'
        finally:
            await admin.close()
    finally:
        server.stop()
