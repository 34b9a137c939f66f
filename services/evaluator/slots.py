"""Run slots of the evaluator shared between tenants: one tenant's runs never take every slot."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

from lockgate.bus import Delivery, Handler
from lockgate.contracts import EvalRequested
from lockgate.errors import LockgateError
from lockgate.services.evaluator.handlers import EvaluatorStopping, heartbeat


class SlotsClosed(LockgateError):
    """The evaluator is stopping: a request still waiting for a slot is not started."""


class FairSlots:
    """`slots` runs at once, at most `per_tenant` of them one tenant's. A freed slot goes to the waiting tenant
    running the fewest, then to the one waiting longest; one tenant's waiters start in arrival order."""

    def __init__(self, slots: int, per_tenant: int) -> None:
        self.slots = max(1, slots)
        self.per_tenant = max(1, min(per_tenant, self.slots))
        self.running: Counter[str] = Counter()
        self._waiting: dict[int, tuple[str, asyncio.Future[None]]] = {}  # insertion order: arrival order
        self._order = itertools.count()
        self._closed = False

    @property
    def busy(self) -> int:
        """Slots taken."""
        return sum(self.running.values())

    def request(self, tenant: str) -> asyncio.Future[None]:
        """A future done once `tenant` holds a slot (at once when one is free); cancelling it stops the wait."""
        if self._closed:
            raise SlotsClosed("the evaluator is stopping")
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[next(self._order)] = (tenant, granted)
        self._grant()
        return granted

    async def acquire(self, tenant: str) -> None:
        """Wait for a slot of `tenant`'s (raises SlotsClosed once closed)."""
        granted = self.request(tenant)
        try:
            await granted
        except asyncio.CancelledError:
            # Granted in the same turn as the cancellation: the slot was counted, so give it back.
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                self.release(tenant)
            raise

    def release(self, tenant: str) -> None:
        """Give back a slot `acquire(tenant)` took."""
        self.running[tenant] -= 1
        if self.running[tenant] <= 0:
            del self.running[tenant]
        self._grant()

    def close(self) -> None:
        """Refuse new waiters and wake every waiting one with SlotsClosed; running ones keep their slot."""
        self._closed = True
        for _, granted in self._waiting.values():
            if not granted.done():
                granted.set_exception(SlotsClosed("the evaluator is stopping"))
        self._waiting.clear()

    def _grant(self) -> None:
        for ticket in [k for k, (_, f) in self._waiting.items() if f.done()]:  # cancelled: no longer waiting
            del self._waiting[ticket]
        while self.busy < self.slots:
            eligible = [(self.running[t], ticket) for ticket, (t, _) in self._waiting.items()
                        if self.running[t] < self.per_tenant]
            if not eligible:
                return
            _, ticket = min(eligible)
            tenant, granted = self._waiting.pop(ticket)
            self.running[tenant] += 1
            granted.set_result(None)


def shared_fairly(handler: Handler, slots: FairSlots, ack_wait_s: float) -> Handler:
    """`handler` run in a slot of the request's tenant; while it waits for one, the message is kept in flight
    (a heartbeat) without holding a slot, so a tenant at its share never stops another tenant's eval."""

    async def run(req: EvalRequested, delivery: Delivery) -> None:
        try:
            async with heartbeat(delivery, max(0.1, ack_wait_s / 3)):
                await slots.acquire(req.tenant)
        except SlotsClosed:
            raise EvaluatorStopping(f"evaluator is stopping; eval {req.run_id} will be redelivered") from None
        try:
            await handler(req, delivery)
        finally:
            slots.release(req.tenant)

    return run
