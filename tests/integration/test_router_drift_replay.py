"""A router replica that (re)starts mid-rollout, or whose bus connection comes back, reads back the drift reports
published meanwhile, so its analysis' `drift` metric has the latest report at once instead of WAITING for the
monitor's next one; and its live evidence is what routers served, never an application's events. On a real
nats-server with auth on: the router reads as its own identity, the reports come from the drift monitor's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lockgate import credentials
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.contracts import DriftReport, FeatureDrift, GateDecided, InferenceEvent, InferenceScored
from lockgate.credentials import NotAllowed
from lockgate.server.natsserver import NatsServer, auth_config
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate.store import Store
from lockgate.subjects import Subjects
from tests.helpers import (
    Relay,
    Replicas,
    admin_headers,
    gate_decided,
    judged,
    register_model_release,
    store_pass,
)

pytestmark = pytest.mark.timeout(60)

STRATEGY = {"steps": [50, 100], "interval_s": 60,  # no look is due during a test: evidence is read, not acted on
            "analysis": {"metrics": [{"name": "drift", "max": 0, "features": ["output_tokens"]}]}}


class Stack(Replicas):
    """A nats-server with this test's users and permissions, and processes on it, each as its own identity."""

    def __init__(self, settings: Settings, store: Store) -> None:
        super().__init__()
        self.settings, self.store = settings, store
        self.named: dict[str, Bus] = {}

    async def bus(self, identity: str, name: str = "", url: str = "") -> Bus:
        b = Bus(url or self.settings.nats_url, Subjects(self.settings.prefix), name=name or f"test-{identity}",
                auth=credentials.for_identity(self.settings, identity), manage_topology=identity == "admin")
        await b.connect()
        self.named[name or identity] = b
        self.buses.append(b)
        return b

    async def replica(self, name: str, url: str = "") -> Any:
        """A router replica on its own connection as the router identity (to `url`, default the server),
        started (serving) when this returns."""
        return await self.router(await self.bus("router", name, url), self.settings, self.store)


@contextlib.asynccontextmanager
async def own_server_stack(tmp_path: Path, unique: str, store: Store) -> AsyncIterator[tuple[Stack, NatsServer]]:
    """A Stack on a nats-server of its own (auth on), and the server (which a test may restart)."""
    server = NatsServer(tmp_path / "nats", config=auth_config(Subjects(unique), credentials.ensure(tmp_path)))
    await server.start()
    settings = Settings(prefix=unique, home=str(tmp_path), nats_url=server.url, router_port=0, deployment="chat",
                        app="shop", stable_upstream="http://127.0.0.1:9", canary_upstream="http://127.0.0.1:9")
    s = Stack(settings, store)
    try:
        await s.bus("admin")  # declares the streams and buckets, as the sink would
        yield s, server
    finally:
        await s.close()
        server.stop()


@pytest.fixture
async def stack(tmp_path: Path, unique: str, store: Store) -> AsyncIterator[Stack]:
    async with own_server_stack(tmp_path, unique, store) as (s, _):
        yield s


async def _rollout(stack: Stack, router: Any) -> None:
    """`chat` canaries r2 against r1 under an analysis with a drift metric, live (progressing) on `router`."""
    admin = stack.named["admin"]
    signer = Signer.generate()
    trust_key(trust_file_path(stack.settings), signer.public)
    for release in ("r1", "r2"):
        await register_model_release(admin, release)
    await store_pass(admin, "r1", stack.settings)
    async with aiohttp.ClientSession(headers=admin_headers(stack.settings.home)) as http:
        body = {"stable_release": "r1", "canary_release": "r2", "strategy": STRATEGY}
        async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=body) as resp:
            assert resp.status == 200, await resp.text()
    await gate_decided(admin, signer.sign(GateDecided(release="r2", rules=[], decision="PASS",
                                                      artifacts=await judged(admin, "r2"))))
    await router.rollouts.wait_for(lambda r: "chat" in r and r["chat"].phase == "progressing", timeout=10)
    await router.rollouts.flush()  # in KV, where a replica started next restores it from


def _report(comparison: str, psi: float, ended: datetime | None = None) -> DriftReport:
    end = ended or datetime.now(UTC)
    canary = {"release": "r2", "reference_release": "r1"} if comparison == "canary_vs_stable" else {}
    return DriftReport(served=True, deployment="chat", window_start=end - timedelta(seconds=30), window_end=end, reference_n=100,
                       current_n=100, drifted=False, comparison=comparison,  # type: ignore[arg-type]
                       features=[FeatureDrift(feature="output_tokens", psi=psi, ks_stat=0.1, ks_pvalue=0.5,
                                              reference_mean=50, current_mean=51, drifted=False)], **canary)


async def _answers(stack: Stack, router: Any) -> None:
    """The analysis' minimum sample: ten answers per variant, served by another router replica as live traffic
    (no drift report), taken by `router` when this returns."""
    other, taken, observe = await stack.bus("router"), asyncio.Event(), router.rollouts.observe

    def observed(events: list[InferenceEvent]) -> None:
        observe(events)
        taken.set()

    router.rollouts.observe = observed
    spec = router.rollouts.route("chat").strategy.analysis
    await other.publish(other.subjects.served("shop"), [InferenceEvent(app="shop", deployment="chat", release=r)
                                                        for r in ("r1", "r2") for _ in range(spec.min_sample)])
    async with asyncio.timeout(10):
        await taken.wait()


def _drift_metric(router: Any) -> Any:
    """The drift metric of the look the router would take now (with its minimum sample of answers)."""
    (metric,) = router.rollouts.measurement(router.rollouts.route("chat"), time.time()).metrics
    return metric


async def test_a_replica_started_mid_rollout_holds_the_latest_drift_report_at_once(stack: Stack) -> None:
    a = await stack.replica("router-a")
    await _rollout(stack, a)
    monitor = await stack.bus("drift")
    older, report = _report("canary_vs_stable", 0.01), _report("canary_vs_stable", 0.02)
    for r in (older, report):
        await monitor.publish(monitor.subjects.drift("chat"), r)

    b = await stack.replica("router-b")  # no report is published from here on

    assert b.rollouts.route("chat").phase == "progressing"
    assert b.rollouts.evidence.drift("chat", "r2", 0.0) == report  # the newest of its comparison
    await _answers(stack, b)
    metric = _drift_metric(b)
    assert (metric.verdict, metric.canary) == ("SUCCESSFUL", 0.0)
    assert f"canary_vs_stable report {report.id} of r2 vs r1" in metric.why


async def test_reports_from_before_the_rollout_and_unreadable_messages_are_not_replayed(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    monitor = await stack.bus("drift")
    before = _report("canary_vs_stable", 0.01, datetime.now(UTC) - timedelta(hours=2))
    await monitor.publish(monitor.subjects.drift("chat"), before)  # stored before the rollout starts
    a = await stack.replica("router-a")
    await _rollout(stack, a)
    await monitor.publish(monitor.subjects.drift("chat"), b"not a drift report", msg_id="garbage")
    await monitor.publish(monitor.subjects.drift("chat"), b'{"deployment": "\xff"}', msg_id="not-utf-8")
    report = _report("now_vs_reference", 0.03)
    await monitor.publish(monitor.subjects.drift("chat"), report)

    with caplog.at_level(logging.WARNING, logger="lockgate.router"):
        b = await stack.replica("router-b")

    # The one of r2's window against r1's was stored before this rollout started, so it is no evidence for it and
    # is not read back; the deployment's (now against its reference) is, and it is never the canary's evidence:
    # it judges a release only once it is the deployment's one arm, after a blue-green promotion. (Before, the
    # canary's drift metric judged it while no report of the canary's own existed.)
    assert b.rollouts.evidence.drift("chat", "r2", 0.0) is None
    assert b.rollouts.evidence.drift("chat", "r2", 0.0, "now_vs_reference") == report
    await _answers(stack, b)
    assert _drift_metric(b).verdict == "WAITING"
    assert sum("drift replay skipped unreadable message" in r.getMessage() for r in caplog.records) == 2
    async with aiohttp.ClientSession() as http, http.get(f"{b.url}/healthz") as resp:  # and it serves
        assert resp.status == 200 and (await resp.json())["ready"]



async def test_reports_published_while_a_replica_was_cut_off_are_read_back_when_it_reconnects(stack: Stack) -> None:
    a = await stack.replica("router-a")
    await _rollout(stack, a)
    relay = Relay(int(stack.settings.nats_url.rpartition(":")[2]))
    try:
        b = await stack.replica("router-b", f"nats://127.0.0.1:{await relay.start()}")
        bus = stack.named["router-b"]
        taken, observe = asyncio.Event(), b.rollouts.observe_drift
        report = _report("canary_vs_stable", 0.02)

        def observed(r: DriftReport) -> None:
            observe(r)
            if r.id == report.id:
                taken.set()

        b.rollouts.observe_drift = observed
        relay.cut()  # router-b alone loses the server, which stays up for everyone else
        await bus.wait_state("reconnecting", timeout_s=10)
        monitor = await stack.bus("drift")
        await monitor.publish(monitor.subjects.drift("chat"), report)
        assert not taken.is_set() and b.rollouts.evidence.drift("chat", "r2", 0.0) is None  # missed live

        relay.heal()
        async with asyncio.timeout(30):  # nats-py waits about 2 s between reconnect attempts
            await taken.wait()
        assert b.rollouts.evidence.drift("chat", "r2", 0.0) == report
    finally:
        await relay.close()


async def test_an_applications_events_never_count_as_a_canarys_live_evidence(stack: Stack) -> None:
    # Before: the router took every inference event as evidence, so an application (its shared NATS user, an API
    # key on the gRPC ingest or OTLP receiver) could report answers nobody served, naming the canary: good ones
    # to carry a failing canary through its analysis, failing ones to roll a good canary back.
    router = await stack.replica("router-a")
    await _rollout(stack, router)
    seen: list[InferenceEvent] = []
    observe, taken = router.rollouts.observe, asyncio.Event()

    def observed(events: list[InferenceEvent]) -> None:
        seen.extend(events)
        observe(events)
        taken.set()

    router.rollouts.observe = observed
    app = await stack.bus("app")
    forged = [InferenceEvent(app="shop", deployment="chat", release="r2", latency_ms=1.0) for _ in range(50)]
    with pytest.raises(NotAllowed):  # the served subject is the routers' alone
        await app.publish(app.subjects.served("shop"), forged)
    # Where an application's events land (the gateway relays its NATS user's, gRPC and OTLP publish them):
    # accepted, stored, priced, watched for drift.
    gateway = await stack.bus("gateway")
    await gateway.publish(gateway.subjects.inference("shop"), forged)
    # What another replica served, published after the forged events were acknowledged: the first thing observed.
    other = await stack.bus("router")
    served = [InferenceEvent(app="shop", deployment="chat", release="r2", status="error")]
    await other.publish(other.subjects.served("shop"), served)
    async with asyncio.timeout(10):
        await taken.wait()
    assert [e.id for e in seen] == [e.id for e in served]


async def test_only_scores_of_served_answers_count_as_a_canarys_evidence(stack: Stack) -> None:
    # The evaluator scores every sampled event, an application's included, and says which answers a router served.
    router = await stack.replica("router-a")
    await _rollout(stack, router)
    observe, taken = router.rollouts.observe_scores, asyncio.Event()
    seen: list[InferenceScored] = []

    def observed(scored: list[InferenceScored]) -> None:
        observe(scored)
        seen.extend(scored)
        if len(seen) == 2:
            taken.set()

    router.rollouts.observe_scores = observed
    evaluator = await stack.bus("evaluator")
    for served, value in ((False, 1.0), (True, 0.0)):
        scored = InferenceScored(event_id=f"e-{served}", app="shop", deployment="chat", variant="canary",
                                 release="r2", scores={"pii_free": value}, served=served)
        await evaluator.publish(evaluator.subjects.eval_scores("chat"), scored)
    async with asyncio.timeout(10):
        await taken.wait()
    assert router.rollouts.evidence.sample("chat", "r2", 0).scores == {"pii_free": [0.0]}
