"""What survives a drift monitor restart: each deployment's windows as KV values. Pure, no I/O.

Per deployment, a Snapshot holds the reference and current rows and, appended since, the rollout's stable
and canary windows (`pair`) and the names of the categories they hold (`labels`). Text vectors are large,
so each text ring is a value of its own (TextRing: float16 vectors of the rows that have them, the newest
within TEXT_BYTES). Texts themselves are never stored. A snapshot made for other features, or text vectors
of another embedder, restore nothing of themselves: those windows refill from live traffic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgspec
import numpy as np

from lockgate.services.drift.features import CATEGORICAL, FEATURES, TEXTS
from lockgate.services.drift.windows import Pair, Ring, Windows

TEXT_PARTS = ("ref", "cur", "stable", "canary")  # the text reference, the current window, the rollout's two
# Raw bytes of one text ring's vectors at most: under NATS' default 1 MB message once base64-encoded in JSON.
TEXT_BYTES = 600_000
_CATEGORIES = [FEATURES.index(c) for c in CATEGORICAL]


class RingState(msgspec.Struct, frozen=True, kw_only=True):
    """A ring's rows, oldest first, as float64 bytes (NaN: not measured)."""

    values: bytes  # (n, len(FEATURES))
    times: bytes  # (n,)
    # (n,) float64: each row's unit (features.unit; NaN: its own). Empty: saved before units were kept, every row
    # its own unit (the tests count rows, as they did then, until the restored rows leave the window).
    units: bytes = b""


class PairState(msgspec.Struct, frozen=True, kw_only=True):
    """A rollout's stable and canary windows."""

    canary_release: str
    stable_release: str
    since_report: int
    due: bool
    stable: RingState
    canary: RingState
    stable_credit: int = -1  # windows.Pair's credits (-1: saved before they existed, the arms start level)
    canary_credit: int = -1


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A deployment's windows as stored in KV (oldest current row first); text vectors are TextRings."""

    deployment: str
    app: str
    tenant: str
    reference: list[list[float]]  # a value not measured (NaN) is -1 here, and its bit set in reference_nan
    current: list[list[float]]
    current_times: list[float]
    since_report: int
    pair: PairState | None = None
    labels: dict[str, str] = {}  # category code (an integer, as text) -> the category's name
    # When it was saved (Unix seconds; 0: before this was kept): windows are saved within seconds of their last
    # event, so a start over the per-tenant cap restores the most recently saved first (domain.restorable).
    saved: float = 0.0
    # Per row, bit j set: column j was not measured. Any float is a score an application may send, -1 too, so no
    # value stands for NaN (JSON has none); None: saved before these, when -1 did (restored as it was read then).
    reference_nan: list[int] | None = None
    current_nan: list[int] | None = None
    # When each reference row was observed (Unix seconds; None: saved before they were kept, restored as 0): a
    # now-versus-reference report names its reference's span, which the router and the gate check is all of the
    # promoted release's traffic.
    reference_times: list[float] | None = None


class Promotion(msgspec.Struct, frozen=True, kw_only=True):
    """The route a deployment's windows were last restarted for (stored beside its windows, as `<key>.promotion`):
    its stable release, when the router promoted it (0: not known), and from when (Unix seconds) its served events
    fill the windows. Only a route change naming another stable release or promotion restarts them again."""

    deployment: str
    release: str
    promoted_at: float = 0.0
    since: float = 0.0


class TextRing(msgspec.Struct, frozen=True, kw_only=True):
    """One ring's text vectors: `rows` are the positions (oldest first, of `n` rows) of the rows that have them."""

    embedder: str
    dim: int
    n: int
    rows: list[int]
    vectors: bytes  # float16 (len(rows), len(TEXTS), dim)


_BITS = 1 << np.arange(len(FEATURES), dtype=np.int64)


def _finite(rows_: np.ndarray) -> tuple[list[list[float]], list[int]]:
    """(the rows with -1 for NaN, as JSON has no NaN and older monitors read -1 as one; a NaN bitmask per row)."""
    nan = np.isnan(rows_)
    return np.where(nan, -1.0, rows_).tolist(), (nan @ _BITS).tolist()


def _from_json(values: list[list[float]], nan: list[int] | None) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1, len(FEATURES))
    if nan is None:  # saved before the bitmask: -1 was NaN
        return np.where(a == -1.0, math.nan, a)
    bits = np.asarray(nan, dtype=np.int64)
    if bits.shape != a.shape[:1]:
        raise ValueError(f"{len(a)} rows but {len(bits)} NaN masks")
    return np.where((bits[:, None] & _BITS) != 0, math.nan, a)


def _ring_state(ring: Ring) -> RingState:
    values, times, _ = ring.ordered()
    return RingState(values=values.astype(np.float64).tobytes(), times=times.astype(np.float64).tobytes(),
                     units=ring.ordered_units().astype(np.float64).tobytes())


def _rows(state: RingState) -> tuple[np.ndarray, np.ndarray, None, np.ndarray | None]:
    """The state's rows, times, no text vectors and units (None: not saved); ValueError if its bytes do not hold
    whole rows of today's features."""
    values = np.frombuffer(state.values, dtype=np.float64).reshape(-1, len(FEATURES))
    times = np.frombuffer(state.times, dtype=np.float64)
    if len(times) != len(values):
        raise ValueError(f"{len(values)} rows but {len(times)} times")
    units = np.frombuffer(state.units, dtype=np.float64) if state.units else None
    if units is not None and len(units) != len(values):
        raise ValueError(f"{len(values)} rows but {len(units)} units")
    return values, times, None, units


def snapshot(deployment: str, w: Windows, pair: Pair | None = None, labels: Mapping[float, str] | None = None,
             saved: float = 0.0) -> Snapshot:
    """The windows (and the rollout's, if any) in a form that survives a restart, saved at `saved`."""
    cur_values, cur_times, _ = w.cur.ordered()
    rings = [w.ref.values[:w.ref.n], cur_values]
    state = None
    if pair is not None:
        state = PairState(canary_release=pair.canary_release, stable_release=pair.stable_release,
                          since_report=pair.since_report, due=pair.due, stable=_ring_state(pair.stable),
                          canary=_ring_state(pair.canary), stable_credit=pair.stable_credit,
                          canary_credit=pair.canary_credit)
        rings += [pair.stable.ordered()[0], pair.canary.ordered()[0]]
    codes = {float(c) for r in rings for c in np.unique(r[:, _CATEGORIES]) if c == c}
    names = {str(int(c)): labels[c] for c in codes if labels and c in labels}
    (reference, reference_nan), (current, current_nan) = _finite(w.ref.values[:w.ref.n]), _finite(cur_values)
    return Snapshot(deployment=deployment, app=w.app, tenant=w.tenant, reference=reference, current=current,
                    current_times=cur_times.tolist(), since_report=w.since_report, pair=state, labels=names,
                    saved=saved, reference_nan=reference_nan, current_nan=current_nan,
                    reference_times=w.ref.times[:w.ref.n].tolist())


def restore(s: Snapshot, reference_size: int, window_size: int, dim: int = 0) -> Windows:
    """Windows from a snapshot; if the configured sizes changed, the newest rows that fit are kept."""
    w = Windows(reference_size, window_size, dim, app=s.app, tenant=s.tenant)
    if any(len(row) != len(FEATURES) for row in (*s.reference[:1], *s.current[:1])):
        return w  # stored before the features changed: a fresh reference, never misaligned columns
    ref = _from_json(s.reference, s.reference_nan)[:reference_size]
    times = np.zeros(len(ref)) if s.reference_times is None else np.asarray(s.reference_times, dtype=np.float64)
    if len(times) < len(ref):
        raise ValueError(f"{len(ref)} reference rows but {len(times)} times")
    w.ref.fill(ref, times[:len(ref)], None)
    cur = _from_json(s.current, s.current_nan)
    w.cur.push(cur, np.asarray(s.current_times, dtype=np.float64), None)
    w.since_report = min(s.since_report, window_size - 1)
    return w


def restore_pair(s: Snapshot, window_size: int, dim: int = 0) -> Pair | None:
    """The rollout's windows from a snapshot (None if it has none); ValueError if they are unreadable."""
    if s.pair is None:
        return None
    p = Pair(window_size, dim, canary_release=s.pair.canary_release, stable_release=s.pair.stable_release,
             since_report=min(s.pair.since_report, window_size - 1), due=s.pair.due,
             stable_credit=s.pair.stable_credit, canary_credit=s.pair.canary_credit)
    p.stable = Ring.of(window_size, dim, *_rows(s.pair.stable))
    p.canary = Ring.of(window_size, dim, *_rows(s.pair.canary))
    return p


def labels(s: Snapshot) -> dict[float, str]:
    """The category names a snapshot keeps, by code."""
    return {float(int(k)): v for k, v in s.labels.items()}


def text_rings(w: Windows, pair: Pair | None, embedder: str) -> dict[str, TextRing]:
    """Each text ring's vectors (by TEXT_PARTS name), the newest rows within TEXT_BYTES."""
    rings = {"ref": w.text_ref, "cur": w.cur}
    if pair is not None:
        rings |= {"stable": pair.stable, "canary": pair.canary}
    out = {}
    for part, ring in rings.items():
        if not ring.dim:
            continue
        if ring.text is None:  # no text yet: saved empty all the same, so older vectors under its key go
            out[part] = TextRing(embedder=embedder, dim=ring.dim, n=ring.n, rows=[], vectors=b"")
            continue
        text = ring.ordered()[2]
        rows = np.flatnonzero(~np.isnan(text).all(axis=(1, 2)))
        rows = rows[len(rows) - TEXT_BYTES // (len(TEXTS) * ring.dim * 2):] if len(rows) else rows
        out[part] = TextRing(embedder=embedder, dim=ring.dim, n=ring.n, rows=rows.tolist(),
                             vectors=text[rows].astype(np.float16).tobytes())
    return out


def restore_text(part: str, t: TextRing, w: Windows, pair: Pair | None, embedder: str) -> bool:
    """Put a ring's saved vectors back (False if they are another embedder's, or for a ring that is gone);
    ValueError if they are unreadable."""
    if t.embedder != embedder or t.dim != w.dim or not t.dim:
        return False
    vectors = np.frombuffer(t.vectors, dtype=np.float16).astype(np.float64).reshape(len(t.rows), len(TEXTS), t.dim)
    rows = np.asarray(t.rows, dtype=np.int64)
    if part == "ref":
        n = min(t.n, w.reference_size)
        full = np.full((n, len(TEXTS), t.dim), math.nan)
        keep = rows < n
        full[rows[keep]] = vectors[keep]
        w.text_ref = Ring.of(w.reference_size, t.dim, np.full((n, len(FEATURES)), math.nan), np.zeros(n), full)
        return True
    ring = w.cur if part == "cur" else getattr(pair, part, None)
    if ring is None:
        return False
    rows = rows - (t.n - ring.n)  # a ring restored smaller keeps its newest rows
    keep = (rows >= 0) & (rows < ring.n)
    ring.put_text((ring.pos - ring.n + rows[keep]) % ring.size, vectors[keep])
    return True
