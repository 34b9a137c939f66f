"""The drift monitor's memory is bounded whatever an application sends, on the embedded runtime as `lockgate up`
runs it: an application's own NATS user (the official SDK) sends events naming made-up deployments; the monitor keeps
at most `drift_max_windows` window sets of the tenant, evicting the least recently seen application windows (their
KV snapshots too), never a served deployment's; and a start restores only what the cap holds.

Found by probe p6: an unscoped app key (and an application's NATS user alike) sent one event per made-up deployment
name; each name kept a window set of ~4 MB (text rings allocated whole), never evicted, saved to KV `lg_drift` and
restored at the next start: 100 events = +405 MB, 5,000 took the embedded stack past 11 GB."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from lockgate.cli.main import cli
from lockgate.client import Client
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.server.runtime import Runtime
from lockgate.services.drift.domain import window_key, windows_of
from lockgate.subjects import token

pytestmark = pytest.mark.timeout(120)

CAP = 6
SERVICES = ["sink", "gateway", "drift", "gatekeeper"]  # the gatekeeper chains the credential's audit entry


async def _credential(runtime: Runtime) -> dict[str, str]:
    """`lockgate app-credential create --tenant acme --app shop`: the user's secret."""
    s = runtime.settings
    env = {"LOCKGATE_HOME": s.home, "LOCKGATE_NATS_URL": s.nats_url, "LOCKGATE_PREFIX": s.prefix, "LOCKGATE_ROLE": ""}
    made = await asyncio.to_thread(CliRunner().invoke, cli, ["app-credential", "create", "--tenant", "acme", "--app",
                                                             "shop", "--json"], env=env, catch_exceptions=False)
    assert made.exit_code == 0, made.output
    return json.loads(await asyncio.to_thread(Path(json.loads(made.output)["file"]).read_text))


def _served(n: int) -> list[InferenceEvent]:
    """Answers the router served for acme's deployment `chat`."""
    t0 = datetime.now(UTC)
    return [InferenceEvent(app="shop", tenant="acme", deployment="chat", variant="stable", release="shop-v1",
                           model="sim", output_tokens=5, input_tokens=8, latency_ms=20.0, prompt="hello",
                           response="hi there", time=t0 + timedelta(milliseconds=i)) for i in range(n)]


async def _send(runtime: Runtime, secret: dict[str, str], names: list[str]) -> None:
    """One event per deployment name, as probe p6 sent them, on the application's own subject."""
    async with Client(runtime.settings.nats_url, prefix=runtime.settings.prefix, tenant="acme", app="shop",
                      user=secret["user"], password=secret["password"]) as client:
        for name in names:
            client.emit(deployment=name, release="shop-v1", model="sim", status="ok", input_tokens=8, output_tokens=1,
                        latency_ms=5.0, prompt=f"question about {name}", response="an answer")
        await client.flush()
        assert client.sent == len(names)


def _acme(runtime: Runtime) -> dict[str, bool]:
    """acme's window sets in the monitor: deployment -> served."""
    m = runtime.services["drift"].handlers.monitor
    return {windows_of(k)[1]: windows_of(k)[2] for k, w in m.windows.items() if w.tenant == "acme"}


async def _saved(runtime: Runtime) -> set[str]:
    """The window sets whose snapshots are in KV `lg_drift`."""
    bus = runtime.ctx.bus
    return {k for k in await bus.kv_entries(bus.subjects.kv_drift) if "." not in k}


async def test_made_up_deployments_beyond_the_cap_leave_the_monitor_at_the_cap_and_served_windows_survive(
        settings: Settings) -> None:
    base = settings.replace(nats_url="nats://127.0.0.1:0", drift_max_windows=CAP)
    first = Runtime(base, services=SERVICES)
    await first.start()
    try:
        drift, bus = first.services["drift"].handlers, first.ctx.bus
        secret = await _credential(first)
        await bus.publish(bus.subjects.served("shop", "acme"), _served(10))  # as the router publishes what it served
        await drift.events.wait_for(10, 30)

        # 4 made-up names fit beside the served deployment; saved, then 40 more names.
        await _send(first, secret, [f"junk-a{i}" for i in range(4)])
        await drift.events.wait_for(14, 30)
        await drift.save()
        assert await _saved(first) == {token(window_key("acme", d, s)) for d, s in _acme(first).items()}
        names = [f"junk-b{i}" for i in range(40)]
        await _send(first, secret, names)
        await drift.events.wait_for(54, 30)

        # The tenant holds CAP window sets: the served one, and the most recently seen application's.
        held = _acme(first)
        assert len(held) == CAP  # before: 45, one per name
        assert held.pop("chat") is True
        assert sorted(held) == sorted(names[-(CAP - 1):]) and not any(held.values())
        assert first.services["drift"].handlers.monitor.windows[window_key("acme", "chat", True)].ref.n == 10
        assert drift.evictions.count == 40 + 4 - (CAP - 1)
        # The evicted windows' snapshots are deleted: KV holds what the monitor holds.
        await drift.save()
        assert await _saved(first) == {token(window_key("acme", d, s)) for d, s in _acme(first).items()}
    finally:
        await first.stop()

    # An operator lowers the cap: a start restores the served windows and the most recently saved application ones
    # up to it, and deletes the rest's snapshots.
    second = Runtime(base.replace(drift_max_windows=3), services=SERVICES)
    await second.start()
    try:
        drift, bus = second.services["drift"].handlers, second.ctx.bus
        await bus.publish(bus.subjects.served("shop", "acme"), _served(1))  # any event: the monitor restores first
        await drift.events.wait_for(1, 30)
        held = _acme(second)
        assert len(held) == 3 and held.pop("chat") is True and len(held) == 2
        assert set(held) <= set(names[-(CAP - 1):])
        assert second.services["drift"].handlers.monitor.windows[window_key("acme", "chat", True)].ref.n == 11
        await drift.save()
        assert await _saved(second) == {token(window_key("acme", d, s)) for d, s in _acme(second).items()}
    finally:
        await second.stop()
