"""Lineage recorder on real NATS and chDB: events become a graph the lineage query walks."""

from __future__ import annotations

import asyncio

import pytest

from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.contracts import (
    ArtifactRegistered,
    EvalCompleted,
    GateDecided,
    LineageRun,
    ReleaseRegistered,
    RolloutState,
    RuleResult,
)
from lockgate.errors import NotFound
from lockgate.services.query.lineage import AmbiguousReference, lineage
from lockgate.store import Store
from tests.helpers import sink_stored

pytestmark = pytest.mark.timeout(60)

# Contents found for hashes that read as their names (`d1d1d1`, `a7`): a release names only artifacts whose bytes
# are stored under their hashes (artifacts.check_references reads them). RAW is a build's input, never stored.
DATA = "sha256:d1d1d189515ac1e43a1f6d823b23d6cb9b5dd65d8e863d781d0d096ad906acf4"
PROMPT = "sha256:a7e14139ea93b5107842b115d0e9fb523e4adcc0d93efaad77e6c99524be38a0"
RAW = "sha256:" + "a0" * 32
_CONTENT = {DATA: b"dataset 15176705", PROMPT: b"prompt 119"}


async def stored(bus: Bus, *digests: str) -> None:
    """Objects under these hashes, so a release may name them (it may name only stored artifacts)."""
    for digest in digests:
        await bus.put_object(bus.subjects.object_store, digest, _CONTENT[digest])


async def _publish_history(bus: Bus) -> GateDecided:
    from lockgate import artifacts

    s = bus.subjects
    # A release announced on the bus is bound by the recorder only as `release create` would bind it: its
    # artifacts stored and its parent bound.
    await stored(bus, DATA, PROMPT)
    await artifacts.register_release(bus, "rel-1", "shop", {"prompt/greet": PROMPT})
    await bus.publish(s.artifact_registered, ArtifactRegistered(kind="dataset", name="qa", hash=DATA, size=10))
    await bus.publish(s.artifact_registered, ArtifactRegistered(kind="prompt", name="greet", hash=PROMPT))
    await bus.publish(s.lineage_run, LineageRun(run_id="build-1", kind="build", inputs=[RAW], outputs=[DATA]))
    await bus.publish(s.release_registered, ReleaseRegistered(
        release="rel-2", app="shop", artifacts={"dataset/qa": DATA, "prompt/greet": PROMPT}, parent="rel-1"))
    await bus.publish(s.eval_completed, EvalCompleted(run_id="eval-9", release="rel-2", suite=DATA, n_cases=3))
    gate = GateDecided(release="rel-2", decision="PASS", eval_run="eval-9", rules=[
        RuleResult(rule="acc", metric="accuracy", op=">=", threshold=0.8, observed=0.9, verdict="PASS")])
    await bus.publish(s.gate_decided(gate.release), gate)
    await bus.publish(s.rollout("checkout"), RolloutState(
        deployment="checkout", stable_release="rel-1", canary_release="rel-2", canary_weight=10,
        phase="progressing", decision_id=gate.id))
    return gate


def _triples(edges: list[dict]) -> set[tuple[str, str, str, int]]:
    return {(e["src"], e["relation"], e["dst"], e["depth"]) for e in edges}


async def test_release_lineage_upstream_and_downstream(run_services, bus: Bus, store: Store) -> None:
    svcs = await run_services("sink", "lineage")
    gate = await _publish_history(bus)
    await svcs["lineage"].handlers.processed.wait_for(6, timeout_s=30)
    # The sink stores the events' own rows and the edges the recorder derived from six of them.
    await sink_stored(svcs["sink"].handlers, artifacts=2, releases=2, lineage_runs=1, eval_runs=1,
                      rollout_events=1, lineage_edges=6)

    got = await asyncio.to_thread(lineage, store, "rel-2")
    assert (got["node"], got["kind"]) == ("rel-2", "release")
    assert _triples(got["upstream"]) == {
        ("rel-1", "parent_of", "rel-2", 1),
        ("rel-1", "uses", PROMPT, 2),
        ("rel-2", "uses", DATA, 1),
        ("rel-2", "uses", PROMPT, 1),
        ("build-1", "produced", DATA, 2),
        ("build-1", "used", RAW, 3),
    }
    assert _triples(got["downstream"]) == {
        ("rel-2", "evaluated_by", "eval-9", 1),
        ("rel-2", "decided", gate.id, 1),
        ("rel-2", "rolled_out", "checkout", 1),
        ("eval-9", "gated_by", gate.id, 2),
    }

    # A decision id resolves too, and leads back to the release and its data.
    from_gate = await asyncio.to_thread(lineage, store, gate.id, 2)
    assert from_gate["kind"] == "decision"
    assert {"rel-2", "eval-9", DATA} <= {e["src"] for e in from_gate["upstream"]} | {
        e["dst"] for e in from_gate["upstream"]}
    assert max(e["depth"] for e in from_gate["upstream"]) == 2

    # An artifact by unique hash prefix (with or without "sha256:").
    for ref in ("sha256:d1d1d1", "d1d1d189"):
        art = await asyncio.to_thread(lineage, store, ref)
        assert (art["node"], art["kind"]) == (DATA, "dataset")
        assert ("rel-2", "uses", DATA, 1) in _triples(art["downstream"])
        assert ("build-1", "produced", DATA, 1) in _triples(art["upstream"])

    with pytest.raises(AmbiguousReference):
        await asyncio.to_thread(lineage, store, "sha256:a")  # PROMPT and RAW
    for nothing in ("", "sha256:"):  # before: a prefix of every hash, "matches 3 artifacts"
        with pytest.raises(NotFound, match="give a release, an artifact hash"):
            await asyncio.to_thread(lineage, store, nothing)
    with pytest.raises(NotFound):
        await asyncio.to_thread(lineage, store, "no-such-thing")

    assert store.scalar("SELECT count() FROM artifacts") == 2
    assert store.rows("SELECT artifacts FROM releases WHERE release = 'rel-2'")[0]["artifacts"] == {
        "dataset/qa": DATA, "prompt/greet": PROMPT}
    assert store.rows("SELECT inputs, outputs FROM lineage_runs") == [{"inputs": [RAW], "outputs": [DATA]}]


async def test_redelivered_event_adds_no_rows(run_services, bus: Bus, store: Store) -> None:
    svcs = await run_services("sink", "lineage")
    await stored(bus, DATA)
    rel = ReleaseRegistered(release="rel-x", app="shop", artifacts={"dataset/qa": DATA})
    # Different Nats-Msg-Ids, so JetStream delivers both; the event id still guards the inserts.
    await bus.publish(bus.subjects.release_registered, rel, msg_id="first")
    await bus.publish(bus.subjects.release_registered, rel, msg_id="second")
    await svcs["lineage"].handlers.processed.wait_for(2, timeout_s=30)
    await sink_stored(svcs["sink"].handlers, releases=1, lineage_edges=1)
    assert store.scalar("SELECT count() FROM releases") == 1
    assert store.scalar("SELECT count() FROM lineage_edges") == 1


async def test_release_rebound_on_the_bus_is_refused_not_linked(run_services, bus: Bus, store: Store) -> None:
    # Before: re-registering a release name with different content was accepted, and the newer won.
    from lockgate import artifacts
    from lockgate.codec import Codec
    from lockgate.contracts import DeadLetter
    from lockgate.errors import ReleaseConflict

    svcs = await run_services("sink", "lineage")
    dlq = await bus.nc.subscribe(bus.subjects.dlq("lineage"))
    await stored(bus, DATA, PROMPT)
    await artifacts.register_release(bus, "rel-y", "shop", {"dataset/qa": DATA})
    with pytest.raises(ReleaseConflict, match="already registered with other content"):
        await artifacts.register_release(bus, "rel-y", "shop", {"dataset/qa": PROMPT})
    # Published straight on the bus, bypassing register_release: lineage checks the binding itself.
    forged = ReleaseRegistered(release="rel-y", app="shop", artifacts={"dataset/qa": PROMPT})
    await bus.publish(bus.subjects.release_registered, forged)
    letter = Codec(DeadLetter).decode((await dlq.next_msg(timeout=20)).data)
    assert "already registered with other content" in letter.error
    await svcs["lineage"].handlers.processed.wait_for(1, timeout_s=30)
    await sink_stored(svcs["sink"].handlers, lineage_edges=1)
    assert store.scalar("SELECT count() FROM lineage_edges WHERE dst = {h:String}", {"h": PROMPT}) == 0
    assert (await artifacts.release_of(bus, "rel-y"))["artifacts"] == {"dataset/qa": DATA}


async def test_a_line_version_name_announced_on_the_bus_for_other_content_is_refused_not_bound(
        run_services, bus: Bus) -> None:
    # Probe p8 (F2): the name `<line>@<12 hex>` of a release line's next version, taken first by other content,
    # kept the line from binding its own. Announced straight on the bus, the lineage recorder binds what
    # `release create` would: nothing.
    from lockgate import artifacts
    from lockgate.codec import Codec
    from lockgate.contracts import DeadLetter
    from lockgate.errors import NotFound

    await run_services("lineage")
    dlq = await bus.nc.subscribe(bus.subjects.dlq("lineage"))
    await stored(bus, DATA)
    squat = "shop@" + artifacts.line_version("shop", {"dataset/qa": PROMPT})  # another content's version
    await bus.publish(bus.subjects.release_registered,
                      ReleaseRegistered(release=squat, app="shop", artifacts={"dataset/qa": DATA}))
    letter = Codec(DeadLetter).decode((await dlq.next_msg(timeout=20)).data)
    assert "has the form of a release line's version" in letter.error, letter.error
    with pytest.raises(NotFound):
        await artifacts.release_of(bus, squat)


async def test_a_forged_registration_of_a_bound_release_never_lands_in_clickhouse(settings: Settings) -> None:
    # Before: the binding refused it, but the sink stored the forged ReleaseRegistered from the bus,
    # so `releases` (and every query on it) showed content that is not the bound release. Embedded
    # as `lockgate up` runs it, the forger holds the operator role, which may announce releases.
    from lockgate import artifacts, credentials
    from lockgate.codec import Codec
    from lockgate.contracts import DeadLetter
    from lockgate.credentials import NotAllowed
    from lockgate.server.runtime import Runtime
    from lockgate.subjects import Subjects

    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink", "lineage"])
    await runtime.start()
    operator = None
    try:
        assert runtime.ctx is not None and runtime.ctx.store is not None and runtime.services is not None
        store, admin = runtime.ctx.store, runtime.ctx.bus
        sink, recorder = runtime.services["sink"].handlers, runtime.services["lineage"].handlers
        dlq = await admin.nc.subscribe(admin.subjects.dlq("lineage"))
        operator = Bus(runtime.settings.nats_url, Subjects(settings.prefix), name="forger",
                       auth=credentials.for_identity(runtime.settings, "operator"), manage_topology=False)
        await operator.connect()
        await stored(admin, DATA, PROMPT)
        await artifacts.register_release(operator, "rel-y", "shop", {"dataset/qa": DATA})
        forged = ReleaseRegistered(release="rel-y", app="shop", artifacts={"dataset/qa": PROMPT})
        await operator.publish(operator.subjects.release_registered, forged)
        with pytest.raises(NotAllowed):  # nor can it announce a bound release itself
            await operator.publish(operator.subjects.release_bound, forged)
        letter = Codec(DeadLetter).decode((await dlq.next_msg(timeout=20)).data)
        assert letter.reason == "rejected" and "release 'rel-y' is already registered with other content" in letter.error
        # A later release, recorded in order after the forged one, shows the sink is past it.
        await artifacts.register_release(operator, "rel-z", "shop", {"prompt/greet": PROMPT})
        await recorder.processed.wait_for(2, timeout_s=30)  # the forged one was refused, not processed
        await sink_stored(sink, releases=2)
        rows = store.rows("SELECT release, artifacts FROM releases ORDER BY release")
        assert rows == [{"release": "rel-y", "artifacts": {"dataset/qa": DATA}},
                        {"release": "rel-z", "artifacts": {"prompt/greet": PROMPT}}]
    finally:
        if operator is not None:
            await operator.close()
        await runtime.stop()
