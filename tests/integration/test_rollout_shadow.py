"""Shadow rollouts on the real nats-server, chDB and the simulator: a sampled share of live requests is
mirrored to the candidate off the request path, users get only stable's answers, shadow events are
stored with variant "shadow" and compared with the served ones, and the budget caps the mirror."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from lockgate.cli.main import cli
from lockgate.signing import Signer
from lockgate.store import Store
from tests.helpers import eventually
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import _pass, _start

# The router stack of the analysis tests (simulated stable and canary upstreams, releases, signed decisions).
router, http, keys, signer = analysis_tests.router, analysis_tests.http, analysis_tests.keys, analysis_tests.signer
pytestmark = pytest.mark.timeout(120)
WIDE = {"max_rps": 10_000, "max_concurrency": 256}


async def _answers(http: aiohttp.ClientSession, router: Any, n: int, batch: int = 20) -> list[tuple[int, str, str]]:
    """(status, release, answer) of n requests from distinct users, a batch at a time."""
    url = f"{router.url}/v1/chat/completions"

    async def one(i: int) -> tuple[int, str, str]:
        body = {"model": "m", "messages": [{"role": "user", "content": f"question {i}"}], "user": f"user-{i}"}
        async with http.post(url, json=body) as resp:
            data = await resp.json()
            text = data["choices"][0]["message"]["content"] if resp.status == 200 else ""
            return resp.status, resp.headers["x-lockgate-release"], text

    out: list[tuple[int, str, str]] = []
    for start in range(0, n, batch):
        out += await asyncio.gather(*(one(i) for i in range(start, min(n, start + batch))))
    return out


async def _summary(http: aiohttp.ClientSession, router: Any) -> Any:
    async with http.get(f"{router.url}/lockgate/v1/deployments/chat/shadow") as resp:
        assert resp.status == 200
        return await resp.json()


async def test_shadow_mirrors_a_sampled_share_users_get_only_stable_answers(
        router: Any, http: aiohttp.ClientSession, signer: Signer, store: Store) -> None:
    await _start(http, router, "long", {"shadow": {"sample": 0.5, **WIDE}})
    await _pass(router, signer, "long")
    assert router.rollouts.route("chat").weight == 0.0
    answers = await _answers(http, router, 200)
    ok = [a for a in answers if a[0] == 200]
    assert len(ok) >= 190  # stable fails 0.5% of calls by design
    assert {(release, text) for _, release, text in answers} <= {("r1", "stable says hi"), ("r1", "")}
    assert all(text == "stable says hi" for _, _, text in ok)  # never the candidate's answer

    summary = await _summary(http, router)
    mirrored = summary["mirrored"]
    assert mirrored + summary["skipped"].get("not_sampled", 0) == 200 and set(summary["skipped"]) <= {"not_sampled"}
    assert 60 <= mirrored <= 140  # half of 200, give or take 4.5 standard deviations

    # every shadow call is an event with variant "shadow" for the candidate, paired with the served one
    summary = await router.rollouts.wait_for_shadow("chat", lambda s: s.pairs >= mirrored, timeout=30)
    assert summary.shadow_events == mirrored and summary.candidate == "long"
    assert summary.exact_match_rate is not None and summary.exact_match_rate < 0.05  # the candidate says otherwise
    assert summary.mean_length_delta is not None and summary.mean_length_delta > 0  # and says more

    def stored() -> dict[str, int]:
        rows = store.rows("SELECT variant, release, count() AS n FROM inference_events WHERE deployment = 'chat' "
                          "GROUP BY variant, release")
        return {f"{r['variant']}/{r['release']}": r["n"] for r in rows}

    await eventually(lambda: stored().get("shadow/long", 0) == mirrored and stored().get("stable/r1", 0) == 200,
                     [router.sink.handlers.events], what="shadow events stored")
    assert "canary/long" not in stored()

    # `rollout get` shows the comparison
    s = router.ctx.settings
    got = await asyncio.to_thread(CliRunner().invoke, cli, ["--home", s.home, "--nats", s.nats_url, "--prefix",
                                                           s.prefix, "rollout", "--router", router.url, "get", "chat"])
    assert got.exit_code == 0, got.output
    assert "shadow" in got.output and "exact match" in got.output


async def test_shadow_budget_caps_the_mirror_whatever_the_traffic(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    await _start(http, router, "same", {"shadow": {"sample": 1.0, "max_requests": 7, **WIDE}})
    await _pass(router, signer, "same")
    answers = await _answers(http, router, 60, batch=5)
    assert {release for _, release, _ in answers} == {"r1"}
    summary = await _summary(http, router)
    assert summary["mirrored"] == 7 and summary["skipped"] == {"over_max_requests": 53}
    paired = await router.rollouts.wait_for_shadow("chat", lambda s: s.shadow_events >= 7, timeout=30)
    assert paired.shadow_events == 7
    # promotion ends the mirror: the candidate now serves everyone, nothing is copied
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/promote") as resp:
        assert resp.status == 200
    await _answers(http, router, 20)
    assert (await _summary(http, router))["mirrored"] == 7
