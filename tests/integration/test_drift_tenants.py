"""Drift windows per tenant, on the embedded runtime as `lockgate up` runs it, with each tenant's own per-application
NATS credential and the official SDK: events of one tenant naming another tenant's deployment fill windows of their
own, so the other's reports compare its own events only; every report and stored row says whose events it compares.

Found by a probe: bravo's application credential (it names any deployment: no credential has a deployment scope)
sent 600 long answers naming acme's deployment `mix-a`; the monitor kept an application's windows by deployment
alone, so they landed in acme's own windows, and acme's operators read a DRIFT of their deployment's
output_tokens (2 -> 320) and latency (20 -> 724 ms) that their application never produced. `drift_reports` had
no tenant column, so the two could not be told apart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from lockgate.cli.main import cli
from lockgate.client import Client
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import DriftReport
from lockgate.server.runtime import Runtime
from lockgate.services.query.drift import drift_reports
from tests.helpers import sink_stored

pytestmark = pytest.mark.timeout(90)

_reports: Codec[DriftReport] = Codec(DriftReport)


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink", "gateway", "drift", "gatekeeper"])
    await runtime.start()
    yield runtime
    await runtime.stop()


async def _credential(runtime: Runtime, tenant: str) -> dict[str, str]:
    """`lockgate app-credential create --tenant T --app support`: the user's secret."""
    s = runtime.settings
    env = {"LOCKGATE_HOME": s.home, "LOCKGATE_NATS_URL": s.nats_url, "LOCKGATE_PREFIX": s.prefix, "LOCKGATE_ROLE": ""}
    made = await asyncio.to_thread(CliRunner().invoke, cli, ["app-credential", "create", "--tenant", tenant, "--app",
                                                             "support", "--json"], env=env, catch_exceptions=False)
    assert made.exit_code == 0, made.output
    return json.loads(await asyncio.to_thread(Path(json.loads(made.output)["file"]).read_text))


async def _send(runtime: Runtime, secret: dict[str, str], tenant: str, n: int, output_tokens: int) -> None:
    async with Client(runtime.settings.nats_url, prefix=runtime.settings.prefix, tenant=tenant, app="support",
                      user=secret["user"], password=secret["password"]) as client:
        for _ in range(n):
            client.emit(deployment="mix-a", release="kappa-v1", variant="stable", model="sim", status="ok",
                        input_tokens=8, output_tokens=output_tokens,
                        latency_ms=900.0 if output_tokens > 100 else 20.0)
        await client.flush()
        assert client.sent == n


async def test_another_tenants_events_naming_a_deployment_never_fill_its_tenants_drift_windows(
        stack: Runtime) -> None:
    s = stack.settings
    assert (s.drift_reference_size, s.drift_window_size) == (50, 50)
    drift, bus = stack.services["drift"].handlers, stack.ctx.bus
    reports = await bus.nc.subscribe(bus.subjects.drift("mix-a"))
    acme, bravo = await _credential(stack, "acme"), await _credential(stack, "bravo")

    # acme's application: 50 short answers (its reference), then bravo's 50 long ones naming acme's deployment and
    # release, then acme's next 50 short ones (its current window).
    await _send(stack, acme, "acme", 50, output_tokens=2)
    await drift.events.wait_for(50, 30)
    await _send(stack, bravo, "bravo", 50, output_tokens=400)
    await drift.events.wait_for(100, 30)
    await _send(stack, acme, "acme", 50, output_tokens=2)
    await drift.events.wait_for(150, 30)

    # One report: acme's window against acme's reference, no drift. (Before: bravo's 50 were acme's current
    # window, a DRIFT in output_tokens 2 -> 400 reported for mix-a.) bravo's 50 are its own reference so far.
    report = _reports.decode((await reports.next_msg(timeout=30)).data)
    assert (report.tenant, report.deployment, report.served) == ("acme", "mix-a", False)
    assert not report.drifted and (report.reference_n, report.current_n) == (50, 50)
    out = next(f for f in report.features if f.feature == "output_tokens")
    assert out.reference_mean == out.current_mean == 2.0
    await drift.reports.wait_for(1, 10)  # counted once its publish returned, which may be after we received it
    assert drift.reports.count == 1

    # bravo's next 50 complete its own window: a report of bravo's events, naming the deployment they named.
    await _send(stack, bravo, "bravo", 50, output_tokens=400)
    theirs = _reports.decode((await reports.next_msg(timeout=30)).data)
    assert (theirs.tenant, theirs.deployment, theirs.drifted) == ("bravo", "mix-a", False)
    await reports.unsubscribe()

    # Stored with its tenant, and the query (and `lockgate drift --tenant`) keeps to one tenant's reports.
    await sink_stored(stack.services["sink"].handlers, drift_reports=2)
    assert stack.ctx.store is not None
    stored = await asyncio.to_thread(drift_reports, stack.ctx.store, "mix-a")
    assert {(r["id"], r["tenant"]) for r in stored} == {(report.id, "acme"), (theirs.id, "bravo")}
    only = await asyncio.to_thread(drift_reports, stack.ctx.store, "mix-a", 50, "acme")
    assert [r["id"] for r in only] == [report.id]
    shown = await asyncio.to_thread(CliRunner().invoke, cli, [
        "--clickhouse", s.clickhouse_url, "--database", s.database, "drift", "--deployment", "mix-a", "--tenant", "bravo"])
    assert shown.exit_code == 0, shown.output
    assert "tenant" in shown.output and "bravo" in shown.output and "acme" not in shown.output
