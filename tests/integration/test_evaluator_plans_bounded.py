"""The online evaluator's memory is bounded whatever an application sends, on the embedded runtime as `lockgate up`
runs it: an application's own NATS user (the official SDK) sends events naming made-up deployments, and the
evaluator keeps at most PLANS_MAX per-deployment plans, while a deployment in use keeps scoring by its own.

Before, the evaluator kept the plan of every deployment name an event carried, for good: one per made-up name."""

from __future__ import annotations

import pytest

from lockgate.config import Settings
from lockgate.server.runtime import Runtime
from lockgate.services.evaluator import online_handler
from tests.integration.test_drift_cap import _credential, _send

pytestmark = pytest.mark.timeout(120)


async def test_made_up_deployments_leave_the_evaluator_at_most_plans_max_plans(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(online_handler, "PLANS_MAX", 8)  # the default's 256 names take longer to send, alike
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", online_eval_sample=1.0),
                      services=["sink", "gateway", "evaluator", "gatekeeper"])
    await runtime.start()
    try:
        online = runtime.services["evaluator"].online
        secret = await _credential(runtime, "shop")
        names = [f"junk-{i}" for i in range(40)]
        await _send(runtime, secret, names)
        await online.scored.wait_for(len(names), 30)  # every event scored (sample 1.0): every name's plan read
        held = set(online.plans._cache)
        assert len(held) == 8 and held == set(names[-8:])  # before: 40, one per name
    finally:
        await runtime.stop()
