"""Pure drift monitoring: per-deployment reference and sliding current windows in numpy arrays.

Numeric features are compared by PSI over the reference's deciles and the KS test. Categorical ones
(finish reason, error type, model) are stored as codes (a hash of the value) and compared by PSI over
the categories and a chi-squared test; their FeatureDrift is named `feature:category` after the
category whose share moved most, with ks_stat/ks_pvalue holding the chi-squared statistic and p-value
and the means holding that category's share in the reference and current windows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
import numpy as np

from lockgate.contracts import DriftReport, FeatureDrift, InferenceEvent
from lockgate.services.drift import stats

NUMERIC = ("output_tokens", "latency_ms", "input_tokens")
CATEGORICAL = ("finish_reason", "error_type", "model")
FEATURES = NUMERIC + CATEGORICAL
_LABELS_MAX = 4096  # category names kept to name a drifting category (codes are what is stored)


def code(value: str) -> float:
    """A category's code: 48 bits of its hash (exact in a float64 column, stable across restarts)."""
    return float(int.from_bytes(hashlib.sha256(value.encode()).digest()[:6], "big"))


def deployment_of(event: InferenceEvent) -> str:
    """Events without a deployment are watched per app."""
    return event.deployment or event.app


def feature_matrix(events: Sequence[InferenceEvent],
                   labels: dict[float, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(n x len(FEATURES)) feature values and the n event times as epoch seconds; `labels` learns the
    names of the category codes."""
    rows = []
    for e in events:
        cats = (e.finish_reason, e.error_type, e.model)
        codes = tuple(code(c) for c in cats)
        if labels is not None and len(labels) < _LABELS_MAX:
            labels.update(zip(codes, cats, strict=True))
        rows.append((e.output_tokens, e.latency_ms, e.input_tokens, *codes))
    values = np.array(rows, dtype=np.float64)
    times = np.array([e.time.timestamp() for e in events], dtype=np.float64)
    return values.reshape(len(events), len(FEATURES)), times


@dataclass
class Windows:
    """One deployment's reference (filled once) and current ring buffer."""

    reference_size: int
    window_size: int
    app: str = ""
    tenant: str = "default"
    ref_n: int = 0
    cur_n: int = 0
    cur_pos: int = 0
    since_report: int = 0
    ref: np.ndarray = field(init=False)
    cur: np.ndarray = field(init=False)
    cur_times: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.ref = np.empty((self.reference_size, len(FEATURES)))
        self.cur = np.empty((self.window_size, len(FEATURES)))
        self.cur_times = np.empty(self.window_size)


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A deployment's windows as stored in KV (oldest current row first)."""

    deployment: str
    app: str
    tenant: str
    reference: list[list[float]]
    current: list[list[float]]
    current_times: list[float]
    since_report: int


def snapshot(deployment: str, w: Windows) -> Snapshot:
    """The windows in a form that survives a restart."""
    order = (w.cur_pos - w.cur_n + np.arange(w.cur_n)) % w.window_size
    return Snapshot(deployment=deployment, app=w.app, tenant=w.tenant, reference=w.ref[:w.ref_n].tolist(),
                    current=w.cur[order].tolist(), current_times=w.cur_times[order].tolist(),
                    since_report=w.since_report)


def restore(s: Snapshot, reference_size: int, window_size: int) -> Windows:
    """Windows from a snapshot; if the configured sizes changed, the newest rows that fit are kept."""
    w = Windows(reference_size, window_size, app=s.app, tenant=s.tenant)
    if any(len(row) != len(FEATURES) for row in (*s.reference[:1], *s.current[:1])):
        return w  # stored before the features changed: a fresh reference, never misaligned columns
    ref = np.asarray(s.reference, dtype=np.float64).reshape(-1, len(FEATURES))[:reference_size]
    w.ref[:len(ref)] = ref
    w.ref_n = len(ref)
    cur = np.asarray(s.current, dtype=np.float64).reshape(-1, len(FEATURES))[-window_size:]
    w.cur[:len(cur)] = cur
    w.cur_times[:len(cur)] = np.asarray(s.current_times, dtype=np.float64)[-window_size:]
    w.cur_n = len(cur)
    w.cur_pos = len(cur) % window_size
    w.since_report = min(s.since_report, window_size - 1)
    return w


class DriftMonitor:
    """Feeds events into per-deployment windows; returns a DriftReport every `window_size` events."""

    def __init__(self, reference_size: int, window_size: int, psi_threshold: float, bins: int = 10) -> None:
        self.reference_size = max(1, reference_size)
        self.window_size = max(1, window_size)
        self.psi_threshold = psi_threshold
        self.bins = bins
        self.windows: dict[str, Windows] = {}
        self.labels: dict[float, str] = {}  # category code -> value, to name drifting categories

    def reset(self, deployment: str) -> None:
        """Forget a deployment's windows (after a promotion the new traffic is the reference)."""
        self.windows.pop(deployment, None)

    def observe_events(self, events: Sequence[InferenceEvent]) -> list[DriftReport]:
        """Group a batch by deployment and observe each group."""
        groups: dict[str, list[InferenceEvent]] = {}
        for e in events:
            groups.setdefault(deployment_of(e), []).append(e)
        reports: list[DriftReport] = []
        for deployment, group in groups.items():
            values, times = feature_matrix(group, self.labels)
            last = group[-1]
            reports += self.observe(deployment, values, times, app=last.app, tenant=last.tenant)
        return reports

    def observe(self, deployment: str, values: np.ndarray, times: np.ndarray, *, app: str = "",
                tenant: str = "default") -> list[DriftReport]:
        """Append rows to the deployment's windows; one report per `window_size` rows past the reference."""
        w = self.windows.get(deployment)
        if w is None:
            w = self.windows[deployment] = Windows(self.reference_size, self.window_size)
        w.app, w.tenant = app or w.app, tenant
        n, i = len(values), 0
        if w.ref_n < w.reference_size:
            i = min(w.reference_size - w.ref_n, n)
            w.ref[w.ref_n:w.ref_n + i] = values[:i]
            w.ref_n += i
        reports: list[DriftReport] = []
        while i < n:
            # Copy in chunks that end exactly at the next report boundary.
            k = min(n - i, w.window_size - w.since_report)
            slots = (w.cur_pos + np.arange(k)) % w.window_size
            w.cur[slots] = values[i:i + k]
            w.cur_times[slots] = times[i:i + k]
            w.cur_pos = (w.cur_pos + k) % w.window_size
            w.cur_n = min(w.cur_n + k, w.window_size)
            w.since_report += k
            i += k
            if w.since_report >= w.window_size:
                w.since_report = 0
                reports.append(self.report(deployment, w))
        return reports

    def report(self, deployment: str, w: Windows) -> DriftReport:
        """Compare the current window with the reference, feature by feature."""
        ref, cur = w.ref[:w.ref_n], w.cur[:w.cur_n]
        features = []
        for j, name in enumerate(FEATURES):
            if name in CATEGORICAL:
                psi, chi2, p, top, share_ref, share_cur = stats.categorical(ref[:, j], cur[:, j])
                label = self.labels.get(top, f"#{int(top):x}")
                features.append(FeatureDrift(
                    feature=f"{name}:{label or '(none)'}", psi=psi, ks_stat=chi2, ks_pvalue=p,
                    reference_mean=share_ref, current_mean=share_cur, drifted=psi >= self.psi_threshold))
                continue
            psi = stats.psi(ref[:, j], cur[:, j], self.bins)
            ks_stat, ks_p = stats.ks(ref[:, j], cur[:, j])
            features.append(FeatureDrift(
                feature=name, psi=psi, ks_stat=ks_stat, ks_pvalue=ks_p,
                reference_mean=float(ref[:, j].mean()), current_mean=float(cur[:, j].mean()),
                drifted=psi >= self.psi_threshold,
            ))
        t = w.cur_times[:w.cur_n]
        return DriftReport(
            deployment=deployment, app=w.app, tenant=w.tenant, source="lockgate-drift",
            window_start=datetime.fromtimestamp(float(t.min()), UTC),
            window_end=datetime.fromtimestamp(float(t.max()), UTC),
            reference_n=int(w.ref_n), current_n=int(w.cur_n),
            features=features, drifted=any(f.drifted for f in features),
        )

