"""JetStream's own JSON stored as a KV value is refused by every reader, never read as a permissive one.

JetStream answers a publish on a stream's subject, and any `$JS.API.*` request, on whatever reply subject the
requester names, unchecked by permissions: named `$KV.<bucket>.<key>`, its acknowledgement or API answer becomes
the key's value. Here the real nats-server writes each such answer under a key of each lockgate bucket, and each
reader of that bucket fails closed: an error (refused, dead-lettered, the chain stopped), a miss, or a BLOCK; never
"no decision", "no canary", "no budget used", "no previous head"."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import msgspec
import pytest

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.cli.audit import read_head
from lockgate.cli.budget import read_budgets
from lockgate.client import get_decision
from lockgate.codec import Codec
from lockgate.contracts import DeadLetter, DriftReport, FeatureDrift, GateDecided
from lockgate.errors import (
    AuditBroken,
    BusUnavailable,
    InvalidEvent,
    NotFound,
    SignatureError,
    UnreadableValue,
)
from lockgate.evalruns import requested_run
from lockgate.gitops.state import read_state, state_key
from lockgate.kvcas import CasStore, KVUnavailable, KVUnreadable
from lockgate.onlineeval import JudgeSpec
from lockgate.server.service import ServiceContext
from lockgate.services.drift.handlers import _snapshots
from lockgate.services.evaluator.cache import ResponseCache
from lockgate.services.evaluator.judgebudget import JudgeBudget
from lockgate.services.evaluator.online_handler import Plans
from lockgate.services.gatekeeper.chain import Chainer
from lockgate.services.gatekeeper.driftgate import DriftGate
from lockgate.services.gatekeeper.ownkey import OwnKey
from lockgate.services.gatekeeper.records import Records
from lockgate.services.router.admission import _counter_dec
from lockgate.services.router.budgets import BudgetSpec, resolve
from lockgate.services.router.cache import from_shared
from lockgate.services.router.rollouts import _route_decoder
from lockgate.signing import Signer
from lockgate.subjects import token
from tests.helpers import JETSTREAM_JSON, aim_jetstream_reply
from tests.integration.test_rollout_gate_drift import POLICY, _canary, _decide, http, keys, stack  # noqa: F401

pytestmark = pytest.mark.timeout(120)
SHAPES = sorted(JETSTREAM_JSON)
_letters = msgspec.json.Decoder(DeadLetter)
_decided: Codec[GateDecided] = Codec(GateDecided)


async def _aim(bus: Bus, bucket: str, key: str, shape: str) -> bytes:
    """JetStream's answer of this shape stored under the key by the nats-server itself (on the DLQ stream's
    subjects: no service here consumes them)."""
    value = await aim_jetstream_reply(bus.nc, bus.subjects.streams["dlq"].name, bus.subjects.dlq("kvprobe"),
                                      bucket, key, shape)
    assert msgspec.json.decode(value) == msgspec.json.decode(value)  # JSON, as a reader gets it
    return value


@pytest.mark.parametrize("shape", SHAPES)
async def test_every_reader_of_every_bucket_refuses_jetstream_json(context: ServiceContext, shape: str) -> None:
    bus = context.bus
    s = bus.subjects
    signer = Signer.generate()

    # gates: the gatekeeper's current decision (review, drift gate) and the SDK's/CLI's reader refuse it
    await _aim(bus, s.kv_gates, token("r2"), shape)
    with pytest.raises(UnreadableValue, match="the decision of 'r2' in KV .* is unreadable"):
        await Records(context, "salt").current("r2")
    with pytest.raises(SignatureError, match="the value stored for release 'r2' is no gate decision"):
        await get_decision(await bus.kv(s.kv_gates), "r2")

    # routes: the router's decoder and the drift gate's view refuse it (never a route without a canary)
    value = await _aim(bus, s.kv_routes, token("chat"), shape)
    with pytest.raises(msgspec.DecodeError):
        _route_decoder.decode(value)
    gate = DriftGate(context, OwnKey(context, signer), Records(context, "salt"), publish_key=lambda: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(UnreadableValue, match="the route of 'chat' in KV .* is unreadable"):
        await gate._route("chat")

    # eval runs: no recorded request, so no eval result is judged
    await _aim(bus, s.kv_eval_runs, token("run-1"), shape)
    with pytest.raises(InvalidEvent):
        await requested_run(bus, "run-1")

    # eval cache and the router's shared response cache: a miss (the upstream is asked)
    await _aim(bus, s.kv_eval_cache, "a" * 64, shape)
    assert await ResponseCache(await bus.kv(s.kv_eval_cache)).get("a" * 64) is None
    value = await _aim(bus, s.kv_response_cache, "b" * 64, shape)
    assert from_shared(value, 0.0, 0.0) is None

    # releases: not registered (no admission, the gate blocks an unregistered name)
    await _aim(bus, s.kv_releases, token("r9"), shape)
    with pytest.raises(NotFound, match="is not registered"):
        await artifacts.release_of(bus, "r9")

    # gitops: `plan` and the evaluator's per-deployment online_eval refuse it (the event is dead-lettered)
    await _aim(bus, s.kv_gitops, state_key("deployment", "chat"), shape)
    with pytest.raises(UnreadableValue, match=r"applied state deployment\.chat in KV .* is unreadable"):
        await read_state(bus)
    with pytest.raises(msgspec.DecodeError):
        await Plans(context)._spec("chat")

    # audit: the chain stops (never restarts from "no previous head") and `audit verify` reports it broken
    await _aim(bus, s.kv_audit, "head", shape)
    with pytest.raises(AuditBroken, match="chain head .* is unreadable"):
        await read_head(bus)
    with pytest.raises(BusUnavailable, match="audit chain head in KV is unreadable"):
        await Chainer(context, OwnKey(context, signer))._head(await bus.kv(s.kv_audit))

    # budgets: the router's counter and the judge's ledger are unreadable, so they refuse (never "nothing used")
    await _aim(bus, s.kv_budgets, "tiny.2026-12", shape)
    with pytest.raises(KVUnreadable, match="is unreadable"):  # no outage: refused even where fail_open is set
        await CasStore(bus, s.kv_budgets, timeout_s=5).update(
            "tiny.2026-12", lambda b: _counter_dec.decode(b or b"{}"), lambda c: (c, None), "budget counter tiny")
    with pytest.raises(UnreadableValue, match=r"budget counter tiny\.2026-12 in KV .* is unreadable"):
        await read_budgets(bus, resolve({"tiny": BudgetSpec(tokens=10, period="month")}),
                           datetime(2026, 12, 5, tzinfo=UTC))
    budget = JudgeBudget(bus, wall=lambda: datetime(2026, 12, 5, tzinfo=UTC))
    await _aim(bus, s.kv_budgets, f"_judge.{token('chat')}.2026-12-05", shape)
    with pytest.raises(KVUnavailable, match="is unreadable"):
        await budget.reserve("chat", JudgeSpec(endpoint="default", model="m", rubric="r"), 1000)

    # drift windows: unreadable (the drift service logs it and refills them from live traffic)
    value = await _aim(bus, s.kv_drift, token("chat"), shape)
    with pytest.raises(msgspec.DecodeError):
        _snapshots.decode(value)


def _report(**fields: Any) -> DriftReport:
    now = datetime.now(UTC)
    return DriftReport(served=True, deployment="chat", app="shop", window_start=now, window_end=now,
                       reference_n=500, current_n=500, drifted=False, source="lockgate-drift", features=[
                           FeatureDrift(feature="output_tokens", psi=0.15, ks_stat=0.3, ks_pvalue=1e-4,
                                        reference_mean=12, current_mean=20, drifted=False)], **fields)


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_live_canary_whose_decision_key_holds_jetstream_json_is_blocked_on_drift(
        stack: tuple[Any, Signer], http: aiohttp.ClientSession, shape: str) -> None:  # noqa: F811
    # Before: the gatekeeper read the key as "never gated", so drift over the canary's policy went unjudged and
    # the canary kept its traffic. Now the canary is BLOCKed (fail closed) and the router rolls it back.
    router, signer = stack
    bus = router.ctx.bus
    policy = await artifacts.register(bus, "policy", "canary-drift", POLICY)
    await _canary(http, router, signer, "r1", "r2", policy=policy.hash)
    await _aim(bus, bus.subjects.kv_gates, token("r2"), shape)
    # The canary's own report against stable's (a deployment's now-versus-reference report judges no canary).
    await bus.publish(bus.subjects.drift("chat"), _report(comparison="canary_vs_stable", release="r2"))
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "aborted", timeout=30)
    route = router.rollouts.route("chat")
    assert route.weight == 0.0 and route.stable.release == "r1"
    assert "gate BLOCK: drift on deployment 'chat' about 'r2', unjudged: the decision of 'r2'" in route.reason
    stored = _decided.decode((await (await bus.kv(bus.subjects.kv_gates)).get(token("r2"))).value)
    assert (stored.decision, stored.key_id) == ("BLOCK", signer.key_id)  # the key repaired, with a signed BLOCK


@pytest.fixture
async def letters(stack: tuple[Any, Signer]) -> AsyncIterator[Any]:  # noqa: F811
    bus = stack[0].ctx.bus
    sub = await bus.nc.subscribe(bus.subjects.dlq_all)
    yield sub
    await sub.unsubscribe()


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_drift_report_for_a_deployment_whose_route_key_holds_jetstream_json_is_dead_lettered(
        stack: tuple[Any, Signer], http: aiohttp.ClientSession, letters: Any, shape: str) -> None:  # noqa: F811
    # Before: the gate read the key as a route without a canary and dropped the report silently ("no canary").
    router, signer = stack
    bus = router.ctx.bus
    policy = await artifacts.register(bus, "policy", "canary-drift", POLICY)
    await _canary(http, router, signer, "r1", "r2", policy=policy.hash)
    await _aim(bus, bus.subjects.kv_routes, token("chat"), shape)
    report = _report()  # names no release: the route says which canary it is about
    await bus.publish(bus.subjects.drift("chat"), report)
    while (msg := await letters.next_msg(timeout=30)).subject == bus.subjects.dlq("kvprobe"):
        pass  # what _aim published to have a message to acknowledge
    letter = _letters.decode(msg.data)
    assert letter.origin.startswith("gatekeeper") and letter.reason == "rejected"
    assert "the route of 'chat' in KV" in letter.error and "is unreadable" in letter.error
    assert report.id.encode() in letter.payload


@pytest.mark.parametrize("shape", SHAPES)
async def test_the_router_admits_no_canary_on_a_decision_key_holding_jetstream_json(
        stack: tuple[Any, Signer], http: aiohttp.ClientSession, shape: str) -> None:  # noqa: F811
    router, _ = stack
    bus = router.ctx.bus
    await _aim(bus, bus.subjects.kv_gates, token("r2"), shape)
    body = {"stable_release": "r1", "canary_release": "r2", "strategy": {"steps": [50, 100], "interval_s": 3600}}
    async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=body) as resp:
        assert resp.status == 200, await resp.text()
    route = router.rollouts.route("chat")
    assert (route.phase, route.weight, route.admitted) == ("idle", 0.0, "")  # waits for a verified decision
    assert route.stable.release == "r1"
