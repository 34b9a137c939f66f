"""Live evidence for canary analysis: recent inference events per deployment and release. Pure, no I/O.

Every replica keeps its own copy, fed from the inference subjects (the router's own events and
the SDK's alike), so replicas see the same evidence and reach the same verdicts; the routes KV's
compare-and-set decides which replica's verdict is written.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from lockgate.contracts import InferenceEvent
from lockgate.services.router.analysis import VariantSample

# (unix time, failed, latency ms, ttft ms or 0, tokens, cost or -1 when unpriced)
_Row = tuple[float, bool, float, float, float, float]
MAX_ROWS = 50_000  # per deployment and release: enough for p99 on any step, bounded memory


class Evidence:
    """Recent rows per (deployment, release); `sample` summarises a window for `analysis.measure`."""

    def __init__(self, price: Callable[[InferenceEvent], float | None], max_rows: int = MAX_ROWS) -> None:
        self._price = price
        self._max = max_rows
        self._rows: dict[tuple[str, str], deque[_Row]] = {}

    def add(self, event: InferenceEvent, release: str | None = None) -> None:
        """Record one event under its release (or `release`, for events that name only a variant)."""
        key = (event.deployment or event.app, event.release if release is None else release)
        rows = self._rows.get(key)
        if rows is None:
            rows = self._rows[key] = deque(maxlen=self._max)
        cost = self._price(event)
        rows.append((event.time.timestamp(), event.status != "ok", event.latency_ms, event.ttft_ms,
                     float(event.input_tokens + event.output_tokens), -1.0 if cost is None else cost))

    def forget(self, deployment: str, keep: set[str]) -> None:
        """Drop a deployment's rows except for the releases in `keep`."""
        for key in [k for k in self._rows if k[0] == deployment and k[1] not in keep]:
            del self._rows[key]

    def sample(self, deployment: str, release: str, since: float) -> VariantSample:
        """What `release` served for `deployment` from `since` (unix seconds) on."""
        rows = [r for r in self._rows.get((deployment, release), ()) if r[0] >= since]
        if not rows:
            return VariantSample()
        return VariantSample(
            n=len(rows),
            errors=sum(1 for r in rows if r[1]),
            # Latency and tokens describe answers: a failed call's timing is the error's, not the model's.
            latency_ms=[r[2] for r in rows if not r[1]],
            ttft_ms=[r[3] for r in rows if not r[1] and r[3] > 0],
            tokens=[r[4] for r in rows if not r[1]],
            cost=[r[5] for r in rows if r[5] >= 0],
        )
