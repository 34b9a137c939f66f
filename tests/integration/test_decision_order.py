"""The order of a release's decisions for the SDK, on the embedded runtime as `lockgate up` runs it (the gatekeeper
deciding, the gateway answering the shared `app` user's reads). Found by a probe: the SDK ordered a release's
decisions by the time the gatekeeper signed into each, so a person's reject made by a gatekeeper replica whose
clock runs behind (NTP off by a minute, a VM resumed) carried a time before the PASS it replaced: `decision()`
raised StaleDecision and `decisions()` skipped the BLOCK, and a subscriber kept acting on the PASS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import msgspec
import pytest

from lockgate import credentials
from lockgate.cli.gate import request_review
from lockgate.client import Client, StaleDecision
from lockgate.codec import encode
from lockgate.config import Settings
from lockgate.contracts import GateDecided
from lockgate.server.runtime import Runtime
from lockgate.signing import Signer, trust_file_path
from lockgate.subjects import token
from tests.helpers import person, store_pass
from tests.integration.test_gate_flow import completed, finish_eval, register_policy, register_release

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"),
                      services=["sink", "query", "gateway", "gatekeeper"])
    await runtime.start()
    yield runtime
    await runtime.stop()


def _app_client(runtime: Runtime) -> Client:
    """The SDK as an application runs it: the shared `app` NATS user, reading through the gateway."""
    auth = credentials.for_identity(runtime.settings, "app")
    return Client(runtime.settings.nats_url, prefix=runtime.settings.prefix, app="shop",
                  user=auth.user or "app", password=auth.password or "",
                  trust_file=str(trust_file_path(runtime.settings)))


def _clock_behind(monkeypatch: pytest.MonkeyPatch, signer: Signer, by: timedelta) -> None:
    """The gatekeeper's decisions from now on stamped as a replica whose clock runs `by` behind stamps them (a
    decision's time is its maker's clock, taken when it is made: nothing else of the gatekeeper reads it)."""
    sign = signer.sign

    def behind(decision: GateDecided) -> GateDecided:
        return sign(msgspec.structs.replace(decision, time=decision.time - by))

    monkeypatch.setattr(signer, "sign", behind)


async def test_a_reject_signed_by_a_gatekeeper_whose_clock_runs_behind_reaches_subscribers(
        stack: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    bus, settings = stack.ctx.bus, stack.settings
    policy = await register_policy(bus)
    await register_release(bus, "v1", "p1")
    await store_pass(bus, "v1", settings)  # the baseline
    arts = await register_release(bus, "v2", "p1")  # same prompt as the baseline: nothing to review, a PASS
    async with _app_client(stack) as client:
        watch: Any = client.decisions("v2")
        try:
            await finish_eval(bus, completed("v2", policy, em=0.9, em_ci=(0.88, 0.92), diff=0.0,
                                             diff_ci=(-0.01, 0.01), n=2000, artifacts=arts))
            passed = await asyncio.wait_for(anext(watch), 30)
            assert (passed.release, passed.decision) == ("v2", "PASS")
            assert await client.decision("v2") == passed

            # The replica that takes the reject runs a minute behind the one that made the PASS.
            _clock_behind(monkeypatch, stack.services["gatekeeper"].handlers.signer, timedelta(minutes=1))
            ann = person(settings, "ann", "approver")
            blocked = await request_review(bus, "v2", "reject", ann, "leaks customer names", timeout_s=20)
            assert blocked.decision == "BLOCK" and blocked.time < passed.time

            # Before: StaleDecision ("is older than decision <the PASS>"), and the watch skipped the BLOCK.
            assert await client.decision("v2") == blocked
            assert await asyncio.wait_for(anext(watch), 30) == blocked
            assert client.rejected_decisions == 0
            assert blocked.seq > passed.seq > 0  # ordered by what it was stored over, under the signature
        finally:
            await watch.aclose()

        # The PASS handed back (its bytes put back in KV, as a holder of the admin identity or a lost write could):
        # still a superseded decision to this client.
        gates = await bus.kv(bus.subjects.kv_gates)
        await gates.put(token("v2"), encode(passed))
        with pytest.raises(StaleDecision, match=f"decision {passed.id} .* is older than decision {blocked.id}"):
            await client.decision("v2")

        # The key deleted (an operator's `nats kv del`), the release decided again: ordered above the delete marker,
        # so above every decision of the release before, and taken by a client that read one of them.
        await gates.delete(token("v2"))
        again: Any = client.decisions("v2")
        try:
            await finish_eval(bus, msgspec.structs.replace(
                completed("v2", policy, em=0.9, em_ci=(0.88, 0.92), diff=0.0, diff_ci=(-0.01, 0.01), n=2000,
                          artifacts=arts), run_id="run-v2-again"))
            decided = await asyncio.wait_for(anext(again), 30)
        finally:
            await again.aclose()
        assert decided.eval_run == "run-v2-again" and decided.seq > blocked.seq
        assert decided.decision != "PASS"  # the reject still binds its content
        assert await client.decision("v2") == decided


async def test_a_block_decided_after_the_gates_bucket_was_made_anew_reaches_subscribers(stack: Runtime) -> None:
    # Found by a probe (p39 F2): the gates bucket made anew (a lost store, a restore from a backup) numbers from 1 and
    # holds nothing of the release, so the gatekeeper signed its next decision seq 1, below the PASS a subscriber had
    # read: `decision()` raised StaleDecision for the genuine BLOCK and `decisions()` skipped it, keeping the PASS.
    bus, settings = stack.ctx.bus, stack.settings
    policy = await register_policy(bus)
    await register_release(bus, "v1", "p1")
    await store_pass(bus, "v1", settings)  # the baseline
    arts = await register_release(bus, "v2", "p1")
    async with _app_client(stack) as client:
        watch: Any = client.decisions("v2")
        try:
            # Passed twice: the current PASS is stored over the first, so a gatekeeper of before signed it seq 3.
            for run in ("run-v2", "run-v2-again"):
                await finish_eval(bus, msgspec.structs.replace(
                    completed("v2", policy, em=0.9, em_ci=(0.88, 0.92), diff=0.0, diff_ci=(-0.01, 0.01), n=2000,
                              artifacts=arts), run_id=run))
                passed = await asyncio.wait_for(anext(watch), 30)
                assert (passed.decision, passed.eval_run) == ("PASS", run)

            # The store is lost: the gates bucket is made anew, as a restarted stack declares it.
            await bus.js.delete_key_value(bus.subjects.kv_gates)
            await bus.ensure_topology()
            # A run of v2 that regressed: the gatekeeper decides it over an empty key.
            await finish_eval(bus, msgspec.structs.replace(
                completed("v2", policy, em=0.78, em_ci=(0.75, 0.81), diff=-0.12, diff_ci=(-0.15, -0.09), n=400,
                          artifacts=arts), run_id="run-v2-regressed"))

            # Before: skipped (rejected_decisions 1), and StaleDecision ("(BLOCK, seq 1) is older than ... seq 3").
            blocked = await asyncio.wait_for(anext(watch), 30)
            assert (blocked.decision, blocked.eval_run) == ("BLOCK", "run-v2-regressed")
            assert blocked.seq > passed.seq
            assert await client.decision("v2") == blocked
            assert client.rejected_decisions == 0
        finally:
            await watch.aclose()

        # The PASS handed back into the new bucket is still a superseded decision to this client.
        await (await bus.kv(bus.subjects.kv_gates)).put(token("v2"), encode(passed))
        with pytest.raises(StaleDecision, match=f"decision {passed.id} .* is older than decision {blocked.id}"):
            await client.decision("v2")
