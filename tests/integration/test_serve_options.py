"""`lockgate serve SERVICE --nats URL`: the form README and deployments write, with the stack's URL after the
service (probe p30: `--nats` was only `lockgate`'s own option, and `serve drift --nats URL` exited 2)."""

from __future__ import annotations

import asyncio
import os

import pytest

from lockgate.config import Settings
from lockgate_dev.cluster import ServiceProcess

pytestmark = pytest.mark.timeout(120)


async def test_serve_takes_the_nats_url_after_the_service(settings: Settings) -> None:
    # No LOCKGATE_NATS_URL: the URL comes from the command line alone (the default, 4222, has no server here).
    env = {k: v for k, v in os.environ.items() if k != "LOCKGATE_NATS_URL"}
    env.update({"PYTHONUNBUFFERED": "1", "LOCKGATE_PREFIX": settings.prefix, "LOCKGATE_HOME": settings.home})
    drift = ServiceProcess("drift", ["serve", "drift", "--nats", settings.nats_url], env)
    try:
        drift.start()
        await asyncio.to_thread(drift.wait_ready, 60)
        assert await asyncio.to_thread(drift.stop) == 0
    finally:
        drift.kill()
