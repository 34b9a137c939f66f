"""`lockgate status` reads backlog and dead letters straight from JetStream."""

from __future__ import annotations

import pytest

from lockgate.bus import Bus
from lockgate.cli.status import read_status as status
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
    assert {s["role"]: s["state"] for s in report["streams"]} == {r: "ok" for r in bus.subjects.streams}
