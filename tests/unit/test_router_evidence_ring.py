"""The router's evidence ring: full, a new row evicts the oldest row of the API key holding the most rows, so one
key's flood cannot push the other callers' requests out of a look (probe p46 F1)."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime

import numpy as np
import pytest

from lockgate.contracts import InferenceEvent
from lockgate.services.router import analysis
from lockgate.services.router.evidence import MAX_ROWS, Evidence, _Ring

pytestmark = pytest.mark.timeout(120)

SPEC = analysis.AnalysisSpec(metrics=[analysis.MetricSpec(name="error_rate", max_increase=0.01)], min_sample=100,
                             failure_limit=0, alpha=0.1)
T0 = 1_700_000_000.0


def _event(release: str, key: str, kind: str, t: float) -> InferenceEvent:
    """A router event of `release` sent with `key`: answered (`ok`), failed by the release (`fail`), or refused by
    its upstream with a 400 (`refused`: no tokens billed, in client_error_rate only)."""
    status, error_type = {"ok": ("ok", ""), "fail": ("error", "upstream_error"), "refused": ("error", "400")}[kind]
    return InferenceEvent(id=uuid.uuid4().hex, time=datetime.fromtimestamp(t, UTC), tenant="acme", app="shop",
                          deployment="chat", release=release, source="router", status=status, error_type=error_type,
                          latency_ms=20.0, input_tokens=5, output_tokens=5 if kind == "ok" else 0, key_id=key)


@pytest.mark.parametrize("flood", ["ok", "refused"])
def test_one_keys_flood_past_the_ring_leaves_the_other_callers_failures_in_the_look(flood: str) -> None:
    # Probe p46 F1, at the real MAX_ROWS: 400 canary requests of the real callers' key, 20% failing, then 100,000
    # requests of another key of the tenant, half on each arm (good ones, or 400s its upstream refused). Before,
    # the ring overwrote its oldest rows whoever sent them, and the look judged the flood alone: SUCCESSFUL
    # (n=50000, errors=0, keys=['k-att']), a failing canary promoted.
    ev = Evidence(price=lambda e: None)
    t = T0
    for i in range(400):
        ev.add(_event("c1", "k-real", "fail" if i % 5 == 0 else "ok", t))
        ev.add(_event("s1", "k-real", "ok", t))
        t += 0.01
    for _ in range(MAX_ROWS):
        ev.add(_event("c1", "k-att", flood, t))
        ev.add(_event("s1", "k-att", flood, t))
        t += 0.0001
    canary, stable = ev.sample("chat", "c1", T0), ev.sample("chat", "s1", T0)
    assert set(canary.by_key) == {"k-real", "k-att"}
    real = canary.by_key["k-real"]
    assert (real.n, real.errors) == (400, 80)  # the real callers' rows are all kept
    assert canary.n + canary.refused == MAX_ROWS  # the flooding key churned its own rows
    m = analysis.measure(SPEC, canary, stable, look=1)
    r = m.metrics[0]  # on the real key's requests (all requests together, when the flood has no answers)
    assert m.verdict == "FAILED" and (r.name, r.verdict, r.canary_n) == ("error_rate", "FAILED", 400)
    assert analysis.describe(r).startswith("error_rate 0.2 > threshold 0.01 ")


def _held(ring: _Ring) -> dict[int, list[float]]:
    """Each key index's rows in the ring, by the sequence number the test stored as latency."""
    cols = ring.cols[:, :ring.n]
    return {int(k): sorted(cols[2, cols[-1] == k]) for k in np.unique(cols[-1])}


@pytest.mark.parametrize("seed", range(5))
def test_a_full_ring_evicts_the_oldest_row_of_the_key_holding_the_most(seed: int) -> None:
    """Property over random traffic of a few keys, one of them bursting: each new row of a full ring takes the
    place of the oldest row of a key holding the most rows (the sender's own when it holds as many), so every key
    keeps its newest rows, and one holding no more than another loses nothing to that other's rows."""
    rng = random.Random(seed)
    limit = rng.choice([7, 40, 64])
    ring = _Ring(limit)
    sent: dict[int, list[float]] = {}
    for seq in range(1500):
        key = 0 if rng.random() < 0.6 else rng.randrange(1, 5)  # key 0 floods
        before = {k: len(v) for k, v in _held(ring).items()}
        ring.add((T0 + seq, 0.0, float(seq), 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0, float(key)))
        sent.setdefault(key, []).append(float(seq))
        after = _held(ring)
        assert ring.n == min(seq + 1, limit)
        for k, rows in after.items():  # each key's newest rows, none older
            assert rows == sent[k][-len(rows):]
        if seq >= limit:  # full: one row evicted, of a key holding the most
            lost = [k for k in before if len(after.get(k, [])) < before[k] + (k == key)]
            most = max(before.values())
            assert len(lost) == 1 and before[lost[0]] == most
            assert lost[0] == key or before.get(key, 0) < most  # its own when it holds as many
