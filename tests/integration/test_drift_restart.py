"""Drift windows survive a drift monitor restart on the real nats-server: a monitor fed part of a rollout's
traffic is stopped cleanly, or killed without a stop after its last periodic snapshot, and a new one on the same
bus computes its next canary-versus-stable and now-versus-reference reports over the restored windows (the
sample sizes include the events from before the restart). A corrupt snapshot is logged and ignored."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.contracts import DriftReport, InferenceEvent
from lockgate.server.registry import ServiceSet
from lockgate.server.service import ServiceContext
from lockgate.subjects import token
from tests.integration.test_drift_service import restarted

pytestmark = pytest.mark.timeout(90)

_reports: Codec[DriftReport] = Codec(DriftReport)


def _events(n: int, variant: str, *, start: int, words: int = 5) -> list[InferenceEvent]:
    t0 = datetime.now(UTC)
    return [InferenceEvent(app="shop", deployment="chat", variant=variant, release="r2" if variant == "canary" else "r1",
                           model="m", output_tokens=words + i % 3, input_tokens=40 + i % 5, latency_ms=100.0 + i % 7,
                           prompt=f"question {i % 4}", response=" ".join(["answer"] * words),
                           time=t0 + timedelta(milliseconds=start + i)) for i in range(n)]


def arms(canary: list[InferenceEvent], stable: list[InferenceEvent]) -> list[InferenceEvent]:
    """Both arms' answers as a router serves them: taking turns, over the same time (the monitor compares a
    canary's window only with stable's of the same time)."""
    return [e for pair in zip(canary, stable, strict=True) for e in pair]


@pytest.mark.parametrize("ending", ["clean stop", "killed after a snapshot"])
async def test_the_next_report_after_a_restart_covers_the_events_from_before_it(
        context: ServiceContext, bus: Bus, settings, ending: str, caplog: pytest.LogCaptureFixture) -> None:
    window = settings.drift_window_size
    assert settings.drift_reference_size == window == 50  # the sizes below are those of the test settings
    sub = await bus.nc.subscribe(bus.subjects.drift("chat"))
    subject = bus.subjects.served("shop")  # as the router publishes what it served
    first = ServiceSet(context, ["drift"])
    await first.start()
    drift = first["drift"]
    drift.handlers.snapshot_s = 0.2
    await bus.publish(subject, _events(window, "stable", start=0))  # the reference
    # 30 of the canary's 50, and 30 of stable's of the same time
    await bus.publish(subject, arms(_events(30, "canary", start=100, words=15), _events(30, "stable", start=100)))
    await drift.handlers.events.wait_for(window + 60)
    before = _reports.decode((await sub.next_msg(timeout=15)).data)  # the first 50 rows past the reference
    assert before.comparison == "now_vs_reference"
    if ending == "clean stop":
        await first.stop()
    else:
        await drift.handlers.saved.wait_for(window + 60)  # a periodic snapshot covers them all
        for task in drift._tasks:  # no final save: the process is gone
            task.cancel()
    await bus.stop_consumers()
    kv = await bus.kv(bus.subjects.kv_drift)
    await kv.put(token("other"), b"{not a snapshot")  # corrupt: logged and ignored, never a crash
    await kv.put(f"{token('other')}.text.cur", b"\x00\x01")

    async with restarted(context, settings) as bus2:
        with caplog.at_level(logging.WARNING, logger="lockgate.drift"):
            # completes the canary's and stable's windows, and the second window past the reference
            await bus2.publish(subject, arms(_events(20, "canary", start=200, words=15),
                                             _events(20, "stable", start=200)))
            got: dict[str, DriftReport] = {}
            while len(got) < 2:
                report = _reports.decode((await sub.next_msg(timeout=15)).data)
                got[report.comparison] = report
        assert "ignoring unreadable drift windows" in caplog.text
        pair = got["canary_vs_stable"]
        sizes = {f.feature: (f.current_size, f.reference_size) for f in pair.features}
        assert (pair.current_n, pair.reference_n, pair.release, pair.reference_release) == (50, 50, "r2", "r1")
        assert sizes["output_tokens"] == (50, 50)  # 30 rows of either arm from before the restart, 20 after
        assert sizes["response_text"] == (50, 50)  # text vectors too
        out = {f.feature: f for f in pair.features}["output_tokens"]
        assert out.current_mean > 2.5 * out.reference_mean and out.drifted
        now = got["now_vs_reference"]
        assert (now.reference_n, now.current_n) == (50, 50)
        assert {f.feature: f.current_size for f in now.features}["response_text"] == 50
