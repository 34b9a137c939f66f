"""The evaluator's answer cache never crosses endpoints, credentials or tenants (probe p90 F1): two allow-listed
endpoints at one URL, one sending `OpenAI-Project: eu`, or each with its own credential, are asked afresh, as is
an endpoint whose credential changed, and a run of another tenant; the same run again is answered from the cache. The judge's replies are cached the
same way (the suite's judge calls the evaluated endpoint here)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from lockgate import artifacts
from lockgate.codec import Codec
from lockgate.contracts import EvalCompleted, EvalRequested
from lockgate.ids import uuid7
from lockgate.server.service import ServiceContext
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer

pytestmark = pytest.mark.timeout(120)
N = 4
KEY_A, KEY_B = ("sk-a-" + secrets.token_hex(24)), ("sk-b-" + secrets.token_hex(24))


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    config = SimConfig(models={"m": ModelSpec(default="Paris"),
                               "judge-m": ModelSpec(default='{"score": 1, "reason": "right"}')})
    async with SimServer(config) as server:
        yield server


def _configure(context: ServiceContext, tmp_path: Path, url: str) -> None:
    """Four endpoints at one URL: `us` and `eu` (its project `eu`), `a` and `b` (each its own credential)."""
    (tmp_path / "endpoints.yaml").write_text(
        "endpoints:\n"
        f"  us: {{url: '{url}'}}\n"
        f"  eu: {{url: '{url}', project: eu}}\n"
        f"  a: {{url: '{url}', credential: KEY_A}}\n"
        f"  b: {{url: '{url}', credential: KEY_B}}\n")
    (tmp_path / "secrets.yaml").write_text(f"KEY_A: {KEY_A}\nKEY_B: {KEY_B}\n")
    context.settings = context.settings.replace(endpoints_file=str(tmp_path / "endpoints.yaml"),
                                                secrets_file=str(tmp_path / "secrets.yaml"))


async def _eval(context: ServiceContext, suite: str, endpoint: str, tenant: str = "") -> EvalCompleted:
    got: asyncio.Queue[EvalCompleted] = asyncio.Queue()
    codec: Codec[EvalCompleted] = Codec(EvalCompleted)

    async def on(msg: Any) -> None:
        await got.put(codec.decode(msg.data))

    sub = await context.bus.nc.subscribe(context.bus.subjects.eval_completed, cb=on)
    req = EvalRequested(run_id=uuid7(), release="cand", suite=suite, endpoint=endpoint, model="m", timeout_s=5.0,
                        **({"tenant": tenant} if tenant else {}))
    await context.bus.publish(context.bus.subjects.eval_requested, req)
    try:
        async with asyncio.timeout(60):
            while (done := await got.get()).run_id != req.run_id:
                continue
    finally:
        await sub.unsubscribe()
    assert done.status == "completed" and done.n_errors == 0, done
    return done


async def _kv_text(context: ServiceContext) -> str:
    """Every key and value the eval cache bucket holds."""
    nc = await nats.connect(context.settings.nats_url)
    try:
        kv = await nc.jetstream().key_value(context.bus.subjects.kv_eval_cache)
        parts = []
        for key in await kv.keys():
            parts.append(key + (await kv.get(key)).value.decode("utf-8", "replace"))
        return "\n".join(parts)
    finally:
        await nc.close()


async def test_cached_answers_never_cross_endpoints_at_one_url_credentials_or_tenants(
        context: ServiceContext, run_services: Any, tmp_path: Path, sim: SimServer,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _configure(context, tmp_path, sim.url)
    await run_services("sink", "query", "evaluator")
    judge = {"name": "llm_judge", "weight": 1, "params": {"model": "judge-m", "rubric": "Is it right?", "n": 1}}
    suite = (await artifacts.register(context.bus, "eval_suite", "scoped", {
        "name": "scoped", "prompt": {"template": "{input}"}, "scorers": ["exact_match", judge],
        "dataset": [{"id": f"c{i}", "input": f"capital {i}?", "expected": "Paris"} for i in range(N)]})).hash

    us = await _eval(context, suite, "us")
    assert sim.requests == {"m": N, "judge-m": N} and "n_cached" not in us.metrics
    again = await _eval(context, suite, "us")  # the same request to the same endpoint: the cache answers
    assert sim.requests == {"m": N, "judge-m": N} and again.metrics["n_cached"] == N

    # Same URL, another OpenAI-Project: another endpoint's answers, asked afresh (probe p90 F1: 0 calls, us's reused).
    eu = await _eval(context, suite, "eu")
    assert sim.requests == {"m": 2 * N, "judge-m": 2 * N}, "endpoint eu was answered from us's cache entries"
    assert "n_cached" not in eu.metrics
    assert [h.get("OpenAI-Project") for h in sim.headers[-2 * N:]] == ["eu"] * (2 * N)

    # Same URL, another credential; and the same endpoint after its credential changed (another account).
    await _eval(context, suite, "a")
    await _eval(context, suite, "b")
    assert sim.requests == {"m": 4 * N, "judge-m": 4 * N}
    assert {h.get("Authorization") for h in sim.headers[-2 * N:]} == {f"Bearer {KEY_B}"}
    (tmp_path / "secrets.yaml").write_text(f"KEY_A: {KEY_B}\nKEY_B: {KEY_A}\n")
    await _eval(context, suite, "a")
    assert sim.requests == {"m": 5 * N, "judge-m": 5 * N}, "endpoint a was answered under its former credential"

    # Same endpoint, another tenant: never one tenant's answers for another.
    other = await _eval(context, suite, "us", tenant="acme")
    assert sim.requests == {"m": 6 * N, "judge-m": 6 * N} and "n_cached" not in other.metrics

    # The credential is only fingerprinted: neither key is in the cache bucket or a log line.
    held = await _kv_text(context)
    assert held and KEY_A not in held and KEY_B not in held
    assert KEY_A not in caplog.text and KEY_B not in caplog.text
