"""The sunsets' timers, without a bus: which releases a sunset binds, a timer armed later for a sooner time replacing
one armed earlier (never the reverse), and nothing armed once closed."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from lockgate.contracts import GateDecided
from lockgate.services.gatekeeper.sunsets import Sunsets

OLD = "sha256:" + "a" * 64
NEW = "sha256:" + "b" * 64


def _decision(release: str, decision: str, config: str) -> GateDecided:
    return GateDecided(release=release, decision=decision, rules=[],  # type: ignore[arg-type]
                       artifacts={"model_config/c": config, "eval_suite": OLD})


def _sunsets() -> Sunsets:
    return Sunsets(cast(Any, None), cast(Any, None), cast(Any, None), cast(Any, None), cast(Any, None))


def test_a_sunset_binds_the_releases_whose_decision_admits_or_may_over_its_artifact() -> None:
    listed = [_decision("pass", "PASS", OLD), _decision("review", "NEEDS_REVIEW", OLD),
              _decision("block", "BLOCK", OLD), _decision("other", "PASS", NEW), _decision("pass", "PASS", OLD)]
    # The suite's hash under the bare key `eval_suite` is no release artifact: "other" does not bind OLD through it.
    assert Sunsets._binding(OLD, listed) == ["pass", "review"]


async def test_the_sooner_of_two_timers_stays_and_a_closed_one_arms_nothing() -> None:
    sunsets = _sunsets()
    now = asyncio.get_running_loop().time()
    sunsets._arm(OLD, 3600)
    sunsets._arm(OLD, 60)  # a sooner one (a retry, a sunset moved earlier) replaces it
    sunsets._arm(OLD, 7200)  # a later one read before it never does: the sooner one reads the sunset again
    (at, timer), = sunsets._timers.values()
    assert now + 60 <= at < now + 3600 and not timer.cancelled()
    sunsets.close()
    assert timer.cancelled()
    sunsets._arm(NEW, 0)  # a pass failing while the service stops
    assert sunsets._timers == {}
