"""The online judge's budgets in NATS KV, shared by every evaluator replica: reserve before a call, settle after.

Each deployment's judge has one ledger per UTC day (judgeledger.py) in the budget bucket (`kv_budgets`, under
keys `_judge.<deployment>.<day>` that no gateway budget can take), changed by compare-and-set like the
router's budget counters (lockgate.kvcas). A store that does not answer refuses the call: the judge fails
closed (an error outcome, never a score and never an unbudgeted call).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from lockgate.kvcas import CasStore, KVUnavailable
from lockgate.onlineeval import JudgeSpec
from lockgate.services.evaluator import judgeledger
from lockgate.services.evaluator.judgeledger import Ledger, Refused

log = logging.getLogger("lockgate.evaluator")
STORE_TIMEOUT_S = 5.0
_ledger = msgspec.json.Decoder(Ledger)


@dataclass(frozen=True)
class Reservation:
    """What one call reserved, and in which ledger: settled once after the call."""

    key: str
    amount: int  # nano-USD


class JudgeBudget:
    """Every deployment's judge budget, as this evaluator replica reserves from and settles to it."""

    def __init__(self, bus: Any, *, wall: Callable[[], datetime] = lambda: datetime.now(UTC),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = CasStore(bus, bus.subjects.kv_budgets, timeout_s=STORE_TIMEOUT_S, clock=clock,
                              what="the judge budget store")
        self.wall = wall

    async def reserve(self, deployment: str, spec: JudgeSpec, need: int) -> Reservation | Refused:
        """Reserve `need` nano-USD and one call of this minute (waiting for the next minute when this one's calls
        are taken): the Reservation, or Refused when today's budget cannot cover it. KVUnavailable when the
        store does not answer."""
        while True:
            now = self.wall()
            key = judgeledger.key(deployment, now)
            refused = await self.store.update(
                key, lambda b: _ledger.decode(b or b"{}"),
                lambda state, t=now: judgeledger.reserve(state, need, spec.max_usd_per_day, spec.max_calls_per_minute, t),
                f"judge budget {key}")
            if refused is None:
                return Reservation(key, need)
            if not refused.wait_s:
                return refused
            await asyncio.sleep(refused.wait_s)  # pacing to the next minute, not synchronisation

    async def settle(self, reservation: Reservation, used: int) -> None:
        """Replace the reservation by the call's real cost; a store that does not answer keeps it spent."""
        try:
            await self.store.update(reservation.key, lambda b: _ledger.decode(b or b"{}"),
                                    lambda state: (judgeledger.settle(state, reservation.amount, used), None),
                                    f"judge budget {reservation.key}")
        except KVUnavailable as exc:  # the day's spend stays over-counted, never under
            log.warning("judge budget %s not settled (its reservation stays spent): %s", reservation.key, exc.message)
