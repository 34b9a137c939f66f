"""The events stream cannot be filled by one identity, and the documents people publish there are bounded.

Before (probe p12), the stream refused publishes at its size (discard new) and kept what it held for 90 days: the
operator credential filled it with valid artifact registrations (1 MB labels), and every eval request, eval result
and gate decision after them was refused until they aged out. On a real nats-server with the users of `lockgate
nats-config` and the stream as lockgate declares it, scaled down; the sink and the CLI as they run."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import msgspec
import nats.js.errors
import pytest
from nats.js.api import DiscardPolicy

from lockgate import credentials
from lockgate.bus import Bus, topology
from lockgate.codec import encode
from lockgate.config import Settings
from lockgate.contracts import ArtifactRegistered, EvalCompleted, EvalRequested, GateDecided
from lockgate.store import Store
from lockgate.subjects import Subjects
from tests.helpers import recorder
from tests.integration.test_aliases import cli
from tests.integration.test_nats_auth import _bus, secured  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(90)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "gitops"

MAX_BYTES = 256 * 1024
# Within every bound of the contract (64 labels of 1,024 characters): about 70 kB a message.
LABELS = {f"l{i}": "x" * 1024 for i in range(64)}


async def _scale_down(admin: Bus) -> str:
    """The events stream as lockgate declares it (its discard policy included), holding MAX_BYTES."""
    name = admin.subjects.streams["events"].name
    config = next(cfg for cfg, _ in topology(admin.subjects, 1) if cfg.name == name)
    await admin.js.update_stream(config.evolve(max_bytes=MAX_BYTES))
    return name


async def test_an_operators_flood_leaves_eval_requests_results_and_decisions_accepted(secured) -> None:  # noqa: F811
    _, settings, admin = secured
    stream = await _scale_down(admin)
    operator = await _bus(settings, "operator")
    evaluator = await _bus(settings, "evaluator")
    gatekeeper = await _bus(settings, "gatekeeper")
    try:
        for i in range(12):  # 3 times the stream's size; before: BusUnavailable (maximum bytes exceeded) at the 4th
            await operator.publish(operator.subjects.artifact_registered, ArtifactRegistered(
                kind="dataset", name=f"filler-{i}", hash="sha256:" + f"{i:064x}", labels=LABELS))
        request = EvalRequested(run_id="run-1", release="shop-v2", suite="sha256:" + "1" * 64, endpoint="prov")
        await operator.publish(operator.subjects.eval_requested, request)
        await evaluator.publish(evaluator.subjects.eval_completed,
                                EvalCompleted(run_id="run-1", release="shop-v2", suite=request.suite))
        await gatekeeper.publish(gatekeeper.subjects.gate_decided("shop-v2"),
                                 GateDecided(release="shop-v2", decision="BLOCK", rules=[]))
        info = await admin.js.stream_info(stream, subjects_filter=f"{settings.prefix}.>")
        assert info.state.bytes <= MAX_BYTES  # the flood's oldest went, not what came after it
        subjects = info.state.subjects or {}
        for subject in (admin.subjects.eval_requested, admin.subjects.eval_completed,
                        admin.subjects.gate_decided("shop-v2")):
            assert subjects.get(subject) == 1, subjects
        assert 0 < subjects[admin.subjects.artifact_registered] < 12
        assert await admin.full_streams(every=True) == []  # nothing refuses publishes
    finally:
        for bus in (operator, evaluator, gatekeeper):
            await bus.close()


async def test_an_events_stream_made_before_is_changed_in_place_by_the_admin(secured) -> None:  # noqa: F811
    # A home made before: its events stream refuses at its size. A service may only name the difference; the admin's
    # `topology apply` (the embedded `lockgate up` at its next start) changes it, every message kept.
    _, settings, admin = secured
    stream = admin.subjects.streams["events"].name
    await admin.js.update_stream((await admin.js.stream_info(stream)).config.evolve(discard=DiscardPolicy.NEW))
    await admin.publish(admin.subjects.artifact_registered, ArtifactRegistered(
        kind="dataset", name="qa", hash="sha256:" + "1" * 64))
    sink = Bus(settings.nats_url, Subjects(settings.prefix), name="test-sink", update_topology=False,
               auth=credentials.for_identity(settings, "sink"))  # as a service declares: create only
    await sink.connect()
    try:
        assert [d for d in sink.topology_differs if d.startswith(stream)] == [f"{stream} (discard)"]
    finally:
        await sink.close()
    await admin.ensure_topology(update=True)
    info = await admin.js.stream_info(stream)
    assert (info.config.discard, info.state.messages) == (DiscardPolicy.OLD, 1)


async def test_a_registration_over_its_bounds_is_dead_lettered_with_the_reason_and_not_stored(
        run_services, bus: Bus, store: Store) -> None:
    # The probe's: one valid ArtifactRegistered with a 1 MB label (here 100 kB) was stored as an `artifacts` row and
    # kept by the stream. Sent as bytes, as any client of the bus may send it: the CLI no longer makes it.
    sink = (await run_services("sink"))["sink"].handlers
    good = ArtifactRegistered(kind="dataset", name="qa", hash="sha256:" + "1" * 64, labels={"team": "search"})
    big = msgspec.structs.asdict(ArtifactRegistered(kind="dataset", name="filler", hash="sha256:" + "0" * 64))
    big["labels"] = {"pad": "x" * 100_000}
    await bus.publish(bus.subjects.artifact_registered, encode({**big, "time": good.time.isoformat()}),
                      msg_id="filler")
    await bus.publish(bus.subjects.artifact_registered, good)
    await asyncio.wait_for(sink.dead_letters.wait_for(1), 20)
    await asyncio.wait_for(sink.progress("artifacts").wait_for(1), 20)
    assert [r["name"] for r in store.rows("SELECT name FROM artifacts")] == ["qa"]
    letter = store.rows("SELECT reason, error, subject FROM dead_letters")
    assert len(letter) == 1 and letter[0]["reason"] == "invalid event", letter
    assert "Expected `str` of length <= 1024 - at `$.labels[...]`" in letter[0]["error"]
    assert letter[0]["subject"] == bus.subjects.artifact_registered


async def test_apply_refuses_a_label_over_its_bound_before_publishing_its_registration(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    answer = repo / "prompts" / "answer.yaml"
    answer.write_text(answer.read_text().replace("name: gitshop-answer\n",
                                                 f"name: gitshop-answer\nlabels:\n  pad: {'x' * 2000}\n"))
    async with recorder(bus, settings):
        applied = await cli(settings, "apply", str(repo))
    assert applied.exit_code == 1 and "Traceback" not in applied.output, applied.output
    # Refused as an invalid document, before anything is applied (the folder's documents carry the bounds).
    assert applied.stderr.splitlines()[-1] == (
        "error: document prompts/answer.yaml is invalid: Expected `str` of length <= 1024 - at `$.labels[...]`"), \
        applied.stderr
    assert await _registered(bus) == []  # nothing published, for it or any other document


async def _registered(bus: Bus) -> list[str]:
    """The names of the artifact registrations the events stream holds."""
    stream, names, seq = bus.subjects.streams["events"].name, [], 1
    while True:
        try:
            msg = await bus.js.get_msg(stream, seq, subject=bus.subjects.artifact_registered, next=True)
        except nats.js.errors.NotFoundError:
            return names
        names.append(msgspec.json.decode(msg.data)["name"])
        seq = int(msg.seq) + 1
