"""Start and stop a set of services on one bus (embedded: all; distributed: one).

Services are found through the `lockgate.services` entry points declared in pyproject.toml, so
the lockgate package never imports a service module directly and `lockgate serve router` loads
the router alone (not the evaluator's scipy or the sink's chDB).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points

from lockgate.errors import ConfigError
from lockgate.server.service import Service, ServiceContext

log = logging.getLogger("lockgate.services")

GROUP = "lockgate.services"

# The order services start in: the store's owners first, so facts published at start are persisted
# and reads at start are answered; the gateway and the OTLP receiver last, so they take calls once
# everything runs.
ORDER = ("sink", "query", "lineage", "evaluator", "gatekeeper", "router", "drift", "cost", "gateway", "otlp")


def available() -> list[str]:
    """Every registered service name, in start order."""
    names = {ep.name for ep in entry_points(group=GROUP)}
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def factory(name: str) -> Callable[[ServiceContext], Service]:
    """The `create(ctx)` function of one service."""
    found = entry_points(group=GROUP, name=name)
    if not found:
        raise ConfigError(f"unknown service {name!r}; choose from {', '.join(available())}")
    return next(iter(found)).load()


class ServiceSet:
    """Services sharing one bus: their consumers included before the bus starts, stopped in reverse."""

    def __init__(self, ctx: ServiceContext, names: list[str],
                 contexts: dict[str, ServiceContext] | None = None) -> None:
        self.ctx = ctx
        # With NATS auth each service has a context of its own, whose bus connects as that service.
        contexts = contexts or {}
        for c in (ctx, *contexts.values()):
            c.process_endpoints = lambda: self.endpoints
        self.services = [factory(n)(contexts.get(n, ctx)) for n in names]
        for svc in self.services:
            svc.ctx.bus.include(svc.consumers)

    def __getitem__(self, name: str) -> Service:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(name)

    async def start(self) -> None:
        """Start consumers, then each service's servers and tasks."""
        for bus in dict.fromkeys([self.ctx.bus, *(svc.ctx.bus for svc in self.services)]):
            await bus.start()
        for svc in self.services:
            await svc.start()

    async def stop(self) -> None:
        """Stop services (flushing their buffers) in reverse order; the bus is closed by its owner."""
        for svc in reversed(self.services):
            try:
                await svc.stop()
            except Exception:
                log.exception("stopping %s failed", svc.name)

    def problems(self) -> list[str]:
        """What keeps a service from its work though its bus is connected (Service.problems), each naming it."""
        return [f"{svc.name}: {problem}" for svc in self.services for problem in svc.problems()]

    @property
    def endpoints(self) -> dict[str, str]:
        """Every endpoint served, by name."""
        out: dict[str, str] = {}
        for svc in self.services:
            out.update(svc.endpoints)
        return out
