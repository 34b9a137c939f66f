"""The lineage recorder's live OpenLineage events name an eval run's inputs as `lineage export` does (probe p29
F1): by the key the release bound, and the dataset by the first registration of the release's tenant at or before
the run, never by another tenant's or a later one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiohttp import web

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.contracts import EvalCompleted
from tests.helpers import served, sink_stored

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def receiver() -> AsyncIterator[dict[str, Any]]:
    """A Marquez-like endpoint on loopback that keeps what it is sent and says when an eval run's COMPLETE came."""
    state: dict[str, Any] = {"got": [], "complete": asyncio.Event()}

    async def lineage(request: web.Request) -> web.Response:
        event = await request.json()
        state["got"].append(event)
        if event["eventType"] == "COMPLETE" and event["job"]["name"].startswith("eval/"):
            state["complete"].set()
        return web.Response(status=201)

    app = web.Application()
    app.router.add_post("/api/v1/lineage", lineage)
    async with served(app) as url:
        state["url"] = f"{url}/api/v1/lineage"
        yield state


@pytest.fixture
def settings(settings: Settings, receiver: dict[str, Any]) -> Settings:
    """The test's settings with live OpenLineage on, posting to the receiver."""
    return msgspec.structs.replace(settings, openlineage_url=receiver["url"])


async def test_live_events_name_inputs_as_bound_and_as_first_registered_by_the_releases_tenant(
        run_services: Any, bus: Bus, receiver: dict[str, Any]) -> None:
    svcs = await run_services("sink", "query", "lineage")
    cases = [{"id": "c1", "input": "q"}]
    await artifacts.register(bus, "dataset", "zz-their-cases", cases, tenant="other")
    data = await artifacts.register(bus, "dataset", "qa-cases", cases)
    suite = await artifacts.register(bus, "eval_suite", "qa", {"name": "qa", "dataset": data.hash})
    prompt = await artifacts.register(bus, "prompt", "answer-v1", {"template": "{{q}}"})
    await artifacts.register_release(bus, "shop-v1", "shop", {"prompt/answer": prompt.hash})
    await artifacts.register(bus, "dataset", "aa-renamed", cases)  # after the run below
    await sink_stored(svcs["sink"].handlers, artifacts=5, releases=1)

    await bus.publish(bus.subjects.eval_completed, EvalCompleted(
        run_id="run-1", release="shop-v1", suite=suite.hash, n_cases=1, metrics={"acc": 1.0},
        artifacts={"prompt/answer": prompt.hash}, time=suite.time))
    await asyncio.wait_for(receiver["complete"].wait(), 30)
    [done] = [e for e in receiver["got"] if e["eventType"] == "COMPLETE" and e["job"]["name"].startswith("eval/")]
    assert done["job"]["name"] == "eval/qa"
    assert {(d["name"], d["facets"]["version"]["datasetVersion"]) for d in done["inputs"]} == {
        ("eval_suite/qa", suite.hash), ("dataset/qa-cases", data.hash), ("prompt/answer", prompt.hash)}
