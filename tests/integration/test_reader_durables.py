"""An interest stream's readers (the durable consumers it keeps each event for) are no other service's to declare, on a
real nats-server with lockgate's users: the sink's attempt to re-point the drift monitor's consumer is refused and
drift takes every event; and an event published before a reader's service first starts is still kept for it, the
readers being declared by admin (`lockgate up`, `topology apply`).

Before (probe p65 F2), the sink, which declared every interest stream's readers, could create any of them, and a
create of an existing consumer is an update nats-server applies whatever it changes: it narrowed `lg_drift_inference`
to `lg.inference.nobody.nothing`, and the stream dropped every event once the other readers had taken it, drift never
seeing one until it restarted (as well the evaluator's online scores, canary evidence, and the cost accountant's)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import nats.errors
import pytest
from click.testing import CliRunner

from lockgate import credentials
from lockgate.bus import TOPOLOGY_APPLY, Bus
from lockgate.cli.main import cli
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.credentials import NotAllowed
from lockgate.server.natsserver import NatsServer, auth_config
from lockgate.server.runtime import Runtime
from lockgate.subjects import Subjects

pytestmark = pytest.mark.timeout(120)

EVENTS = 20


async def _bus(settings: Settings, identity: str) -> Bus:
    bus = Bus(settings.nats_url, Subjects(settings.prefix), name=f"test-{identity}",
              auth=credentials.for_identity(settings, identity), manage_topology=False)
    await bus.connect()
    return bus


async def _send(gateway: Bus, n: int = EVENTS) -> None:
    for i in range(n):  # as the gateway ingests applications' events, with its own credentials
        await gateway.publish(gateway.subjects.inference("shop"), InferenceEvent(app="shop", model="m", prompt=f"p{i}"))


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    """The drift monitor as `lockgate up` runs it: the embedded nats-server with every identity's users, admin
    declaring the topology."""
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["drift"])
    await runtime.start()
    yield runtime
    await runtime.stop()


async def test_the_sink_cannot_repoint_the_drift_monitors_consumer(stack: Runtime) -> None:
    admin = stack.ctx.bus  # the embedded process's admin connection
    s = admin.subjects
    stream, durable = s.streams["inference"].name, s.durable("drift", "inference")
    before = (await admin.js.consumer_info(stream, durable)).config.filter_subject
    sink, gateway = await _bus(stack.settings, "sink"), await _bus(stack.settings, "gateway")
    try:
        # The probe's request, in both forms nats-server takes (a filter in the subject, and none).
        nobody = f"{s.prefix}.inference.nobody.nothing"
        config = {"durable_name": durable, "ack_policy": "explicit", "deliver_policy": "all",
                  "filter_subject": nobody, "max_ack_pending": 1000, "ack_wait": 30 * 10**9}
        for subject in (f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.{nobody}",
                        f"$JS.API.CONSUMER.CREATE.{stream}.{durable}"):
            with pytest.raises((nats.errors.Error, TimeoutError, NotAllowed)):
                await sink.request(subject, json.dumps({"stream_name": stream, "config": config}).encode(),
                                   timeout_s=2)
            assert sink.refused(subject) is not None, subject  # refused by nats-server, not merely unanswered
        assert (await admin.js.consumer_info(stream, durable)).config.filter_subject == before
        # Drift takes every event sent after the attempt (before: none, its consumer no longer matching them).
        drift = stack.services["drift"].handlers
        await _send(gateway)
        await drift.events.wait_for(EVENTS)
    finally:
        await sink.close()
        await gateway.close()


async def test_an_event_sent_before_a_reader_first_starts_is_kept_for_it(
        tmp_path: Path, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    # Distributed, as compose and k8s run it: an empty server with lockgate's users, the sink first.
    server = NatsServer(tmp_path / "nats", config=auth_config(Subjects(settings.prefix), credentials.ensure(tmp_path)))
    await server.start()
    settings = settings.replace(nats_url=server.url)
    s = Subjects(settings.prefix)
    try:
        # Without admin's declaration the sink makes its own readers only and names the others it may not make.
        sink = Runtime(settings, services=["sink"], embedded_nats=False)
        with caplog.at_level(logging.WARNING, logger="lockgate.bus"):
            await sink.start()
        try:
            assert sink.buses[0].denied == []  # it asked for nothing it may not do
            assert s.durable("drift", "inference") in caplog.text and TOPOLOGY_APPLY in caplog.text
            # Admin declares them (`topology apply`, which compose, k8s and `lockgate dev cluster` run first).
            args = ["--home", settings.home, "--nats", settings.nats_url, "--prefix", settings.prefix]
            applied = await asyncio.to_thread(CliRunner().invoke, cli, [*args, "topology", "apply", "--json"])
            assert applied.exit_code == 0, applied.output
            gateway = await _bus(settings, "gateway")
            try:
                await _send(gateway)  # no drift monitor has ever run
            finally:
                await gateway.close()
            drift = Runtime(settings, services=["drift"], embedded_nats=False)
            await drift.start()
            try:
                await drift.services["drift"].handlers.events.wait_for(EVENTS)  # every one kept for it
            finally:
                await drift.stop()
        finally:
            await sink.stop()
    finally:
        server.stop()
