"""The bus going away under load, on an embedded stack as `lockgate up` runs it: the supervisor
restarts nats-server, the SDK keeps its events and retries until the bus is back, and every event
the SDK saw acknowledged (and those it still held) is stored exactly once."""

from __future__ import annotations

import pytest

from lockgate import credentials
from lockgate.client import Client
from lockgate.config import Settings
from lockgate.server.runtime import Runtime

pytestmark = pytest.mark.timeout(120)


async def test_nats_server_killed_alone_is_restarted_and_no_event_is_lost(settings: Settings) -> None:
    # The gateway relays the SDK's events (the `app` user publishes on no stream's subject).
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink", "gateway"])
    await runtime.start()
    try:
        assert runtime.nats is not None and runtime.services is not None and runtime.ctx is not None
        s = runtime.settings
        app = credentials.for_identity(s, "app")
        sink = runtime.services["sink"].handlers
        async with Client(s.nats_url, prefix=s.prefix, app="shop", user=app.user, password=app.password,
                          batch_size=100, flush_interval_s=0.01) as client:
            for i in range(500):
                client.emit(session_id=f"before-{i}")
            await client.flush()
            assert client.sent == 500
            runtime.nats.kill()  # nats-server alone dies; the runtime's supervisor restarts it
            for i in range(500):  # emitted while the bus is away: buffered, retried, never dropped
                client.emit(session_id=f"during-{i}")
            await client.flush()
            assert (client.sent, client.failed, client.dropped) == (1000, 0, 0)
        assert runtime.nats.restarts == 1
        assert runtime.ctx.bus.state == "connected"
        # Rows, not events handled: a batch redelivered after the restart is handled (and skipped) again.
        await sink.rows.wait_for(1000, 60)
        store = runtime.ctx.store
        assert store is not None
        assert store.scalar("SELECT count() FROM inference_events") == 1000
        assert store.scalar("SELECT uniqExact(session_id) FROM inference_events") == 1000
    finally:
        await runtime.stop()


async def test_the_supervisor_stops_with_the_runtime(settings: Settings) -> None:
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink"])
    await runtime.start()
    server = runtime.nats
    await runtime.stop()
    # stop() awaited the supervisor to its end: the server it stopped stays stopped.
    assert server is not None and server.proc is not None and server.proc.poll() is not None
    assert server.restarts == 0
