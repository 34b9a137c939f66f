"""The lineage recorder records facts, not what an announcement claims, on the embedded runtime as `lockgate up` runs
it (a nats-server user per service): the forger holds the operator credential, which may announce releases and bind
them in the releases bucket; `lockgate lineage` reads the result.

Found by a probe (p12): F3, an announcement's `time` and `id` were taken as facts, so a re-announcement of a bound
release back-dated to 2020 under a new id added a second `releases` row and its edges as of 2020, and a never-bound
name announced as of 2020 was bound by the recorder unchecked and shown in `lineage --at 2021`. F6, a release bound
straight in the bucket and never announced was evaluated and gated by its binding while lineage showed nothing
behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from lockgate import artifacts, credentials
from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import DeadLetter, GateDecided, ReleaseRegistered
from lockgate.errors import NotFound
from lockgate.ids import canonical_json
from lockgate.server.runtime import Runtime
from lockgate.subjects import Subjects
from tests.helpers import eventually, run_cli_json

pytestmark = pytest.mark.timeout(120)

LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[tuple[Runtime, Bus]]:
    """The embedded runtime (sink, query, lineage) and a bus connected with the operator's credential."""
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink", "query", "lineage"])
    await runtime.start()
    operator = Bus(runtime.settings.nats_url, Subjects(settings.prefix), name="forger",
                   auth=credentials.for_identity(runtime.settings, "operator"), manage_topology=False)
    await operator.connect()
    try:
        yield runtime, operator
    finally:
        await operator.close()
        await runtime.stop()


def _uses(view: dict) -> set[str]:
    return {e["dst"] for e in view["upstream"] if e["relation"] == "uses"}


async def test_a_back_dated_or_re_announced_release_is_recorded_at_its_binding_once(
        stack: tuple[Runtime, Bus]) -> None:
    runtime, operator = stack
    store, recorder = runtime.ctx.store, runtime.services["lineage"].handlers
    dlq = await runtime.ctx.bus.nc.subscribe(runtime.ctx.bus.subjects.dlq("lineage"))
    prompt = await artifacts.register(operator, "prompt", "answer", {"template": "{question}"})
    arts = {"prompt/answer": prompt.hash}
    before = datetime.now(UTC)
    await artifacts.register_release(operator, "shop-v2", "shop", arts, description="the real one")
    s = operator.subjects

    # The bound release announced again as registered in 2020, under a new id, with another description.
    await operator.publish(s.release_registered, ReleaseRegistered(
        release="shop-v2", app="shop", artifacts=arts, description="registered 2020 by the compliance team",
        time=LONG_AGO))
    # A name never bound, announced as of 2020: not bound, its letter says why.
    await operator.publish(s.release_registered, ReleaseRegistered(
        release="shop-legacy", app="shop", artifacts=arts, time=LONG_AGO))
    letter = Codec(DeadLetter).decode((await dlq.next_msg(timeout=20)).data)
    assert letter.reason == "rejected" and "release 'shop-legacy' announced but not bound is refused" in letter.error
    assert "from the recorder's clock" in letter.error, letter.error
    # Announced now, but naming an artifact nobody registered, or a parent never bound: refused as `release create`
    # refuses them.
    await operator.publish(s.release_registered, ReleaseRegistered(
        release="shop-typo", app="shop", artifacts={"prompt/answer": "sha256:" + "0" * 64}))
    letter = Codec(DeadLetter).decode((await dlq.next_msg(timeout=20)).data)
    assert "is not registered: register it first" in letter.error, letter.error
    await operator.publish(s.release_registered, ReleaseRegistered(
        release="shop-orphan", app="shop", artifacts=arts, parent="shop-nowhere"))
    letter = Codec(DeadLetter).decode((await dlq.next_msg(timeout=20)).data)
    assert "parent release 'shop-nowhere' of 'shop-orphan' is not registered" in letter.error, letter.error
    for name in ("shop-legacy", "shop-typo", "shop-orphan"):
        with pytest.raises(NotFound):
            await artifacts.release_of(operator, name)

    # A first sighting announced now is bound by the recorder, at the time it binds it.
    await operator.publish(s.release_registered, ReleaseRegistered(
        release="shop-v3", app="shop", artifacts=arts, parent="shop-v2", time=datetime.now(UTC) - timedelta(minutes=5)))
    await recorder.processed.wait_for(3, timeout_s=30)  # shop-v2 twice, shop-v3
    await eventually(lambda: store.scalar("SELECT count() FROM lineage_edges WHERE dst = 'shop-v3'") == 1,
                     [runtime.services["sink"].handlers.progress("lineage_edges")], what="shop-v3's edges stored")
    await eventually(lambda: store.scalar("SELECT count() FROM releases WHERE release = 'shop-v3'") == 1,
                     [runtime.services["sink"].handlers.progress("releases")], what="shop-v3's row stored")

    rows = store.rows("SELECT release, description, time FROM releases ORDER BY release")
    assert [(r["release"], r["description"]) for r in rows] == [("shop-v2", "the real one"), ("shop-v3", "")]
    # Each at its binding's time, never the announcement's.
    assert all(r["time"].replace(tzinfo=UTC) >= before - timedelta(seconds=1) for r in rows), rows
    assert store.scalar("SELECT count() FROM lineage_edges WHERE time < {t:DateTime64(6, 'UTC')}",
                        {"t": before.replace(tzinfo=None) - timedelta(seconds=1)}) == 0

    # As of 2021, nothing of it existed; now, shop-v2 uses its prompt, once.
    then = await run_cli_json(runtime, "lineage", "shop-v2", "--at", "2021-01-01T00:00:00Z")
    assert then["upstream"] == [] and then["downstream"] == []
    now = await run_cli_json(runtime, "lineage", "shop-v2")
    assert _uses(now) == {prompt.hash}
    assert [e["dst"] for e in now["downstream"] if e["relation"] == "parent_of"] == ["shop-v3"]
    assert store.scalar("SELECT count() FROM lineage_edges WHERE src = 'shop-v2' AND relation = 'uses'") == 1


async def test_a_release_bound_straight_in_the_bucket_shows_its_lineage_once_gated(
        stack: tuple[Runtime, Bus]) -> None:
    runtime, operator = stack
    store, sink = runtime.ctx.store, runtime.services["sink"].handlers
    config = await artifacts.register(operator, "model_config", "ghost-config", {"model": "m", "endpoint": "default"})
    prompt = await artifacts.register(operator, "prompt", "ghost-prompt", {"template": "{question}"})
    arts = {"model_config/ghost-config": config.hash, "prompt/ghost-prompt": prompt.hash}
    kv = await operator.kv(operator.subjects.kv_releases)
    bundle = {"release": "ghost-r1", "app": "probe", "tenant": "default", "parent": "", "artifacts": arts}
    await kv.create("ghost-r1", canonical_json(bundle))  # bound, announced by nobody
    bound_at = datetime.now(UTC)

    # The gatekeeper decides from the binding (here as it announces a decision): the recorder meets the release.
    decision = GateDecided(release="ghost-r1", decision="PASS", eval_run="eval-ghost", rules=[])
    await runtime.ctx.bus.publish(runtime.ctx.bus.subjects.gate_decided(decision.release), decision)
    # Its uses edges and the decision's edge are facts of their own, stored in any order.
    await eventually(
        lambda: store.rows("SELECT countIf(relation = 'uses') AS uses, countIf(relation = 'decided') AS decided "
                           "FROM lineage_edges WHERE src = 'ghost-r1'") == [{"uses": 2, "decided": 1}],
        [sink.progress("lineage_edges")], what="ghost-r1's uses edges and its decision's edge stored")

    view = await run_cli_json(runtime, "lineage", "ghost-r1")
    assert view["kind"] == "release" and _uses(view) == set(arts.values())
    assert {e["dst"] for e in view["downstream"] if e["relation"] == "decided"} == {decision.id}
    by_config = await run_cli_json(runtime, "lineage", config.hash)
    assert "ghost-r1" in {e["src"] for e in by_config["downstream"]}
    await eventually(lambda: store.scalar("SELECT count() FROM releases WHERE release = 'ghost-r1'") == 1,
                     [sink.progress("releases")], what="ghost-r1's releases row")
    row = store.rows("SELECT app, artifacts, time FROM releases WHERE release = 'ghost-r1'")[0]
    assert (row["app"], row["artifacts"]) == ("probe", arts)
    assert abs(row["time"].replace(tzinfo=UTC) - bound_at) < timedelta(seconds=5)

    # Announced later (the same content): the same binding, so no second row.
    await artifacts.register_release(operator, "ghost-r1", "probe", arts)
    await artifacts.register_release(operator, "sentinel", "probe", arts)
    await eventually(lambda: store.scalar("SELECT count() FROM releases WHERE release = 'sentinel'") == 1,
                     [sink.progress("releases")], what="the sentinel's row")
    assert store.scalar("SELECT count() FROM releases WHERE release = 'ghost-r1'") == 1
