"""Live OpenLineage turned on for a stack that already ran evals, against a real HTTP endpoint on loopback (a
stand-in for Marquez): every run the endpoint sees ends, and no event of a run is posted twice (probe p29 F7)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.contracts import EvalCompleted, EvalRequested, ReleaseRegistered
from lockgate.provenance.openlineage import run_uuid
from lockgate.server.registry import ServiceSet
from lockgate.server.service import ServiceContext
from lockgate.store import Store
from lockgate.subjects import Subjects
from lockgate.telemetry import Telemetry
from tests.helpers import sink_stored
from tests.integration.test_lineage_service import PROMPT, stored  # a hash whose content `stored` stores
from tests.integration.test_openlineage_transport import receiver
from tests.openlineage_spec import check

pytestmark = pytest.mark.timeout(90)
__all__ = ["receiver"]  # the loopback endpoint fixture, shared with the transport's tests

SUITE = "sha256:" + "5e" * 32


@asynccontextmanager
async def _stack(settings: Settings, store: Store) -> AsyncIterator[ServiceSet]:
    """The sink, the query service and the lineage recorder on a connection of their own (closed on exit, as
    a stopped stack's is)."""
    bus = Bus(settings.nats_url, Subjects(settings.prefix), name="stack")
    await bus.connect()
    svcs = ServiceSet(ServiceContext(bus=bus, store=store, telemetry=Telemetry(), settings=settings),
                      ["sink", "query", "lineage"])
    await svcs.start()
    try:
        yield svcs
    finally:
        await svcs.stop()
        await bus.close()


def _requested(run_id: str) -> EvalRequested:
    return EvalRequested(run_id=run_id, release="shop-v2", suite=SUITE, endpoint="http://sim/v1")


def _completed(run_id: str) -> EvalCompleted:
    return EvalCompleted(run_id=run_id, release="shop-v2", suite=SUITE, n_cases=3, metrics={"acc": 1.0})


async def test_turning_live_openlineage_on_posts_no_start_of_a_finished_run_and_each_event_once(
        bus: Bus, store: Store, settings: Settings, receiver: dict[str, Any]) -> None:
    s = bus.subjects
    # Before: the stack ran without an endpoint. Run "done" was requested and finished, "running" only requested.
    async with _stack(settings, store) as svcs:
        for event in (_requested("done"), _completed("done"), _requested("running")):
            await bus.publish(s.eval_requested if isinstance(event, EvalRequested) else s.eval_completed, event)
        await svcs["lineage"].handlers.processed.wait_for(1)  # "done"'s result passed the recorder
        await sink_stored(svcs["sink"].handlers, eval_runs=1)

    # Restarted with the endpoint: the new durable of requests replays the last hour. Then "running" finishes,
    # a new run starts and ends, and a release is announced twice (the repeat after JetStream's duplicate window).
    on = msgspec.structs.replace(settings, openlineage_url=receiver["url"])
    async with _stack(on, store) as svcs:
        live = svcs["lineage"].live
        assert live is not None
        await stored(bus, PROMPT)
        await artifacts.register_release(bus, "shop-v3", "shop", {"prompt/greet": PROMPT})
        await bus.publish(s.release_registered, ReleaseRegistered(release="shop-v3", app="shop",
                                                                  artifacts={"prompt/greet": PROMPT}))
        for event in (_completed("running"), _requested("new"), _completed("new")):
            await bus.publish(s.eval_requested if isinstance(event, EvalRequested) else s.eval_completed, event)
        # Replayed "done" and "running", the two results, "new", the release twice.
        await live.processed.wait_for(7)
        await live.transport.flush()
        posted = list(receiver["got"])

    runs: dict[str, list[str]] = {}
    for event in posted:
        check(event)
        runs.setdefault(event["run"]["runId"], []).append(event["eventType"])
    # Before the fix, "done" got a START and no end (an orphan run in Marquez), and the release two COMPLETEs.
    assert run_uuid("done") not in runs, runs
    assert runs[run_uuid("running")] == ["START", "COMPLETE"]
    assert runs[run_uuid("new")] == ["START", "COMPLETE"]
    releases = [e["run"]["runId"] for e in posted if e["job"]["name"].startswith("release/")]
    assert len(releases) == 1 and runs[releases[0]] == ["COMPLETE"], runs
    assert all(types.count(t) == 1 for types in runs.values() for t in types), runs
