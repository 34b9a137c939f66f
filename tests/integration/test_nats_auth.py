"""NATS identities on a real nats-server configured as the embedded one is: no credentials, no
connection; each identity publishes only its own facts, and a refused publish stores nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import pytest

from lockgate import credentials
from lockgate.bus import Bus
from lockgate.client import Client
from lockgate.config import Settings
from lockgate.contracts import EvalCompleted, GateDecided, GateReview, InferenceEvent
from lockgate.credentials import NotAllowed
from lockgate.server.natsserver import NatsServer, auth_config
from lockgate.subjects import Subjects

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def secured(tmp_path: Path, unique: str) -> AsyncIterator[tuple[NatsServer, Settings, Bus]]:
    """A nats-server with the users and permissions of this test's prefix, and an admin bus that
    declared the streams (as the embedded runtime does)."""
    settings = Settings(prefix=unique, home=str(tmp_path))
    config = auth_config(Subjects(unique), credentials.ensure(tmp_path))
    server = NatsServer(tmp_path / "nats", config=config)
    await server.start()
    settings = settings.replace(nats_url=server.url)
    admin = await _bus(settings, "admin")
    yield server, settings, admin
    await admin.close()
    server.stop()


async def _bus(settings: Settings, identity: str) -> Bus:
    bus = Bus(settings.nats_url, Subjects(settings.prefix), name=f"test-{identity}",
              auth=credentials.for_identity(settings, identity), manage_topology=identity == "admin")
    await bus.connect()
    return bus


async def _stored(admin: Bus, subject: str) -> int:
    info = await admin.js.stream_info(admin.subjects.streams["events"].name, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


def _decision(release: str) -> GateDecided:
    return GateDecided(release=release, decision="PASS", rules=[])


def test_credentials_are_private_files(tmp_path: Path) -> None:
    passwords = credentials.ensure(tmp_path)
    assert credentials.ensure(tmp_path) == passwords  # generated once, then kept
    assert (credentials.directory(tmp_path).stat().st_mode & 0o777) == 0o700
    for path in credentials.directory(tmp_path).iterdir():
        assert (path.stat().st_mode & 0o777) == 0o600, path
    assert "password" not in repr(credentials.for_identity(Settings(home=str(tmp_path)), "router"))


async def test_a_connection_without_credentials_is_refused(secured) -> None:
    server, settings, _ = secured
    with pytest.raises(nats.errors.Error):
        await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)
    with pytest.raises(NotAllowed, match="refused the credentials"):
        bad = Bus(server.url, Subjects(settings.prefix), auth=credentials.NatsAuth(user="router", password="guess"))
        await bad.connect()


@pytest.mark.parametrize(("subject", "event"), [
    (lambda s: s.gate_decided("shop-v2"), _decision("shop-v2")),
    (lambda s: s.eval_completed, EvalCompleted(run_id="r1", release="shop-v2", suite="sha256:x")),
    (lambda s: s.gate_review("shop-v2"), GateReview(release="shop-v2", action="approve", actor="me", reason="x")),
], ids=["GateDecided", "EvalCompleted", "GateReview"])
async def test_the_router_cannot_forge_gate_facts(secured, subject, event) -> None:
    _, settings, admin = secured
    router = await _bus(settings, "router")
    try:
        target = subject(router.subjects)
        with pytest.raises(NotAllowed, match="'router' may not publish"):
            await router.publish(target, event)
        assert await _stored(admin, target) == 0  # nothing reached the stream
        # the connection stays usable for what the router may do
        await router.publish(router.subjects.rollout("shop"), _decision("x"), msg_id="rollout-probe")
    finally:
        await router.close()


@pytest.mark.parametrize(("identity", "subject", "event"), [
    ("gatekeeper", lambda s: s.gate_decided("shop-v2"), _decision("shop-v2")),
    ("evaluator", lambda s: s.eval_completed, EvalCompleted(run_id="r1", release="shop-v2", suite="sha256:x")),
    ("approver", lambda s: s.gate_review("shop-v2"), GateReview(release="shop-v2", action="approve", actor="a",
                                                                  reason="ok")),
])
async def test_only_the_owner_publishes_each_fact(secured, identity, subject, event) -> None:
    _, settings, admin = secured
    owner = await _bus(settings, identity)
    try:
        await owner.publish(subject(owner.subjects), event)
        assert await _stored(admin, subject(owner.subjects)) == 1
    finally:
        await owner.close()


async def test_viewer_cannot_review_and_operator_cannot_decide(secured) -> None:
    _, settings, admin = secured
    for identity, subject in (("viewer", admin.subjects.gate_review("shop-v2")),
                              ("operator", admin.subjects.gate_decided("shop-v2"))):
        bus = await _bus(settings, identity)
        try:
            with pytest.raises(NotAllowed):
                await bus.publish(subject, GateReview(release="shop-v2", action="approve", actor="x", reason="x"))
            assert await _stored(admin, subject) == 0
        finally:
            await bus.close()


async def test_an_sdk_application_sends_inference_events_only(secured) -> None:
    _, settings, admin = secured
    app = credentials.for_identity(settings, "app")
    async with Client(settings.nats_url, prefix=settings.prefix, app="shop", user=app.user,
                      password=app.password) as client:
        assert client.emit(InferenceEvent(app="shop"))
        await client.flush()
    info = await admin.js.stream_info(admin.subjects.streams["inference"].name)
    assert info.state.messages == 1
    bus = Bus(settings.nats_url, admin.subjects, auth=app, manage_topology=False)
    await bus.connect()
    try:
        with pytest.raises(NotAllowed):
            await bus.publish(bus.subjects.gate_decided("shop-v2"), _decision("shop-v2"))
    finally:
        await bus.close()
