"""Drift windows survive a restart: the monitor's working state (reference, current window, a rollout's stable
and canary windows, text vectors, category names) saved and restored gives the same next reports. Pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import numpy as np
import pytest

from lockgate.contracts import DriftReport, InferenceEvent
from lockgate.services.drift import snapshots, text
from lockgate.services.drift.domain import DriftMonitor

pytestmark = pytest.mark.timeout(30)


def _events(n: int, variant: str, *, words: int = 5, start: int = 0, finish: str = "stop") -> list[InferenceEvent]:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    release = "r2" if variant == "canary" else "r1"
    return [InferenceEvent(app="shop", deployment="d", variant=variant, release=release, model="m",
                           output_tokens=words + i % 3, input_tokens=40 + i % 5, latency_ms=100.0 + i % 7,
                           finish_reason=finish, prompt=f"question {i % 4}", response=" ".join(["word"] * words),
                           time=t0 + timedelta(seconds=start + i)) for i in range(n)]


def _arms(canary: list[InferenceEvent], stable: list[InferenceEvent]) -> list[InferenceEvent]:
    """Both arms' answers taking turns, over the same time (as a router serves them)."""
    return [e for pair in zip(canary, stable, strict=True) for e in pair]


def _monitor() -> DriftMonitor:
    return DriftMonitor(reference_size=40, window_size=40, psi_threshold=0.2, embedder=text.HASHING)


def _save_and_restore(live: DriftMonitor) -> DriftMonitor:
    """What the drift service does across a restart: encode, decode, restore into a fresh monitor."""
    fresh = _monitor()
    w, pair = live.windows["d"], live.pairs.get("d")
    snap = msgspec.json.decode(msgspec.json.encode(snapshots.snapshot("d", w, pair, live.labels_of("default"))),
                               type=snapshots.Snapshot)
    fresh.windows["d"] = restored = snapshots.restore(snap, 40, 40, fresh.dim)
    restored_pair = snapshots.restore_pair(snap, 40, fresh.dim)
    if restored_pair is not None:
        fresh.pairs["d"] = restored_pair
    fresh.learn("default", snapshots.labels(snap))
    for part, ring in snapshots.text_rings(w, pair, text.HASHING.name).items():
        ring = msgspec.json.decode(msgspec.json.encode(ring), type=snapshots.TextRing)
        assert snapshots.restore_text(part, ring, restored, restored_pair, text.HASHING.name)
    return fresh


def _by(reports: list[DriftReport], comparison: str) -> DriftReport:
    return next(r for r in reports if r.comparison == comparison)


def test_a_restored_monitor_reports_as_the_live_one_over_the_restored_windows() -> None:
    live = _monitor()
    live.observe_events(_events(40, "stable"))  # the reference
    # part of the canary's window, and of stable's of the same time
    live.observe_events(_arms(_events(25, "canary", words=15, start=40, finish="length"), _events(25, "stable", start=40)))
    restarted = _save_and_restore(live)
    # How far either arm may run ahead of the other (windows.Pair.admit) is restored too: stable has none left.
    assert (restarted.pairs["d"].stable_credit, restarted.pairs["d"].canary_credit) == (
        live.pairs["d"].stable_credit, live.pairs["d"].canary_credit) == (0, live.pairs["d"].lead)
    rest = _arms(_events(15, "canary", words=15, start=65, finish="length"), _events(15, "stable", start=65))
    a, b = live.observe_events(rest), restarted.observe_events(rest)
    for comparison in ("canary_vs_stable", "now_vs_reference"):
        want, got = _by(a, comparison), _by(b, comparison)
        assert [(f.feature, f.current_size, f.reference_size) for f in got.features] == \
            [(f.feature, f.current_size, f.reference_size) for f in want.features]
        assert [f.psi for f in got.features] == pytest.approx([f.psi for f in want.features])
        assert (got.window_start, got.window_end, got.release, got.reference_release) == (
            want.window_start, want.window_end, want.release, want.reference_release)
    pair = _by(b, "canary_vs_stable")
    sizes = {f.feature: f.current_size for f in pair.features}
    assert sizes["output_tokens"] == 40 and sizes["response_text"] == 40  # 25 rows from before the restart
    assert any(f.feature == "finish_reason:length" for f in pair.features)  # category names restored too
    texts = {f.feature: f for f in pair.features}["response_text"]
    assert texts.p_value == pytest.approx({f.feature: f for f in _by(a, "canary_vs_stable").features}[
        "response_text"].p_value, abs=0.02)  # float16 vectors: the same test, within rounding


def test_unreadable_or_foreign_snapshots_restore_nothing_of_themselves() -> None:
    live = _monitor()
    live.observe_events(_events(40, "stable") + _events(10, "canary", start=40))
    w, pair = live.windows["d"], live.pairs["d"]
    snap = snapshots.snapshot("d", w, pair, live.labels_of("default"))
    assert snap.pair is not None
    torn = msgspec.structs.replace(snap, pair=msgspec.structs.replace(
        snap.pair, canary=snapshots.RingState(values=b"\x00" * 12, times=b"")))
    with pytest.raises(ValueError):
        snapshots.restore_pair(torn, 40, text.HASHING.dim)
    rings = snapshots.text_rings(w, pair, text.HASHING.name)
    fresh = snapshots.restore(snap, 40, 40, 384)
    assert not snapshots.restore_text("cur", rings["cur"], fresh, None, "all-MiniLM-L6-v2")  # another embedder
    bad = msgspec.structs.replace(rings["cur"], vectors=b"\x01\x02\x03")
    with pytest.raises(ValueError):
        snapshots.restore_text("cur", bad, snapshots.restore(snap, 40, 40, text.HASHING.dim), None, text.HASHING.name)


def test_text_vectors_keep_the_newest_rows_within_the_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    live = _monitor()
    live.observe_events(_events(40, "stable"))
    row_bytes = 2 * text.HASHING.dim * 2
    monkeypatch.setattr(snapshots, "TEXT_BYTES", 10 * row_bytes)
    ring = snapshots.text_rings(live.windows["d"], None, text.HASHING.name)["ref"]
    assert ring.n == 40 and ring.rows == list(range(30, 40)) and len(ring.vectors) == 10 * row_bytes
    assert np.frombuffer(ring.vectors, dtype=np.float16).shape == (10 * 2 * text.HASHING.dim,)


def _scored(n: int, start: int = 0) -> list[InferenceEvent]:
    """Events whose application score `length` is -1.0, 1.0, or not sent, in turn."""
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    return [InferenceEvent(app="shop", deployment="d", output_tokens=10, time=t0 + timedelta(seconds=start + i),
                           scores={0: {"length": -1.0}, 1: {"length": 1.0}, 2: {}}[i % 3]) for i in range(n)]


def _column(values: np.ndarray) -> list[float | None]:
    from lockgate.services.drift.features import FEATURES

    return [None if np.isnan(v) else float(v) for v in values[:, FEATURES.index("score.length")]]


def test_a_score_of_minus_one_survives_a_restart_apart_from_a_score_not_sent() -> None:
    # Probe p61 F4: -1 stood for "not measured" in the saved rows, and any float is a score an application may send:
    # after a restart its -1.0 scores were gone from the reference (n 20 -> 10 with 1.0 and -1.0 in turn).
    live = _monitor()
    live.observe_events(_scored(40) + _scored(25, start=40))  # the reference, and part of the current window
    w = live.windows["d"]
    snap = msgspec.json.decode(msgspec.json.encode(snapshots.snapshot("d", w, None, live.labels_of("default"))),
                               type=snapshots.Snapshot)
    restored = snapshots.restore(snap, 40, 40, text.HASHING.dim)
    before_ref, before_cur = _column(w.ref.values[:w.ref.n]), _column(w.cur.ordered()[0])
    assert before_ref[:3] == [-1.0, 1.0, None] and len(before_cur) == 25
    assert (_column(restored.ref.values[:restored.ref.n]), _column(restored.cur.ordered()[0])) == (
        before_ref, before_cur)


def test_a_snapshot_saved_before_the_nan_masks_reads_minus_one_as_not_measured() -> None:
    live = _monitor()
    live.observe_events(_scored(40) + _scored(6, start=40))
    new = snapshots.snapshot("d", live.windows["d"])
    # As an older monitor wrote it: no masks (those fields absent from its JSON), -1 for NaN.
    doc = msgspec.json.decode(msgspec.json.encode(new))
    del doc["reference_nan"], doc["current_nan"]
    old = msgspec.json.decode(msgspec.json.encode(doc), type=snapshots.Snapshot)
    restored = snapshots.restore(old, 40, 40)
    assert _column(restored.ref.values[:restored.ref.n])[:3] == _column(restored.cur.ordered()[0])[:3] == [
        None, 1.0, None]
    # A mask that does not match its rows is unreadable (the drift service logs and ignores the snapshot).
    with pytest.raises(ValueError, match="rows but"):
        snapshots.restore(msgspec.structs.replace(new, current_nan=[0]), 40, 40)
