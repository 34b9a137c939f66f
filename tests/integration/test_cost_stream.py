"""Cost records cannot push other history out of the events stream, and one message yields a bounded number of them,
on the embedded runtime as `lockgate up` runs it: an application's own NATS user (the official SDK) sends messages of
1,000 events, each naming a model of its own.

Before (probe p42 F1), the cost service published one CostRecord per (tenant, app, deployment, model) of a message on
`lg.cost.<tenant>`, which the events stream captured with every tenant's registrations, gate decisions and rollouts
(discard old): 81 messages of 5,000 made-up models from one tenant's application (5.5 times their bytes as records,
each publish awaited in turn) evicted the demo tenant's registrations and decisions, and held every tenant's cost
ledger back by 16 to 77 s. Now cost records have a stream of their own, at most RECORDS_MAX per message."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats.js.errors
import pytest
from click.testing import CliRunner

from lockgate import credentials
from lockgate.bus import Bus, topology
from lockgate.cli.main import cli
from lockgate.cli.status import STREAM_MISSING
from lockgate.client import Client
from lockgate.config import Settings
from lockgate.contracts import ArtifactRegistered, CostRecord, GateDecided
from lockgate.server.runtime import Runtime
from lockgate.services.cost.domain import FOLDED, RECORDS_MAX
from lockgate.subjects import Subjects
from tests.helpers import eventually
from tests.integration.test_nats_auth import secured  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(120)

SERVICES = ["sink", "gateway", "cost", "gatekeeper"]  # the gatekeeper chains the credential's audit entry
EVENTS_MAX_BYTES = 256 * 1024  # the events stream scaled down: the flood's records, before, were about 2 MB
MESSAGES, PER_MESSAGE = 3, 1000


async def _credential(runtime: Runtime) -> dict[str, str]:
    """`lockgate app-credential create --tenant acme --app shop`: the user's secret."""
    s = runtime.settings
    env = {"LOCKGATE_HOME": s.home, "LOCKGATE_NATS_URL": s.nats_url, "LOCKGATE_PREFIX": s.prefix, "LOCKGATE_ROLE": ""}
    made = await asyncio.to_thread(CliRunner().invoke, cli, ["app-credential", "create", "--tenant", "acme", "--app",
                                                             "shop", "--json"], env=env, catch_exceptions=False)
    assert made.exit_code == 0, made.output
    return json.loads(await asyncio.to_thread(Path(json.loads(made.output)["file"]).read_text))


async def _flood(runtime: Runtime, secret: dict[str, str]) -> None:
    """MESSAGES messages of PER_MESSAGE events, every event naming a model of its own (the probe's)."""
    async with Client(runtime.settings.nats_url, prefix=runtime.settings.prefix, tenant="acme", app="shop",
                      user=secret["user"], password=secret["password"], batch_size=PER_MESSAGE,
                      flush_interval_s=60) as client:  # a message per PER_MESSAGE events, never a partial one
        for i in range(MESSAGES * PER_MESSAGE):
            client.emit(deployment="chat", model=f"made-up-{i}", status="ok", input_tokens=8, output_tokens=1)
        await client.flush()
        assert client.sent == MESSAGES * PER_MESSAGE


async def _records(bus: Bus) -> list[CostRecord]:
    """Every cost record the cost stream holds."""
    stream, out, seq = bus.subjects.streams["cost"].name, [], 1
    while True:
        try:
            msg = await bus.js.get_msg(stream, seq, subject=bus.subjects.cost_all, next=True)
        except nats.js.errors.NotFoundError:
            return out
        out.append(msgspec.json.decode(msg.data, type=CostRecord))
        seq = int(msg.seq) + 1


async def test_an_apps_flood_of_models_leaves_the_events_stream_and_yields_bounded_records(settings: Settings) -> None:
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=SERVICES)
    await runtime.start()
    try:
        admin = runtime.ctx.bus  # the embedded process's admin identity
        events = admin.subjects.streams["events"].name
        config = next(cfg for cfg, _ in topology(admin.subjects, 1) if cfg.name == events)
        await admin.js.update_stream(config.evolve(max_bytes=EVENTS_MAX_BYTES))
        await admin.publish(admin.subjects.artifact_registered, ArtifactRegistered(
            kind="dataset", name="qa", hash="sha256:" + "1" * 64))
        await admin.publish(admin.subjects.gate_decided("shop-v1"),
                            GateDecided(release="shop-v1", decision="PASS", rules=[]))

        await _flood(runtime, await _credential(runtime))
        await runtime.services["cost"].handlers.events.wait_for(MESSAGES * PER_MESSAGE)

        info = await admin.js.stream_info(events, subjects_filter=f"{settings.prefix}.>")
        kept = info.state.subjects or {}
        assert kept.get(admin.subjects.artifact_registered) == 1, kept  # before: evicted by the records
        assert kept.get(admin.subjects.gate_decided("shop-v1")) == 1, kept
        assert not [s for s in kept if s.startswith(f"{settings.prefix}.cost.")], kept
        records = await _records(admin)
        assert len(records) == MESSAGES * RECORDS_MAX  # before: one per model, 3,000
        folded = [r for r in records if r.model == FOLDED]
        assert len(folded) == MESSAGES and {(r.tenant, r.app, r.deployment) for r in folded} == {("acme", "shop", FOLDED)}
        assert sum(r.calls for r in records) == MESSAGES * PER_MESSAGE  # every call counted, folded or not
        assert all(r.calls == PER_MESSAGE - (RECORDS_MAX - 1) for r in folded)
    finally:
        await runtime.stop()


async def _made_before(admin: Bus, old: str, new: str, subjects: list[str]) -> None:
    """The streams of a home made before `new` existed: no `new`, and `old` capturing `subjects` (its subjects then)."""
    await admin.js.delete_stream(new)
    await admin.js.update_stream((await admin.js.stream_info(old)).config.evolve(subjects=subjects))


async def _a_service_starts(settings: Settings, old: str, new: str) -> None:
    """A service that may only create (the sink) starts on such a home: it names the old stream's subjects as
    differing and the new stream as missing, since it may not narrow the old one."""
    sink = Bus(settings.nats_url, Subjects(settings.prefix), name="test-sink", update_topology=False,
               auth=credentials.for_identity(settings, "sink"))
    await sink.connect()
    try:
        assert [d for d in sink.topology_differs if d.startswith((old, new))] == [
            f"{old} (subjects)", f"{new} (missing: another stream still captures its subjects)"]
    finally:
        await sink.close()


async def test_a_home_made_before_moves_cost_records_to_their_stream(secured) -> None:  # noqa: F811
    # A home made before: the events stream captures `cost.>` and there is no cost stream. A service (create only)
    # names both and starts; the admin's `topology apply` (the embedded `lockgate up` at its next start) narrows the
    # events stream first, then makes the cost stream, every message kept.
    _, settings, admin = secured
    s = admin.subjects
    events, cost = s.streams["events"].name, s.streams["cost"].name
    await _made_before(admin, events, cost, [*(await admin.js.stream_info(events)).config.subjects, s.cost_all])
    record = CostRecord(tenant="acme", app="shop", deployment="chat", model="m", calls=1, input_tokens=1,
                        output_tokens=1, cached_tokens=0, cost_usd=0.0, window_start=datetime.now(UTC),
                        window_end=datetime.now(UTC))
    await admin.publish(s.cost("acme"), record)
    # Before: the create of the cost stream, refused (subjects overlap), failed the service's start.
    await _a_service_starts(settings, events, cost)
    # `lockgate status` (a viewer) shows the stream missing and how to apply it: before, it failed on its absence.
    args = ["--home", settings.home, "--nats", settings.nats_url, "--prefix", settings.prefix, "--role", "viewer"]
    shown = await asyncio.to_thread(CliRunner().invoke, cli, [*args, "status", "--json"])
    assert shown.exit_code == 0, shown.output
    row = next(r for r in json.loads(shown.stdout)["streams"] if r["role"] == "cost")
    assert row["state"] == STREAM_MISSING
    await admin.ensure_topology(update=True)
    assert s.cost_all not in (await admin.js.stream_info(events)).config.subjects
    assert (await admin.js.stream_info(events, subjects_filter=s.cost_all)).state.messages == 1  # kept
    await admin.publish(s.cost("acme"), msgspec.structs.replace(record, calls=2))
    assert (await admin.js.stream_info(cost)).state.messages == 1



# Probe p43 F1: the facts stream (1 GiB, limits retention, discard new) kept every cost ledger fact for 7 days, so
# ordinary traffic or one app's flood filled it, and then every fact publish of every tenant was refused. Scaled
# down: both streams to 1 MiB, and a flood of about 2 MB of ledger facts.
FACTS_MAX_BYTES = 1024 * 1024
ROUNDS, PER_ROUND = 4, 2000


async def _kept(bus: Bus, stream: str) -> dict[str, int]:
    """How many messages `stream` holds, by subject."""
    info = await bus.js.stream_info(stream, subjects_filter=f"{bus.subjects.prefix}.>")
    return info.state.subjects or {}


async def test_an_apps_flood_of_events_leaves_the_facts_stream_usable(settings: Settings) -> None:
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=SERVICES)
    await runtime.start()
    try:
        admin, store = runtime.ctx.bus, runtime.ctx.store
        s = admin.subjects
        facts = s.streams["facts"].name
        ledger = await admin.js.find_stream_name_by_subject(s.cost_ledger)  # before: the facts stream
        for name in {facts, ledger}:
            config = (await admin.js.stream_info(name)).config
            await admin.js.update_stream(config.evolve(max_bytes=FACTS_MAX_BYTES))
        secret = await _credential(runtime)
        async with Client(runtime.settings.nats_url, prefix=runtime.settings.prefix, tenant="acme", app="shop",
                          user=secret["user"], password=secret["password"], batch_size=1000,
                          flush_interval_s=60) as client:
            for _ in range(ROUNDS * PER_ROUND):
                client.emit(deployment="chat", model="gpt-4o-mini", status="ok", input_tokens=8, output_tokens=1)
            await client.flush()
        sink = runtime.services["sink"].handlers

        def rows() -> int:
            return int(store.scalar("SELECT count() FROM cost_ledger"))

        def billed() -> bool:
            return rows() == ROUNDS * PER_ROUND

        # Every event billed: twice the ledger stream's size went through it (before: the facts stream, full at
        # about half the flood, refused the rest, dead-lettered by the cost service).
        await eventually(billed, [sink.progress("cost_ledger")], timeout_s=60,
                         what=lambda: f"{ROUNDS * PER_ROUND} events in the ledger (it has {rows()})")
        assert ledger != facts and s.cost_ledger not in await _kept(admin, facts)
        # Another tenant's facts still land (before: refused, the stream full).
        await admin.js.publish(s.eval_cases, b"x" * 30000)
        assert (await _kept(admin, facts)).get(s.eval_cases) == 1
    finally:
        await runtime.stop()


async def test_a_home_made_before_moves_ledger_facts_to_their_stream(secured) -> None:  # noqa: F811
    # A home made before: the facts stream captures `fact.>` and there is no ledger stream. As with the cost records
    # (above): a service names both and starts; admin's `topology apply` narrows the facts stream first, every
    # message kept, then makes the ledger stream and its reader, the sink's durable.
    _, settings, admin = secured
    s = admin.subjects
    facts, ledger = s.streams["facts"].name, s.streams["ledger"].name
    await _made_before(admin, facts, ledger, [f"{settings.prefix}.fact.>"])
    await admin.publish(s.cost_ledger, b"{}", msg_id="before")
    await _a_service_starts(settings, facts, ledger)
    await admin.ensure_topology(update=True)
    assert (await admin.js.stream_info(facts)).config.subjects == list(s.streams["facts"].subjects)
    assert (await _kept(admin, facts)).get(s.cost_ledger) == 1  # kept
    await admin.publish(s.cost_ledger, b"{}", msg_id="after")
    await admin.publish(s.eval_cases, b"{}", msg_id="cases")
    assert (await admin.js.stream_info(ledger)).state.messages == 1  # kept for the sink's durable, declared with it
    assert (await admin.js.consumer_info(ledger, s.durable("sink", "cost_ledger"))).num_pending == 1
    assert (await _kept(admin, facts)) == {s.cost_ledger: 1, s.eval_cases: 1}
