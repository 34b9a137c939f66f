"""A workload change of every client during a 10% canary, on the real nats-server and chDB: the drift monitor compares
the canary's window with stable's of the same time, so a canary identical to stable never drifts, and the stored
report says both windows' times (stable's in `reference_window_start`/`_end`).

Found by a probe: a canary identical to stable was aborted within 3 s of every client starting to send
`max_tokens: 2`, because at 10% weight its window spanned nine times the time of stable's."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.contracts import DriftReport
from lockgate.services.query.drift import drift_reports
from lockgate.store import Store
from tests.helpers import sink_stored
from tests.unit.test_drift_same_time import _traffic

pytestmark = pytest.mark.timeout(90)

_reports: Codec[DriftReport] = Codec(DriftReport)


async def test_a_workload_change_during_a_10_percent_canary_is_no_drift_and_both_windows_times_are_stored(
        run_services: Any, bus: Bus, store: Store, settings: Any) -> None:
    window = settings.drift_window_size
    sub = await bus.nc.subscribe(bus.subjects.drift("d"))
    services = await run_services("sink", "drift")
    t0 = datetime.now(UTC) - timedelta(minutes=10)  # 0.1 s apart: the last some five minutes ago
    events = _traffic(3000, 0.1, shift_at=1000, t0=t0)  # some 300 canary answers: six canary windows
    for i in range(0, len(events), 60):  # as a router publishes what it served: batches of both arms
        await bus.publish(bus.subjects.served("shop"), events[i:i + 60])
    await services["drift"].handlers.events.wait_for(len(events), 30)
    reports: list[DriftReport] = []
    while services["drift"].handlers.reports.count > len(reports):
        reports.append(_reports.decode((await sub.next_msg(timeout=15)).data))
    pairs = [r for r in reports if r.comparison == "canary_vs_stable"]
    assert len(pairs) >= 4
    assert [r.window_start for r in pairs if r.drifted] == []
    shift = t0 + timedelta(seconds=100)
    assert any(r.window_start < shift < r.window_end for r in pairs)  # old and new traffic in both windows
    for r in pairs:
        assert (r.current_n, r.reference_n) == (window, window)
        assert r.reference_window_start is not None and r.reference_window_end is not None
        assert abs(r.reference_window_start - r.window_start) < (r.window_end - r.window_start) / 5

    await sink_stored(services["sink"].handlers, drift_reports=len(reports))
    stored = {s["id"]: s for s in await asyncio.to_thread(drift_reports, store, "d", 100)}
    def utc(t: datetime) -> datetime:  # the store reads its UTC columns back without a zone
        return t if t.tzinfo else t.replace(tzinfo=UTC)

    for r in pairs:
        row = stored[r.id]
        assert (utc(row["reference_window_start"]), utc(row["reference_window_end"]), utc(row["window_start"])) == (
            r.reference_window_start, r.reference_window_end, r.window_start)
    now = next(r for r in reports if r.comparison == "now_vs_reference")
    # A reference's span too: the router and the gate act after a promotion only on a reference begun after it.
    assert now.reference_window_start is not None and now.reference_window_start <= now.window_start
    assert utc(stored[now.id]["reference_window_start"]) == now.reference_window_start
