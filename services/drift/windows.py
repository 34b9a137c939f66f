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
    text: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.values = np.empty((self.size, len(FEATURES)))
        self.times = np.empty(self.size)
        self.text = np.full((self.size, len(TEXTS), self.dim), math.nan)

    def push(self, values: np.ndarray, times: np.ndarray, vectors: np.ndarray | None) -> None:
        """Append rows, overwriting the oldest."""
        values, times = values[-self.size:], times[-self.size:]
        k = len(values)
        slots = (self.pos + np.arange(k)) % self.size
        self.values[slots], self.times[slots] = values, times
        if self.dim:
            self.text[slots] = vectors[-self.size:] if vectors is not None else math.nan
        self.pos = (self.pos + k) % self.size
        self.n = min(self.n + k, self.size)

    def fill(self, values: np.ndarray, times: np.ndarray, vectors: np.ndarray | None) -> int:
        """Append rows until full; returns how many were taken."""
        k = min(self.size - self.n, len(values))
        self.push(values[:k], times[:k], None if vectors is None else vectors[:k])
        return k

    def ordered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Values, times and text vectors, oldest row first."""
        order = (self.pos - self.n + np.arange(self.n)) % self.size
        return self.values[order], self.times[order], self.text[order]

    @property
    def full(self) -> bool:
        return self.n >= self.size

    @classmethod
    def of(cls, size: int, dim: int, values: np.ndarray, times: np.ndarray, vectors: np.ndarray | None) -> Ring:
        """A ring holding these rows (oldest first; the newest `size` if there are more)."""
        ring = cls(size, dim)
        ring.push(values, times, vectors if dim else None)
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
    before the stable side held as many rows."""

    window_size: int
    dim: int = 0
    canary_release: str = ""
    stable_release: str = ""
    since_report: int = 0
    due: bool = False
    stable: Ring = field(init=False)
    canary: Ring = field(init=False)

    def __post_init__(self) -> None:
        self.stable = Ring(self.window_size, self.dim)
        self.canary = Ring(self.window_size, self.dim)

    def new_canary(self, release: str) -> None:
        """A different canary release: its window starts empty."""
        self.canary = Ring(self.window_size, self.dim)
        self.canary_release, self.since_report, self.due = release, 0, False
