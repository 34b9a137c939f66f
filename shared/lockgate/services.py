"""Start and stop a set of services on one broker (embedded: all; distributed: one)."""

from __future__ import annotations

import importlib
import logging

from lockgate.errors import ConfigError
from lockgate.service import Service, ServiceContext

log = logging.getLogger("lockgate.services")

# Imported by name so the lockgate package never imports a service module directly.
REGISTRY: dict[str, str] = {
    "sink": "services.sink.app",
    "lineage": "services.lineage.app",
    "evaluator": "services.evaluator.app",
    "gatekeeper": "services.gatekeeper.app",
    "router": "services.router.app",
    "drift": "services.drift.app",
    "cost": "services.cost.app",
}


def build(name: str, ctx: ServiceContext) -> Service:
    """Instantiate one service by name."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown service {name!r}; choose from {', '.join(REGISTRY)}")
    module = importlib.import_module(REGISTRY[name])
    return module.create(ctx)


class ServiceSet:
    """Services sharing one bus: routers included before the broker starts, stopped in reverse."""

    def __init__(self, ctx: ServiceContext, names: list[str]) -> None:
        self.ctx = ctx
        self.services = [build(n, ctx) for n in names]
        for svc in self.services:
            ctx.bus.broker.include_router(svc.router)

    def __getitem__(self, name: str) -> Service:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(name)

    async def start(self) -> None:
        """Start consumers, then each service's servers and tasks."""
        await self.ctx.bus.start()
        for svc in self.services:
            await svc.start()

    async def stop(self) -> None:
        """Stop services (flushing their buffers) in reverse order; the bus is closed by its owner."""
        for svc in reversed(self.services):
            try:
                await svc.stop()
            except Exception:
                log.exception("stopping %s failed", svc.name)

    @property
    def endpoints(self) -> dict[str, str]:
        """Every endpoint served, by name."""
        out: dict[str, str] = {}
        for svc in self.services:
            out.update(svc.endpoints)
        return out
