"""The drift monitor's memory is bounded whatever an application sends, on the embedded runtime as `lockgate up`
runs it: an application's own NATS user (the official SDK) sends events naming made-up deployments; the monitor keeps
at most `drift_max_windows` window sets of the tenant, evicting the least recently seen application windows (their
KV snapshots too), never a served deployment's; and a start restores only what the cap holds. Another app of the
tenant, sending its own events meanwhile, keeps its windows and gets its reports.

Found by probe p6: an unscoped app key (and an application's NATS user alike) sent one event per made-up deployment
name; each name kept a window set of ~4 MB (text rings allocated whole), never evicted, saved to KV `lg_drift` and
restored at the next start: 100 events = +405 MB, 5,000 took the embedded stack past 11 GB.

Probe p7: the cap evicted the tenant's least recently seen application windows whichever app they were: app aapp,
naming fresh made-up deployments between app vapp's batches, evicted vapp's windows each time, so vapp never had a
drift report.

Review after p7: an application's window set of a deployment was keyed by the deployment alone and held by the app
whose event came last, so aapp, sending one event naming vapp's deployment before its made-up names, was counted as
the set's holder and evicted it as its own (and its events filled vapp's windows). Now each app's events fill a set
of their own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pytest
from click.testing import CliRunner

from lockgate.cli.main import cli
from lockgate.client import Client
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import DriftReport, InferenceEvent
from lockgate.server.runtime import Runtime
from lockgate.services.drift import snapshots
from lockgate.services.drift.domain import window_key, windows_of
from lockgate.services.drift.features import LABELS_MAX
from lockgate.services.drift.windows import Windows
from lockgate.subjects import token

pytestmark = pytest.mark.timeout(120)

CAP = 6
SERVICES = ["sink", "gateway", "drift", "gatekeeper"]  # the gatekeeper chains the credential's audit entry
_reports: Codec[DriftReport] = Codec(DriftReport)


async def _credential(runtime: Runtime, app: str = "shop") -> dict[str, str]:
    """`lockgate app-credential create --tenant acme --app APP`: the user's secret."""
    s = runtime.settings
    env = {"LOCKGATE_HOME": s.home, "LOCKGATE_NATS_URL": s.nats_url, "LOCKGATE_PREFIX": s.prefix, "LOCKGATE_ROLE": ""}
    made = await asyncio.to_thread(CliRunner().invoke, cli, ["app-credential", "create", "--tenant", "acme", "--app",
                                                             app, "--json"], env=env, catch_exceptions=False)
    assert made.exit_code == 0, made.output
    return json.loads(await asyncio.to_thread(Path(json.loads(made.output)["file"]).read_text))


def _served(n: int) -> list[InferenceEvent]:
    """Answers the router served for acme's deployment `chat`."""
    t0 = datetime.now(UTC)
    return [InferenceEvent(app="shop", tenant="acme", deployment="chat", variant="stable", release="shop-v1",
                           model="sim", output_tokens=5, input_tokens=8, latency_ms=20.0, prompt="hello",
                           response="hi there", time=t0 + timedelta(milliseconds=i)) for i in range(n)]


async def _send(runtime: Runtime, secret: dict[str, str], names: list[str], app: str = "shop") -> None:
    """One event per deployment name, as probe p6 sent them, on the application's own subject."""
    async with Client(runtime.settings.nats_url, prefix=runtime.settings.prefix, tenant="acme", app=app,
                      user=secret["user"], password=secret["password"]) as client:
        for name in names:
            client.emit(deployment=name, release="shop-v1", model="sim", status="ok", input_tokens=8, output_tokens=1,
                        latency_ms=5.0, prompt=f"question about {name}", response="an answer")
        await client.flush()
        assert client.sent == len(names)


def _acme(runtime: Runtime) -> dict[str, bool]:
    """acme's window sets in the monitor (of app shop's events, or served): deployment -> served."""
    m = runtime.services["drift"].handlers.monitor
    return {windows_of(k)[1]: windows_of(k)[2] for k, w in m.windows.items() if w.tenant == "acme"}


def _key(deployment: str, served: bool) -> str:
    """The KV key of acme's served windows of a deployment, or of app shop's own."""
    return token(window_key("acme", deployment, served, "shop"))


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
        assert await _saved(first) == {_key(d, s) for d, s in _acme(first).items()}
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
        assert await _saved(first) == {_key(d, s) for d, s in _acme(first).items()}
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
        assert await _saved(second) == {_key(d, s) for d, s in _acme(second).items()}
    finally:
        await second.stop()



class TwoApps(NamedTuple):
    """A stack at the drift cap CAP, vdep's drift reports subscribed, and the NATS users of apps vapp and aapp."""

    runtime: Runtime
    reports: Any
    victim: Any
    attacker: Any


@pytest.fixture
async def two_apps(settings: Settings) -> AsyncIterator[TwoApps]:
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", drift_max_windows=CAP), services=SERVICES)
    await runtime.start()
    try:
        bus = runtime.ctx.bus
        reports = await bus.nc.subscribe(bus.subjects.drift("vdep"))
        yield TwoApps(runtime, reports, await _credential(runtime, "vapp"), await _credential(runtime, "aapp"))
    finally:
        await runtime.stop()


async def test_an_app_naming_made_up_deployments_churns_its_own_windows_and_another_apps_reports_still_come(
        two_apps: TwoApps) -> None:
    runtime, reports, victim, attacker = two_apps
    drift, s = runtime.services["drift"].handlers, runtime.settings
    monitor = drift.monitor

    # As probe p7: vapp's batches to its deployment, and between them aapp's events naming twice the cap of
    # fresh made-up deployments, each with its own NATS user, until vapp's reference and first window are full.
    batch, sent = 25, 0
    for rnd in range((s.drift_reference_size + s.drift_window_size) // batch):
        await _send(runtime, victim, ["vdep"] * batch, app="vapp")
        sent += batch
        await drift.events.wait_for(sent, 30)
        await _send(runtime, attacker, [f"junk-{rnd}-{i}" for i in range(2 * CAP)], app="aapp")
        sent += 2 * CAP
        await drift.events.wait_for(sent, 30)
        # vapp's one set is within its share (CAP over 2 apps): aapp's new names evicted only aapp's sets.
        # (Before: vapp's set was the least recently seen, evicted after aapp's fifth name, every round.)
        assert window_key("acme", "vdep", False, "vapp") in monitor.windows
        assert sorted({w.app for w in monitor.windows.values()}) == ["aapp", "vapp"]

    # vapp's report came: its reference against its window, vapp's events only.
    report = _reports.decode((await reports.next_msg(timeout=30)).data)
    assert (report.app, report.tenant, report.deployment, report.served) == ("vapp", "acme", "vdep", False)
    assert (report.reference_n, report.current_n) == (s.drift_reference_size, s.drift_window_size)
    await reports.unsubscribe()
    held = _acme(runtime)
    assert len(held) == CAP and "vdep" in held
    assert sorted(d for d in held if d != "vdep") == sorted(f"junk-3-{i}" for i in range(CAP + 1, 2 * CAP))
    assert drift.evictions.count == 4 * 2 * CAP - (CAP - 1)


async def test_an_app_naming_another_apps_deployment_never_claims_or_evicts_its_windows_and_its_reports_keep_coming(
        two_apps: TwoApps) -> None:
    runtime, reports, victim, attacker = two_apps
    drift, s = runtime.services["drift"].handlers, runtime.settings
    monitor = drift.monitor

    def vapps() -> list[str]:
        """The application window sets of vdep that are vapp's (their events vapp's)."""
        return [k for k, w in monitor.windows.items() if windows_of(k)[1] == "vdep" and not windows_of(k)[2]
                and w.app == "vapp"]

    # vapp's batches to its deployment; between them aapp, with its own NATS user, names vapp's deployment once
    # (before: the set became aapp's) and then twice the cap of fresh made-up deployments (before: aapp, holding
    # the most, evicted the claimed set as its own, each round).
    batch, sent, rounds = 25, 0, 2 * (s.drift_reference_size + s.drift_window_size) // 25
    for rnd in range(rounds):
        await _send(runtime, victim, ["vdep"] * batch, app="vapp")
        sent += batch
        await drift.events.wait_for(sent, 30)
        await _send(runtime, attacker, ["vdep", *(f"junk-{rnd}-{i}" for i in range(2 * CAP))], app="aapp")
        sent += 1 + 2 * CAP
        await drift.events.wait_for(sent, 30)
        assert len(vapps()) == 1  # never claimed, never evicted

    # vapp's reports keep coming, each of vapp's events alone: its reference, then every window of 50 after it.
    want = (rounds * batch - s.drift_reference_size) // s.drift_window_size
    got = [_reports.decode((await reports.next_msg(timeout=30)).data) for _ in range(want)]
    assert [(r.app, r.tenant, r.served, r.reference_n, r.current_n) for r in got] == [
        ("vapp", "acme", False, s.drift_reference_size, s.drift_window_size)] * want
    await reports.unsubscribe()
    assert monitor.windows[vapps()[0]].since_report == 0  # no event past vapp's last window: none of aapp's


async def _send_each(runtime: Runtime, secret: dict[str, str], app: str, deployment: str,
                     events: list[dict[str, str]]) -> None:
    """These events' categories (finish reason, model, ...), with the application's own NATS user."""
    async with Client(runtime.settings.nats_url, prefix=runtime.settings.prefix, tenant="acme", app=app,
                      user=secret["user"], password=secret["password"]) as client:
        for fields in events:
            client.emit(**{"deployment": deployment, "release": "shop-v1", "model": "sim", "input_tokens": 8,
                           "output_tokens": 5, "latency_ms": 5.0, **fields})
        await client.flush()
        assert client.sent == len(events)


async def test_an_apps_made_up_category_names_never_push_out_the_names_another_apps_report_shows(
        two_apps: TwoApps) -> None:
    """Probe p13: the table of category names was the tenant's, shared by its applications. aapp's events with
    LABELS_MAX made-up names, sent between vapp's reference and its window, pushed out the name of the category
    vapp's answers stopped ending with, and vapp's report named it by code (`finish_reason:#...`), which a gate rule
    or a rollout metric naming `finish_reason:stop` never matches. Now each application's table is its own."""
    runtime, reports, victim, attacker = two_apps
    drift, s = runtime.services["drift"].handlers, runtime.settings
    n = s.drift_reference_size
    assert s.drift_window_size == n
    # vapp's reference: every answer ends normally.
    await _send_each(runtime, victim, "vapp", "vdep", [{"finish_reason": "stop"}] * n)
    await drift.events.wait_for(n, 30)
    # aapp: four made-up names an event (model, status, error type, finish reason), more than a table holds.
    flood = [{f: f"{f}-{i}" for f in ("model", "status", "error_type", "finish_reason")}
             for i in range(LABELS_MAX // 4 + 1)]
    await _send_each(runtime, attacker, "aapp", "junk", flood)
    await drift.events.wait_for(n + len(flood), 30)
    # vapp's window: no answer ends normally any more, half cut at the length limit, half filtered.
    await _send_each(runtime, victim, "vapp", "vdep",
                     [{"finish_reason": ("length", "content_filter")[i % 2]} for i in range(n)])

    report = _reports.decode((await reports.next_msg(timeout=30)).data)
    await reports.unsubscribe()
    assert (report.app, report.tenant, report.served, report.drifted) == ("vapp", "acme", False, True)
    finish = next(f for f in report.features if f.feature.startswith("finish_reason:"))
    # The category that moved most, by name (before: `finish_reason:#<12 hex>`, its name pushed out by aapp's).
    assert (finish.feature, finish.reference_mean, finish.current_mean) == ("finish_reason:stop", 1.0, 0.0)


async def test_an_apps_category_names_survive_a_restart_in_its_own_table(settings: Settings) -> None:
    """The names of the categories an application's windows hold are saved with them and restored into that
    application's table: its first report after a start names the category its reference held."""
    base = settings.replace(nats_url="nats://127.0.0.1:0", drift_max_windows=CAP)
    n = base.drift_reference_size
    first = Runtime(base, services=SERVICES)
    await first.start()
    try:
        drift = first.services["drift"].handlers
        secret = await _credential(first, "vapp")
        await _send_each(first, secret, "vapp", "vdep", [{"finish_reason": "stop"}] * n)
        await drift.events.wait_for(n, 30)
    finally:
        await first.stop()  # a clean stop saves the windows
    second = Runtime(base, services=SERVICES)
    await second.start()
    try:
        bus = second.ctx.bus
        reports = await bus.nc.subscribe(bus.subjects.drift("vdep"))
        await _send_each(second, secret, "vapp", "vdep",
                         [{"finish_reason": ("length", "content_filter")[i % 2]} for i in range(n)])
        report = _reports.decode((await reports.next_msg(timeout=30)).data)
        await reports.unsubscribe()
        assert (report.app, report.reference_n) == ("vapp", n)
        assert "finish_reason:stop" in {f.feature for f in report.features}
        assert set(second.services["drift"].handlers.monitor.labels) == {("acme", "vapp")}
    finally:
        await second.stop()


async def test_an_applications_windows_saved_before_they_were_kept_per_app_refill_and_their_snapshot_goes(
        settings: Settings) -> None:
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", drift_max_windows=CAP), services=SERVICES)
    await runtime.start()
    try:
        drift, bus = runtime.services["drift"].handlers, runtime.ctx.bus
        kv = await bus.kv(bus.subjects.kv_drift)
        # As saved before: `<deployment>~<tenant>#app`, last filled by shop's events (maybe another app's before).
        legacy, own = "chat~acme#app", window_key("acme", "chat", False, "app")
        assert legacy == own  # the old key reads as an app named `app`: its snapshot's app tells them apart
        old = Windows(50, 50, app="shop", tenant="acme")
        await kv.put(token(legacy), msgspec.json.encode(snapshots.snapshot(legacy, old, saved=1.0)))
        await bus.publish(bus.subjects.served("shop", "acme"), _served(1))  # any event: the monitor restores first
        await drift.events.wait_for(1, 30)
        assert legacy not in drift.monitor.windows
        await drift.save()
        assert await _saved(runtime) == {token(window_key("acme", "chat", True))}
    finally:
        await runtime.stop()
