"""NATS edge of the lineage recorder: decoded events in, the edges they imply out (stored by the sink)."""

from __future__ import annotations

from lockgate import artifacts
from lockgate.bus import Delivery
from lockgate.contracts import LineageRun, ReleaseRegistered
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.lineage import domain
from lockgate.services.lineage.live_handler import LiveLineage


class LineageHandlers:
    """One handler for every lineage-bearing event. Artifacts, releases and runs are stored by the sink
    from their own events; this recorder adds what only it knows: the graph's edges."""

    def __init__(self, ctx: ServiceContext, live: LiveLineage | None = None) -> None:
        self.ctx = ctx
        self.live = live  # live OpenLineage, when an endpoint is configured
        self.processed = Progress()  # events handled; tests await it instead of sleeping

    async def on_event(self, event: domain.LineageEvent, delivery: Delivery) -> None:
        """Publish the edges the event implies (the fact's id derives from the event's, so JetStream and
        the sink drop a republished copy)."""
        bus = self.ctx.bus
        if isinstance(event, ReleaseRegistered):
            # The name -> bundle binding (create-only KV) is the authority: an event that reached the
            # bus without `register_release` and rebinds a name is refused (ReleaseConflict,
            # dead-lettered), so neither its row nor its edges land; a first sighting binds the name here.
            await artifacts.bind_release(bus, artifacts.release_bundle(
                event.release, event.app, event.artifacts, parent=event.parent, tenant=event.tenant))
            # The sink stores `releases` from this fact alone (its id is the event's: a redelivery is dropped).
            await bus.publish(bus.subjects.release_bound, event)
        fact = domain.edges_fact(event)
        if fact is not None:
            await bus.publish(bus.subjects.lineage_edges, fact)
        if self.live is not None and not isinstance(event, LineageRun):
            self.live.on_event(event)  # queued: never waits on the lineage endpoint
        await self.processed.bump()
