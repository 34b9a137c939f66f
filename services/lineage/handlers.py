"""NATS edge of the lineage recorder: decoded events in, the edges they imply out (stored by the sink)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from datetime import UTC, datetime

from lockgate import artifacts
from lockgate.bus import Delivery
from lockgate.contracts import LineageRun, ReleaseRegistered
from lockgate.errors import BusUnavailable, InvalidEvent
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.lineage import bindings, domain
from lockgate.services.lineage.live_handler import LiveLineage

log = logging.getLogger("lockgate.lineage")
RECORDED_CAPACITY = 10_000  # releases whose bindings this process recorded lately: spares their reads


class LineageHandlers:
    """One handler for every lineage-bearing event. Artifacts and runs are stored by the sink from their own
    events; this recorder adds what only it knows: the graph's edges, and each release as its binding has it."""

    def __init__(self, ctx: ServiceContext, live: LiveLineage | None = None) -> None:
        self.ctx = ctx
        self.live = live  # live OpenLineage, when an endpoint is configured
        self.processed = Progress()  # events handled; tests await it instead of sleeping
        self._recorded: OrderedDict[str, None] = OrderedDict()

    async def on_event(self, event: domain.LineageEvent, delivery: Delivery) -> None:
        """Publish the edges the event implies (the fact's id derives from the event's, so JetStream and
        the sink drop a republished copy)."""
        bus = self.ctx.bus
        if isinstance(event, ReleaseRegistered):
            event = await self._bind(event)
        else:
            # A release bound straight in the bucket is announced by nobody, yet evaluated, gated and served by
            # its binding: recorded when an event names it, so the lineage of what was gated shows what it holds.
            for release in domain.releases_named(event):
                await self._record_bound(release)
        fact = domain.edges_fact(event)
        if fact is not None:
            await bus.publish(bus.subjects.lineage_edges, fact)
        if self.live is not None and not isinstance(event, LineageRun):
            self.live.on_event(event)  # queued: never waits on the lineage endpoint
        await self.processed.bump()

    async def _bind(self, event: ReleaseRegistered) -> ReleaseRegistered:
        """Bind the announced release (or find it bound to the same content) and publish it as bound: its id,
        time and content the binding's, never the announcement's claims. Returns what was recorded."""
        bus = self.ctx.bus
        if await bindings.bound(bus, event.release) is None:
            # A first sighting: no `register_release` bound it, so nothing checked it. The recorder binds it
            # only as `release create` would, and at no time but its own.
            why = domain.claim_problem(event.time, datetime.now(UTC))
            if why is not None:
                raise InvalidEvent(f"release {event.release!r} announced but not bound is refused: {why}")
            await artifacts.check_references(bus, event.artifacts)
            await artifacts.check_parent(bus, event.release, event.parent)
        # The name -> bundle binding (create-only KV) is the authority: an announcement that rebinds a name is
        # refused (ReleaseConflict, dead-lettered), so neither its row nor its edges land.
        await artifacts.bind_release(bus, artifacts.release_bundle(
            event.release, event.app, event.artifacts, parent=event.parent, tenant=event.tenant))
        found = await bindings.bound(bus, event.release)
        if found is None:  # bound a moment ago: a read that misses it is the bus's failure, so try again
            raise BusUnavailable(f"release {event.release!r} is bound but its binding cannot be read back")
        bundle, at = found
        recorded = domain.bound_release(bundle, at, description=event.description, trace_id=event.trace_id,
                                        span_id=event.span_id)
        # The sink stores `releases` from this fact alone, one row per id: a repeat is dropped.
        await bus.publish(bus.subjects.release_bound, recorded)
        self._remember(event.release)
        return recorded

    async def _record_bound(self, release: str) -> None:
        """Record the binding of a release an event names (nothing if it is not bound)."""
        if release in self._recorded:
            return
        bus = self.ctx.bus
        found = await bindings.bound(bus, release)
        if found is None:
            return
        try:
            recorded = domain.bound_release(*found)
        except InvalidEvent as exc:
            # The event's own edges still land; only the unreadable binding is not recorded.
            log.warning("release %r is not recorded: %s", release, exc.message)
            return
        await bus.publish(bus.subjects.release_bound, recorded)
        fact = domain.edges_fact(recorded)
        if fact is not None:
            await bus.publish(bus.subjects.lineage_edges, fact)
        if self.live is not None:
            self.live.on_event(recorded)
        self._remember(release)

    def _remember(self, release: str) -> None:
        self._recorded[release] = None
        self._recorded.move_to_end(release)
        while len(self._recorded) > RECORDED_CAPACITY:
            self._recorded.popitem(last=False)
