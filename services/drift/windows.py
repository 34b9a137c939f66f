"""The drift monitor's windows: rings of feature rows (and text vectors) per deployment and, during a rollout,
per variant. Pure data structures, no I/O (domain.py fills and compares them, snapshots.py saves them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lockgate.services.drift.features import FEATURES, TEXTS


@dataclass
class Ring:
    """The last `size` rows (a ring), or with `fill` the first `size` rows; texts as (size, 2, dim) vectors."""

    size: int
    dim: int = 0
    n: int = 0
    pos: int = 0
    values: np.ndarray = field(init=False)
    times: np.ndarray = field(init=False)
    # Each row's unit for the tests (features.unit: its user's code; NaN: the row is its own unit).
    units: np.ndarray = field(init=False)
    # The text vectors, float32, made when the first embedded text comes and grown as rows come (NaN: none):
    # allocated whole for every ring, (size, 2, dim) float64 was ~4 MB per deployment name an application's
    # events named, most of them never holding a text (probe p6). The statistics read float64 copies (`ordered`).
    text: np.ndarray | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.values = np.empty((self.size, len(FEATURES)))
        self.times = np.empty(self.size)
        self.units = np.full(self.size, math.nan)

    def _reserve(self, upto: int) -> None:
        """Room in the text vectors for slots below `upto`, doubling (a ring fills its slots in order until it wraps)."""
        have = 0 if self.text is None else len(self.text)
        if upto > have:
            grown = np.full((min(self.size, max(upto, 2 * have, 16)), len(TEXTS), self.dim), math.nan, np.float32)
            if self.text is not None:
                grown[:have] = self.text
            self.text = grown

    def put_text(self, slots: np.ndarray, vectors: np.ndarray | None) -> None:
        """Set the text vectors of these slots (None or NaN: no text); storage only once a text comes."""
        if not self.dim or not len(slots):
            return
        if vectors is not None and not np.isnan(vectors).all():
            self._reserve(int(slots.max()) + 1)
        if self.text is not None:
            inside = slots < len(self.text)
            self.text[slots[inside]] = math.nan if vectors is None else vectors[inside]

    def push(self, values: np.ndarray, times: np.ndarray, vectors: np.ndarray | None,
             units: np.ndarray | None = None) -> None:
        """Append rows (`units` None: each its own unit), overwriting the oldest."""
        values, times = values[-self.size:], times[-self.size:]
        k = len(values)
        slots = (self.pos + np.arange(k)) % self.size
        self.values[slots], self.times[slots] = values, times
        self.units[slots] = math.nan if units is None else units[-self.size:]
        self.put_text(slots, None if vectors is None else vectors[-self.size:])
        self.pos = (self.pos + k) % self.size
        self.n = min(self.n + k, self.size)

    def fill(self, values: np.ndarray, times: np.ndarray, vectors: np.ndarray | None) -> int:
        """Append rows until full; returns how many were taken."""
        k = min(self.size - self.n, len(values))
        self.push(values[:k], times[:k], None if vectors is None else vectors[:k])
        return k

    def ordered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Values, times and text vectors (float64), oldest row first."""
        order = (self.pos - self.n + np.arange(self.n)) % self.size
        text = np.full((self.n, len(TEXTS), self.dim), math.nan)
        if self.text is not None:
            inside = order < len(self.text)
            text[inside] = self.text[order[inside]]
        return self.values[order], self.times[order], text

    def ordered_units(self) -> np.ndarray:
        """Each row's unit, oldest row first (as `ordered`)."""
        return self.units[(self.pos - self.n + np.arange(self.n)) % self.size]

    @property
    def full(self) -> bool:
        return self.n >= self.size

    @classmethod
    def of(cls, size: int, dim: int, values: np.ndarray, times: np.ndarray, vectors: np.ndarray | None,
           units: np.ndarray | None = None) -> Ring:
        """A ring holding these rows (oldest first; the newest `size` if there are more)."""
        ring = cls(size, dim)
        ring.push(values, times, vectors if dim else None, units)
        return ring


@dataclass
class Windows:
    """One deployment's reference (filled once), current ring, and text reference (filled once)."""

    reference_size: int
    window_size: int
    dim: int = 0
    app: str = ""
    tenant: str = "default"
    since_report: int = 0
    ref: Ring = field(init=False)
    cur: Ring = field(init=False)
    text_ref: Ring = field(init=False)

    def __post_init__(self) -> None:
        self.ref = Ring(self.reference_size)
        self.text_ref = Ring(self.reference_size, self.dim)
        self.cur = Ring(self.window_size, self.dim)

    @property
    def ref_n(self) -> int:
        return self.ref.n


@dataclass
class Pair:
    """A deployment's stable and canary windows during a rollout; `due` once the canary filled a window
    before the stable side held as many rows, or while the two do not cover the same time (domain.same_time).

    Both windows hold rows of the same time: a row enters its arm's window only on a credit that the other arm's
    rows earn it (one each, at most `lead` banked), so the busier arm keeps one row per row of the other, the one
    that came next. Without it, at 10% weight the canary's last `window_size` rows spanned nine times the time of
    stable's, and a change of what every client sends filled stable's window with new traffic while the canary's
    was mostly old: a healthy canary drifted against stable and was aborted."""

    window_size: int
    dim: int = 0
    canary_release: str = ""
    stable_release: str = ""
    since_report: int = 0
    due: bool = False
    stable_credit: int = -1  # -1: `lead` (the arms start level, either may run `lead` rows ahead)
    canary_credit: int = -1
    stable: Ring = field(init=False)
    canary: Ring = field(init=False)

    def __post_init__(self) -> None:
        self.stable = Ring(self.window_size, self.dim)
        self.canary = Ring(self.window_size, self.dim)
        self.stable_credit = self.lead if self.stable_credit < 0 else min(self.stable_credit, self.lead)
        self.canary_credit = self.lead if self.canary_credit < 0 else min(self.canary_credit, self.lead)

    @property
    def lead(self) -> int:
        """Credits an arm banks at most: how far (in rows) one arm's window may run ahead of the other's, enough
        for rows of either arm that come in runs (one router replica's batch, then another's; a canary's retried
        failures, up to three events for one request). A tenth of a window, but 16 rows where that is fewer (at most
        half a window): a window of 50 banked 5, dropped the canary's runs of failures, and a rollout test's canary,
        whose breaker then opened, never filled a window."""
        return max(1, self.window_size // 10, min(16, self.window_size // 2))

    def admit(self, canary: np.ndarray) -> np.ndarray:
        """Which of these rows, in arrival order (`canary`: True for a canary's row, False for stable's), enter
        their arm's window."""
        keep = np.zeros(len(canary), dtype=bool)
        for i, is_canary in enumerate(canary.tolist()):
            if is_canary:
                keep[i] = self.canary_credit > 0
                self.canary_credit -= int(keep[i])
                self.stable_credit = min(self.lead, self.stable_credit + 1)
            else:
                keep[i] = self.stable_credit > 0
                self.stable_credit -= int(keep[i])
                self.canary_credit = min(self.lead, self.canary_credit + 1)
        return keep

    def new_canary(self, release: str) -> None:
        """A different canary release: its window starts empty (stable's is refilled at its pace; the credits
        stand, as the arms' rows came)."""
        self.canary = Ring(self.window_size, self.dim)
        self.canary_release, self.since_report, self.due = release, 0, False
