"""An artifact version's sunset on a real, authenticated embedded stack: once it passes, a release using it that the gate
PASSed before is a signed BLOCK (rule `lifecycle kind/name`, naming the successor), `gate verify` says so, the router
rolls a deployment serving it back and admits it nowhere new. A gatekeeper that was not running when the sunset passed
does the same at its start.

Found by probe p29 (F4): the sunset was judged only when a new eval was decided (and by `alias set`). A PASS decided
before it kept admitting: `gate verify` exit 0, `rollout start NEWDEP --stable REL` admitted it, and the router kept
serving it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from lockgate import artifacts
from lockgate.bus import Bus, Delivery
from lockgate.cli.gate import current_decision
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import GateDecided
from lockgate.contracts.provenance import ArtifactLifecycle
from lockgate.errors import BusUnavailable
from lockgate.provenance import chain, ledger, lifecycle
from lockgate.server.apikeys import bootstrap
from lockgate.server.runtime import Runtime
from lockgate.server.service import ServiceContext
from lockgate.services.gatekeeper import domain, sunsets
from lockgate.services.gatekeeper.app import Gatekeeper
from lockgate.signing import Keyring, Signer
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import Relay, eventually, person, register_model_release, run_cli, store_decision
from tests.integration.test_required_gates import FIXTURES, answers, rollout

pytestmark = pytest.mark.timeout(150)
LENIENT = {"name": "lenient", "use_interval": False,
           "rules": [{"name": "latency", "metric": "latency_p95_ms", "op": "<=", "threshold": 2000}]}
_decided: Codec[GateDecided] = Codec(GateDecided)


def policy_file(tmp_path: Path) -> str:
    path = tmp_path / "lenient.yaml"
    path.write_text(yaml.safe_dump(LENIENT))
    return str(path)


async def passed(runtime: Runtime, policy: str, *releases: str) -> None:
    """Each release evaluated on the fixture suite and PASSed by the gatekeeper, as an operator runs it."""
    for release in releases:
        ran = await run_cli(runtime, "--role", "operator", "eval", "run", str(FIXTURES / "suites" / "qa.yaml"),
                            "--candidate", release, "--policy", policy, "--timeout", "60")
        assert ran.exit_code == 0, ran.output


async def refused_everywhere(runtime: Runtime, release: str, block: GateDecided) -> None:
    """`gate verify` says BLOCK (exit 5), and the router admits the release as no new deployment's release."""
    verified = await run_cli(runtime, "gate", "verify", release)
    assert verified.exit_code == 5 and f"({release}: BLOCK, decided " in verified.output, verified.output
    router = runtime.services["router"]
    refused = await run_cli(runtime, "rollout", "--router", router.url, "--api-key",
                            bootstrap(runtime.settings.home).admin_key, "start", "web", "--stable", release)
    assert refused.exit_code == 4 and "409" in refused.output and "BLOCK" in refused.output, refused.output
    assert block.id in refused.output, refused.output


def zulu(when: datetime) -> str:
    """A UTC time as the lifecycle messages say it: ISO 8601 with a Z."""
    return when.isoformat().replace("+00:00", "Z")


def lifecycle_rule(block: GateDecided) -> list[tuple[str, str]]:
    return [(r.rule, r.verdict) for r in block.rules if r.rule.startswith("lifecycle")]


@contextlib.asynccontextmanager
async def _answered_well(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[Settings, str]]:
    """Settings for a stack of its own whose stable upstream, a simulator, answers the qa suite well, with ann an
    operator identity; and a policy file its evals pass."""
    policy = policy_file(tmp_path)
    async with SimServer(SimConfig(models={"good": ModelSpec(answers=answers(), latency_ms=2)})) as sim:
        base = settings.replace(nats_url="nats://127.0.0.1:0", stable_upstream=sim.url, deployment="chat")
        person(base, "ann", "operator")
        yield base, policy


async def test_a_pass_decided_before_its_model_configs_sunset_is_a_block_once_the_sunset_passes(
    settings: Settings, tmp_path: Path
) -> None:
    async with _answered_well(settings, tmp_path) as (base, policy):
        runtime = Runtime(base, services=["sink", "query", "evaluator", "gatekeeper", "router"])
        await runtime.start()
        try:
            bus, keyring = runtime.ctx.bus, Keyring.from_settings(runtime.settings)
            await artifacts.register_file(bus, "dataset", FIXTURES / "suites" / "qa.jsonl")
            successor = (await register_model_release(bus, "r-base", "good", temperature=0))["model_config/r-base-config"]
            config = (await register_model_release(bus, "r-old", "good"))["model_config/r-old-config"]
            await passed(runtime, policy, "r-base", "r-old")
            before = await current_decision(bus, "r-old")
            assert before.decision == "PASS"
            # r-old serves deployment chat, promoted over r-base (its known-good release).
            router = runtime.services["router"]
            assert (await rollout(router, {"stable_release": "r-base"}))[0] == 200
            assert (await rollout(router, {"stable_release": "r-base", "canary_release": "r-old"}))[0] == 200
            status, promoted = await rollout(router, None, "/promote")
            assert (status, promoted["stable"]["release"]) == (200, "r-old"), promoted

            announced = await bus.nc.subscribe(bus.subjects.gate_decided("r-old"))
            sunset = datetime.now(UTC) + timedelta(seconds=4)
            deprecated = await run_cli(runtime, "--as", "ann", "artifact", "deprecate", config, "--successor",
                                       successor, "--sunset", sunset.isoformat(), "--reason", "retired")
            assert deprecated.exit_code == 0, deprecated.output

            # The gatekeeper's timer for the sunset: the next decision announced for r-old is its BLOCK.
            block = _decided.decode((await announced.next_msg(timeout=30)).data)
            assert block.decision == "BLOCK" and keyring.verify(block) == block.key_id
            assert block.time >= sunset  # made when the sunset passed, not when the record was read
            assert await current_decision(bus, "r-old") == block
            assert (block.eval_run, block.policy, block.reviewed_by) == (before.eval_run, before.policy, "")
            assert lifecycle_rule(block) == [("lifecycle model_config/r-old-config", "FAIL")]
            assert block.reason.startswith(
                f"model_config/r-old-config {config[:19]} was sunset on {zulu(sunset)} (retired); use its "
                f"successor {successor}; "), block.reason
            assert block.id == domain.decision_id(
                before.id, f"{runtime.services['gatekeeper'].handlers.records.salt}:sunset:r-old")

            await refused_everywhere(runtime, "r-old", block)
            # The deployment serving it goes back to its known-good release, as for any BLOCK of a serving release.
            await router.rollouts.wait_for(lambda routes: routes["chat"].stable.release == "r-base", timeout=20)
            assert router.rollouts.route("chat").decision_id == block.id
            # The release of the successor keeps its PASS; the remade BLOCK is audited as `sunset`.
            assert (await current_decision(bus, "r-base")).decision == "PASS"
            sink = runtime.services["sink"].handlers
            await eventually(lambda: runtime.ctx.store.scalar(
                "SELECT count() FROM gate_decisions WHERE id = {id:String} AND action = 'sunset'",
                {"id": block.id}) == 1, [sink.progress("gate_decisions")], what="the remade BLOCK audited")
        finally:
            await runtime.stop()


async def test_a_gatekeeper_started_after_a_sunset_passed_blocks_the_pass_at_its_start(
    settings: Settings, tmp_path: Path
) -> None:
    async with _answered_well(settings, tmp_path) as (base, policy):
        first = Runtime(base, services=["sink", "query", "evaluator", "gatekeeper"])
        await first.start()
        try:
            bus = first.ctx.bus
            await artifacts.register_file(bus, "dataset", FIXTURES / "suites" / "qa.jsonl")
            successor = (await register_model_release(bus, "r-next", "good", temperature=0))["model_config/r-next-config"]
            config = (await register_model_release(bus, "r-old", "good"))["model_config/r-old-config"]
            await passed(first, policy, "r-old")
            before = await current_decision(bus, "r-old")
            assert before.decision == "PASS"
        finally:
            await first.stop()

        # No gatekeeper runs when the sunset is recorded and passes.
        down = Runtime(base, services=["sink"])
        await down.start()
        try:
            sunset = datetime.now(UTC) - timedelta(minutes=1)
            deprecated = await run_cli(down, "--as", "ann", "artifact", "deprecate", config, "--successor", successor,
                                       "--sunset", sunset.isoformat(), "--reason", "retired")
            assert deprecated.exit_code == 0, deprecated.output
            # The gatekeeper that read the record stopped before its sunset: its timer went with it, and its
            # consumer of the lifecycle records holds nothing more (the admin acks the record in its place).
            bus, s = down.ctx.bus, down.ctx.bus.subjects
            pull = await bus.js.pull_subscribe_bind(durable=s.durable("gatekeeper", "lifecycles"),
                                                    stream=s.streams["provenance"].name)
            (msg,) = await pull.fetch(1, timeout=5)
            assert msg.subject == s.lifecycle(config)
            await msg.ack_sync()
        finally:
            await down.stop()

        after = Runtime(base, services=["sink", "query", "gatekeeper", "router"])
        await after.start()
        try:
            bus, keyring = after.ctx.bus, Keyring.from_settings(after.settings)
            block = await current_decision(bus, "r-old")  # judged before the start returned
            assert block.decision == "BLOCK" and keyring.verify(block) == block.key_id
            assert lifecycle_rule(block) == [("lifecycle model_config/r-old-config", "FAIL")]
            assert block.reason.startswith(
                f"model_config/r-old-config {config[:19]} was sunset on {zulu(sunset)} (retired); use its "
                f"successor {successor}; "), block.reason
            gatekeeper = after.services["gatekeeper"]
            assert block.id == domain.decision_id(before.id, f"{gatekeeper.handlers.records.salt}:sunset:r-old")
            assert gatekeeper.problems() == []
            await refused_everywhere(after, "r-old", block)
            # A second start (or a replica's) finds the BLOCK and remakes nothing.
            await gatekeeper.sunsets.start()
            assert await current_decision(bus, "r-old") == block
        finally:
            await after.stop()


async def _passed(bus: Bus, signer: Signer, release: str) -> str:
    """A release PASSed (signed by `signer`) over a model config of its own: that config's hash."""
    config = (await artifacts.register(bus, "model_config", f"{release}-config", {"release": release})).hash
    await store_decision(bus, signer.sign(GateDecided(release=release, decision="PASS", rules=[],
                                                      eval_run=f"run-{release}",
                                                      artifacts={f"model_config/{release}-config": config})))
    return config


async def _r_old_passed(bus: Bus, signer: Signer) -> tuple[str, str, Any]:
    """r-old PASSed over its config (`_passed`), the config's successor registered, and a subscription to r-old's
    decisions announced from now on."""
    config = await _passed(bus, signer, "r-old")
    successor = (await artifacts.register(bus, "model_config", "r-new-config", {"release": "r-new"})).hash
    return config, successor, await bus.nc.subscribe(bus.subjects.gate_decided("r-old"))


async def _blocked_once_stopped(replica: Runtime, sunset: datetime, announced: Any, keyring: Keyring) -> GateDecided:
    """Stop `replica` before `sunset`; the BLOCK another replica then announces at the sunset, signed by a trusted
    key."""
    await replica.stop()
    assert datetime.now(UTC) < sunset, "the replica stopped after the sunset: give the test a later one"
    block = _decided.decode((await announced.next_msg(timeout=30)).data)
    assert block.decision == "BLOCK" and keyring.verify(block) == block.key_id
    assert block.time >= sunset
    return block


async def test_every_gatekeeper_replica_holds_a_sunset_recorded_while_it_runs(settings: Settings) -> None:
    # Probe p32 (F2): the replicas shared one consumer of the lifecycle records, so a record armed the sunset's timer
    # of the replica that read it only. That one stopped before the sunset, and the release kept its PASS past it
    # (until a replica started again).
    base = settings.replace(nats_url="nats://127.0.0.1:0")
    person(base, "ann", "operator")
    stack = Runtime(base, services=["sink", "query"])
    await stack.start()
    running: list[Runtime] = []
    try:
        for _ in range(2):  # two replicas, each a process of its own as deployed: its own connection, as gatekeeper
            running.append(Runtime(stack.settings, services=["gatekeeper"], embedded_nats=False))
            await running[-1].start()
        replicas = {r: r.services["gatekeeper"].sunsets for r in running}
        bus, keyring = stack.ctx.bus, Keyring.from_settings(stack.settings)
        config, successor, announced = await _r_old_passed(bus, running[0].services["gatekeeper"].signer)

        # What is no lifecycle record on its subject is skipped by every replica, which then hears the next one.
        await bus.js.publish(bus.subjects.lifecycle(config), b'{"junk": true}')
        sunset = datetime.now(UTC) + timedelta(seconds=8)
        deprecated = await run_cli(stack, "--as", "ann", "artifact", "deprecate", config, "--successor", successor,
                                   "--sunset", sunset.isoformat(), "--reason", "retired")
        assert deprecated.exit_code == 0, deprecated.output
        # One replica reads the record from their shared consumer; every replica arms the sunset's timer.
        counters = [c for s in replicas.values() for c in (s.read, s.heard)]
        await eventually(lambda: any(s.read.count for s in replicas.values()), counters, what="the record read")
        await eventually(lambda: all(s.armed(config) is not None for s in replicas.values()), counters, timeout_s=4,
                         what=lambda: "the sunset armed on every replica (armed: "
                                      f"{[s.armed(config) is not None for s in replicas.values()]})")
        assert [s.heard.count for s in replicas.values()] == [1, 1]  # the record, not the junk
        # The replica that read it stops before the sunset: the other remakes the PASS as a BLOCK when it passes.
        reader = next(r for r, s in replicas.items() if s.read.count)
        running.remove(reader)
        block = await _blocked_once_stopped(reader, sunset, announced, keyring)
        assert sorted(lifecycle_rule(block)) == [("lifecycle model_config/r-old-config", "FAIL"),
                                                 ("lifecycle records skipped", "PASS")]  # the junk, named
        assert block.reason.startswith(f"model_config/r-old-config {config[:19]} was sunset on {zulu(sunset)} "
                                       f"(retired); use its successor {successor}; "), block.reason
        assert await current_decision(bus, "r-old") == block
    finally:
        for replica in running:
            await replica.stop()
        await stack.stop()


async def test_a_gatekeeper_replica_cut_off_while_a_sunset_is_recorded_holds_it_once_it_reconnects(
        settings: Settings) -> None:
    # Each replica hears the lifecycle records appended on a core subscription, which does not replay: one recorded
    # while replica A's connection was down went to replica B alone (their shared consumer). B stopped before the
    # sunset, and the release kept its PASS past it (until a replica started again).
    base = settings.replace(nats_url="nats://127.0.0.1:0")
    person(base, "ann", "operator")
    stack = Runtime(base, services=["sink", "query"])
    await stack.start()
    relay = Relay(int(stack.settings.nats_url.rpartition(":")[2]))
    running: list[Runtime] = []
    try:
        # Two replicas, each a process of its own as deployed; A's connection goes through the relay.
        through = stack.settings.replace(nats_url=f"nats://127.0.0.1:{await relay.start()}")
        for replica_settings in (through, stack.settings):
            running.append(Runtime(replica_settings, services=["gatekeeper"], embedded_nats=False))
            await running[-1].start()
        a, b = running
        cut_off, other = a.services["gatekeeper"].sunsets, b.services["gatekeeper"].sunsets
        bus, keyring = stack.ctx.bus, Keyring.from_settings(stack.settings)
        config, successor, announced = await _r_old_passed(bus, b.services["gatekeeper"].signer)

        relay.cut()  # A alone loses the server, which stays up for everyone else
        await a.services["gatekeeper"].ctx.bus.wait_state("reconnecting", timeout_s=10)
        listings = cut_off.listed.count
        sunset = datetime.now(UTC) + timedelta(seconds=15)
        deprecated = await run_cli(stack, "--as", "ann", "artifact", "deprecate", config, "--successor", successor,
                                   "--sunset", sunset.isoformat(), "--reason", "retired")
        assert deprecated.exit_code == 0, deprecated.output
        await eventually(lambda: other.read.count == 1 and other.armed(config) is not None, [other.read],
                         what="the record read and armed by B, from the shared consumer")
        assert (cut_off.read.count, cut_off.heard.count, cut_off.armed(config)) == (0, 0, None)  # missed live

        relay.heal()  # nats-py waits about 2 s between reconnect attempts
        await eventually(lambda: cut_off.listed.count > listings, [cut_off.listed],
                         what="A's lifecycles listed again after its reconnect")
        assert cut_off.armed(config) is not None
        assert not a.services["gatekeeper"].problems()
        # B stops before the sunset: A remakes the PASS as a BLOCK when it passes.
        running.remove(b)
        block = await _blocked_once_stopped(b, sunset, announced, keyring)
        assert lifecycle_rule(block) == [("lifecycle model_config/r-old-config", "FAIL")]
        assert await current_decision(bus, "r-old") == block
    finally:
        for replica in running:
            await replica.stop()
        await relay.close()
        await stack.stop()


async def test_a_failed_listing_is_said_on_readiness_and_retried_until_one_succeeds(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # A listing of the lifecycles (at start, after a reconnect) that fails leaves sunsets unknown, so readiness says
    # so, and it is tried again until one succeeds, which clears it. Before, it was tried again only at the next
    # reconnect or restart: a bus that stayed connected left the sunsets unknown for good.
    base = settings.replace(nats_url="nats://127.0.0.1:0")
    stack = Runtime(base, services=["sink", "query"])
    await stack.start()
    relay = Relay(int(stack.settings.nats_url.rpartition(":")[2]))
    replica: Runtime | None = None
    try:
        through = stack.settings.replace(nats_url=f"nats://127.0.0.1:{await relay.start()}")
        failing: list[str] = ["at start"]  # while not empty, every listing of the lifecycles fails
        failed: list[str] = []
        listed = ledger.subjects

        async def failing_while_said(bus: Bus, pattern: str) -> dict[str, int]:
            if pattern == bus.subjects.lifecycle_any and failing:
                failed.append(failing[0])
                raise BusUnavailable("the provenance stream is unavailable")
            return await listed(bus, pattern)

        monkeypatch.setattr(ledger, "subjects", failing_while_said)
        replica = Runtime(through, services=["gatekeeper"], embedded_nats=False)
        await replica.start()  # not held up by the failing listing
        gatekeeper = replica.services["gatekeeper"]
        bus = gatekeeper.ctx.bus

        def unsunset() -> list[str]:
            return [p for p in gatekeeper.problems() if "were not all read" in p]

        async def listed_again_without_a_reconnect() -> None:
            # Said until the stream answers again; then the next try lists them, on the same connection.
            assert unsunset(), gatekeeper.problems()
            reconnects = bus.reconnects
            failing.clear()
            await eventually(lambda: not unsunset(), [gatekeeper.sunsets.listed],
                             what=lambda: f"the lifecycles listed again ({gatekeeper.problems()})")
            assert gatekeeper.problems() == [] and bus.reconnects == reconnects

        assert "at start" in failed
        await listed_again_without_a_reconnect()

        # After a reconnect they are listed again; that listing failing is retried alike.
        failing.append("after a reconnect")
        listings = gatekeeper.sunsets.listed.count
        relay.cut()
        await bus.wait_state("reconnecting", timeout_s=10)
        relay.heal()  # nats-py waits about 2 s between reconnect attempts
        await eventually(lambda: gatekeeper.sunsets.listed.count > listings, [gatekeeper.sunsets.listed],
                         what="the lifecycles listed again after the reconnect")
        assert "after a reconnect" in failed
        await listed_again_without_a_reconnect()
    finally:
        if replica is not None:
            await replica.stop()
        await relay.close()
        await stack.stop()


class _Stand:
    """A gatekeeper that is not started (no consumers), whose Sunsets a test drives on the real bus: releases PASSed
    by its key over artifacts that `deprecate` gives a sunset."""

    def __init__(self, context: ServiceContext, settings: Settings) -> None:
        self.gatekeeper = Gatekeeper(context)
        self.bus, self.settings = context.bus, settings
        self.ann = person(settings, "ann", "operator")

    async def passed(self, release: str) -> str:
        """A release PASSed by its key over a model config of its own: that config's hash."""
        return await _passed(self.bus, self.gatekeeper.signer, release)

    async def sunset(self, digest: str, when: datetime) -> tuple[ArtifactLifecycle, Delivery]:
        record, _ = await lifecycle.deprecate(self.bus, self.settings, self.ann, digest, sunset=when, reason="retired")
        return record, Delivery(subject=self.bus.subjects.lifecycle(digest), msg_id=record.id, headers={},
                                deliveries=1, stream_seq=0)


@pytest.fixture
def stand(context: ServiceContext, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> _Stand:
    monkeypatch.setattr(sunsets, "_RETRY_S", 0.2)  # a pass that failed is tried again within the test
    return _Stand(context, settings)


async def test_a_sunset_moved_while_a_pass_fails_is_still_held_when_it_passes(
    stand: _Stand, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The failed pass armed its retry over the timer of the moved sunset, with the sunset it had read; the retry
    # found nothing past that sunset any more and armed nothing: the release kept its PASS past the new sunset.
    bus, gatekeeper = stand.bus, stand.gatekeeper
    config = await stand.passed("r-old")
    announced = await bus.nc.subscribe(bus.subjects.gate_decided("r-old"))
    moved: list[datetime] = []
    entries = bus.kv_entries

    async def failing_once(bucket: str) -> dict[str, bytes]:
        if bucket == bus.subjects.kv_gates and not moved:
            # While the pass for the first sunset reads the releases, a record moves the sunset a little ahead.
            moved.append(datetime.now(UTC) + timedelta(seconds=2))
            await gatekeeper.sunsets.on_lifecycle(*await stand.sunset(config, moved[0]))
            raise BusUnavailable("the gates bucket is unavailable")
        return await entries(bucket)

    monkeypatch.setattr(bus, "kv_entries", failing_once)
    try:
        await gatekeeper.sunsets.on_lifecycle(*await stand.sunset(config, datetime.now(UTC) - timedelta(minutes=1)))
        block = _decided.decode((await announced.next_msg(timeout=20)).data)
        assert block.decision == "BLOCK" and block.time >= moved[0]
        assert lifecycle_rule(block) == [("lifecycle model_config/r-old-config", "FAIL")]
        assert gatekeeper.sunsets.unheld == {}
    finally:
        await gatekeeper.stop()


async def test_a_history_unreadable_at_start_leaves_the_other_sunsets_held_and_is_retried(
    stand: _Stand, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first history that failed to read ended the start: every sunset after it went unheld until a restart.
    bus, gatekeeper = stand.bus, stand.gatekeeper
    configs = {release: await stand.passed(release) for release in ("r-one", "r-two")}
    for config in configs.values():
        await stand.sunset(config, datetime.now(UTC) - timedelta(minutes=1))
    announced = {r: await bus.nc.subscribe(bus.subjects.gate_decided(r)) for r in configs}
    failed: list[str] = []
    history = lifecycle.history

    async def failing_once(bus: Bus, settings: Settings, digest: str) -> chain.History[ArtifactLifecycle]:
        if not failed:
            failed.append(digest)
            raise BusUnavailable(f"the lifecycle of {digest} is unavailable")
        return await history(bus, settings, digest)

    monkeypatch.setattr(lifecycle, "history", failing_once)
    try:
        await gatekeeper.sunsets.start()
        (other,) = [r for r, config in configs.items() if config not in failed]
        assert (await current_decision(bus, other)).decision == "BLOCK"  # judged before the start returned
        assert list(gatekeeper.sunsets.unheld) == failed
        # The one unread is retried by its timer.
        (unread,) = [r for r, config in configs.items() if config in failed]
        block = _decided.decode((await announced[unread].next_msg(timeout=20)).data)
        assert block.decision == "BLOCK" and await current_decision(bus, unread) == block
        assert gatekeeper.sunsets.unheld == {} and gatekeeper.problems() == []
    finally:
        await gatekeeper.stop()
        for sub in announced.values():  # the other release's BLOCK is not read: do not leave it to the drain
            await sub.unsubscribe()
