"""`lockgate status` reads backlog and dead letters straight from JetStream."""

from __future__ import annotations

import asyncio
import socket

import pytest
from click.testing import CliRunner, Result

from lockgate.bus import Bus
from lockgate.cli.access import connect_once
from lockgate.cli.status import read_status as status
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent

pytestmark = pytest.mark.timeout(60)


async def test_status_shows_backlog_and_dead_letters_by_origin(run_services, bus: Bus) -> None:
    svcs = await run_services("sink", "query")
    await bus.publish(bus.subjects.inference("shop"), [InferenceEvent(app="shop") for _ in range(5)])
    await bus.publish(bus.subjects.inference("shop"), b"{broken", msg_id="poison")
    sink = svcs["sink"].handlers
    await sink.events.wait_for(5)
    await sink.dead_letters.wait_for(1)

    report = await status(bus)
    by_role = {s["role"]: s for s in report["streams"]}
    # The poison message was deleted from its stream once parked (scrubbed) in the DLQ: 5 events in 1 batch.
    assert by_role["inference"]["messages"] == 1
    consumer = next(c for c in report["consumers"] if c["consumer"] == bus.subjects.durable("sink", "inference"))
    assert consumer["pending"] == 0
    # Stored by the sink, so read from the record: the DLQ stream keeps a letter only until then.
    [dead] = report["dead_letters"]
    assert (dead["origin"], dead["dead_letters"]) == ("sink", 1)
    # The dead-letter originals bucket among them (a stream too): full, cut letters go without their originals.
    assert {s["role"]: s["state"] for s in report["streams"]} == {r: "ok" for r in [*bus.subjects.streams,
                                                                                    "dlq_originals"]}


async def test_status_says_full_only_of_a_full_stream(bus: Bus, settings: Settings) -> None:
    # The probe: the heading said "streams (FULL: producers are refused ...)" with every stream ok.
    shown = await asyncio.to_thread(_status_cli, settings)
    assert shown.exit_code == 0, shown.output
    assert "streams" in shown.output and "FULL" not in shown.output, shown.output

    inference = bus.subjects.streams["inference"].name
    config = (await bus.js.stream_info(inference)).config
    await bus.js.update_stream(config.evolve(max_bytes=64 * 1024))
    await bus.publish(bus.subjects.inference("shop"), InferenceEvent(app="shop", prompt="x" * 60_000))
    shown = await asyncio.to_thread(_status_cli, settings)
    assert "FULL: producers are refused" in shown.output and "FULL: refusing publishes" in shown.output, shown.output
    assert "FULL dlq_originals" not in shown.output  # only what is full is explained


async def test_status_reaches_a_cluster_whose_first_node_is_down(bus: Bus, settings: Settings) -> None:
    # Probe p30: with the URLs of a cluster of which one node was down, the CLI gave up after the first node
    # nats-py picked and said no stack ran. A port nothing listens on stands for the node that is down.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"nats://127.0.0.1:{s.getsockname()[1]}"
    for urls in (f"{down},{settings.nats_url}", f"{settings.nats_url},{down}"):
        shown = await asyncio.to_thread(_status_cli, settings, urls)
        assert shown.exit_code == 0 and "streams" in shown.output, shown.output
        # The short connection of the CLI's named queries alike.
        nc = await connect_once(settings.replace(nats_url=urls), "viewer", "the query was not answered")
        assert nc is not None and nc.is_connected
        await nc.close()


def _status_cli(settings: Settings, nats_url: str = "") -> Result:
    from lockgate.cli.main import cli

    env = {"LOCKGATE_NATS_URL": nats_url or settings.nats_url, "LOCKGATE_PREFIX": settings.prefix,
           "LOCKGATE_DATABASE": settings.database, "LOCKGATE_CLICKHOUSE_URL": settings.clickhouse_url,
           "LOCKGATE_HOME": settings.home}
    return CliRunner().invoke(cli, ["status"], env=env)
