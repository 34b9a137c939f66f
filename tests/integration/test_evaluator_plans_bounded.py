"""The online evaluator's memory is bounded whatever an application sends, on the embedded runtime as `lockgate up`
runs it: an application's own NATS user (the official SDK) sends events naming made-up deployments, and the
evaluator keeps no plan for any of them (a deployment without an applied document is known from the listing of the
documents' keys, `Plans._documented`; those with one keep at most PLANS_MAX plans).

Before, the evaluator kept the plan of every deployment name an event carried, for good: one per made-up name; then
(probe p55 F1) the 256 it used last, each other name read again at its next event."""

from __future__ import annotations

import pytest

from lockgate.config import Settings
from lockgate.server.runtime import Runtime
from tests.integration.test_drift_cap import _credential, _send

pytestmark = pytest.mark.timeout(120)


async def test_made_up_deployments_leave_the_evaluator_no_plan(settings: Settings) -> None:
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", online_eval_sample=1.0),
                      services=["sink", "gateway", "evaluator", "gatekeeper"])
    await runtime.start()
    try:
        online = runtime.services["evaluator"].online
        secret = await _credential(runtime, "shop")
        names = [f"junk-{i}" for i in range(40)]
        await _send(runtime, secret, names)
        await online.scored.wait_for(len(names), 30)  # every event scored (sample 1.0), by the global plan
        assert set(online.plans._cache) == set()  # before: 40, one per name
    finally:
        await runtime.stop()
