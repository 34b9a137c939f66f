"""Requests an open breaker diverted from a failing canary count as its failures from its first failed call of its
own on, by the events' times: a replica reading the served events back at its start reads them out of time order
(the stream's newest first, then the record's, live ones meanwhile) and must count what the live replicas did.
Through the real router in tests/integration/test_router_diverted_replay.py."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.server.service import ServiceContext
from lockgate.services.router.endpoints import Endpoints
from lockgate.services.router.rollouts import Rollouts
from lockgate.telemetry import Telemetry
from tests.unit.test_router_progress import _live

pytestmark = pytest.mark.timeout(30)


def _rollouts(tmp_path: Path) -> Rollouts:
    ctx = ServiceContext(bus=None, telemetry=Telemetry(), settings=Settings(home=str(tmp_path)))  # type: ignore[arg-type]
    rollouts = Rollouts(ctx, Endpoints(ctx.settings))
    rollouts.routes["d"] = _live()  # canary r2, stable r1, started at 100
    return rollouts


def _at(second: float) -> datetime:
    return datetime.fromtimestamp(second, UTC)


def _failed(second: float) -> InferenceEvent:  # a call of the canary's own that failed (a 500)
    return InferenceEvent(app="d", deployment="d", release="r2", variant="canary", status="error", error_type="500",
                          time=_at(second))


def _diverted(second: float) -> InferenceEvent:  # a canary request stable answered, the canary's breaker open
    return InferenceEvent(app="d", deployment="d", release="r1", variant="stable", time=_at(second), attributes={
        "lockgate.fallback_from_variant": "canary", "lockgate.fallback_from_release": "r2",
        "lockgate.fallback_reason": "breaker_open"})


def _canary(rollouts: Rollouts) -> tuple[int, int]:
    sample = rollouts.evidence.sample("d", "r2", 100.0)
    return sample.n, sample.errors


# A breaker left open by an earlier release diverts at 110-112 (not this canary's doing); the canary fails its own
# calls at 120-122, trips its breaker, and its requests are diverted at 123-142.
SERVED = [_diverted(s) for s in range(110, 113)] + [_failed(s) for s in range(120, 123)] + \
    [_diverted(s) for s in range(123, 143)]


def test_a_replica_reading_the_events_out_of_order_counts_the_diversions_the_live_one_did(tmp_path: Path) -> None:
    live = _rollouts(tmp_path)
    live.observe(SERVED)
    assert _canary(live) == (23, 23)  # its 3 failures and the 20 diversions after them
    # Read back at a start: the newest (still in the stream) first, then the rest (from the record). Before: the
    # diversions read before the canary's first failure were stable's successes only: (3, 3).
    restarted = _rollouts(tmp_path)
    restarted.observe(SERVED[10:])
    restarted.observe(SERVED[:10])
    assert _canary(restarted) == _canary(live)
    for seed in range(5):  # in any order, one at a time
        shuffled = _rollouts(tmp_path)
        events = SERVED[:]
        random.Random(seed).shuffle(events)
        for e in events:
            shuffled.observe([e])
        assert _canary(shuffled) == _canary(live), seed
    assert restarted.evidence.sample("d", "r1", 100.0).n == live.evidence.sample("d", "r1", 100.0).n == 23


def test_an_earlier_failure_read_later_counts_the_diversions_since_it(tmp_path: Path) -> None:
    rollouts = _rollouts(tmp_path)
    rollouts.observe([_diverted(s) for s in (105, 115, 125)] + [_failed(120)])
    assert _canary(rollouts) == (2, 2)  # the failure at 120 and the diversion at 125
    rollouts.observe([_failed(110)])  # read after, but failed before: the diversion at 115 follows it
    assert _canary(rollouts) == (4, 4)
    rollouts.observe([_diverted(130)])
    assert _canary(rollouts) == (5, 5)


def test_a_failure_before_the_rollout_started_does_not_count_its_diversions(tmp_path: Path) -> None:
    # Read back from before this rollout (the replay reads from the earliest rollout's start): the same release's
    # failure in an earlier rollout of it is none of this one's.
    rollouts = _rollouts(tmp_path)
    rollouts.observe([_failed(90), _diverted(110)])
    assert _canary(rollouts) == (0, 0)
    rollouts.observe([InferenceEvent(app="d", deployment="d", release="r2", variant="canary", status="error",
                                     error_type="client_disconnected", time=_at(105))])  # its client's doing
    assert _canary(rollouts) == (0, 0)
    rollouts.observe([_failed(108)])
    assert _canary(rollouts) == (2, 2)


def test_a_new_rollout_forgets_the_diversions_held(tmp_path: Path) -> None:
    rollouts = _rollouts(tmp_path)
    rollouts.observe([_diverted(110)])
    rollouts.evidence.forget("d", keep={"r1"})  # as a new rollout of another canary does
    rollouts.observe([_failed(105)])
    assert _canary(rollouts) == (1, 1)  # the failure only
