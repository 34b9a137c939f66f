"""The evaluator sends an allow-listed endpoint's credential (issue 8): the online judge on a keyed endpoint
(the simulator answering 401 without the right bearer) scores with the key configured, gives an error
outcome with a wrong or missing one (never a score, never a call without it); an offline eval run naming an
endpoint id gets its key, a plain URL none. The key appears in no event, no stored row and no log line."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from lockgate import artifacts
from lockgate.codec import Codec
from lockgate.contracts import EvalCompleted, EvalRequested
from lockgate.ids import uuid7
from lockgate.server.service import ServiceContext
from lockgate.store import Store
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.integration.test_online_eval_config import _judge_answers, _scores, _until

pytestmark = pytest.mark.timeout(120)
KEY = "sk-judge-" + secrets.token_hex(24)  # what the operator configured and the simulator requires
JUDGE_REPLY = '{"score": 0.75, "reason": "mostly right"}'


@pytest.fixture
async def keyed() -> AsyncIterator[SimServer]:
    """An upstream that answers only requests carrying KEY, as a provider does."""
    config = SimConfig(models={"judge-m": ModelSpec(default=JUDGE_REPLY), "m": ModelSpec(default="Paris")},
                       require_key=KEY)
    async with SimServer(config) as sim:
        yield sim


def _configure(context: ServiceContext, tmp_path: Path, url: str, secret: str | None) -> None:
    """Endpoint `judge` with credential JUDGE_KEY, held (as `secret`) in the secrets file, or absent."""
    (tmp_path / "endpoints.yaml").write_text(f"endpoints:\n  judge: {{url: '{url}', credential: JUDGE_KEY}}\n")
    (tmp_path / "secrets.yaml").write_text("" if secret is None else f"JUDGE_KEY: {secret}\n")
    context.settings = context.settings.replace(endpoints_file=str(tmp_path / "endpoints.yaml"),
                                                secrets_file=str(tmp_path / "secrets.yaml"))


@pytest.fixture
async def published(context: ServiceContext) -> AsyncIterator[list[bytes]]:
    """Every message published under the test's prefix (events, scores, spans, dead letters), with headers."""
    seen: list[bytes] = []

    async def on(msg: Any) -> None:
        seen.append(msg.data + repr(msg.headers).encode())

    sub = await context.bus.nc.subscribe(f"{context.bus.subjects.prefix}.>", cb=on)
    yield seen
    await sub.unsubscribe()


async def _stored_everywhere(url: str, store: Store) -> str:
    """Every message kept by the server (streams and KV buckets) and every row of the test's database."""
    parts: list[str] = []
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1 if info.state.messages else 0):
                try:
                    msg = await js.get_msg(info.config.name, seq)
                except nats.js.errors.NotFoundError:
                    continue
                parts.append((msg.data or b"").decode("utf-8", "replace") + repr(msg.headers))
    finally:
        await nc.close()
    for table in [r["name"] for r in store.rows("SELECT name FROM system.tables WHERE database = currentDatabase()")]:
        parts.append(repr(store.rows(f"SELECT * FROM {table}")))
    return "\n".join(parts)


@pytest.mark.parametrize("secret", ["right", "wrong", "missing"])
async def test_the_online_judge_sends_its_endpoints_credential_and_never_calls_without_it(
        secret: str, context: ServiceContext, run_services: Any, tmp_path: Path, keyed: SimServer, store: Store,
        published: list[bytes], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    configured = {"right": KEY, "wrong": "sk-judge-" + secrets.token_hex(24), "missing": None}[secret]
    _configure(context, tmp_path, keyed.url, configured)
    evaluator, sink, events = await _judge_answers(context, run_services, tmp_path, 3)
    await evaluator.online.judged.wait_for(3, timeout_s=60)
    rows = await _until(context, [sink.handlers.facts["inference_scores"].stored],
                        lambda rs: bool(rs) and rs[0]["scored"] + rs[0]["errors"] == 3, "three judge outcomes stored",
                        scorer="llm_judge")

    if secret == "right":
        assert (rows[0]["scored"], rows[0]["mean"], rows[0]["errors"]) == (3, 0.75, 0)
        assert keyed.authorizations == [f"Bearer {KEY}"] * 3 and keyed.unauthorized == 0
    else:  # an error outcome, never a score: the analysis reads it as an error (INCONCLUSIVE), not a low score
        assert (rows[0]["scored"], rows[0]["mean"], rows[0]["errors"]) == (0, None, 3)
        (row,) = _scores(context, event_id=events[0].id, scorer="llm_judge")
        assert row["value"] is None
        if secret == "wrong":
            assert row["error"].startswith("judge endpoint judge: HTTP 401"), row
            assert keyed.unauthorized >= 3 and keyed.total_requests == 0
        else:  # nothing was sent anywhere without the credential
            assert row["error"] == ("credential 'JUDGE_KEY' of endpoint 'judge' is neither an environment variable "
                                    "nor an entry of the secrets file (settings.secrets_file)")
            assert keyed.unauthorized == 0 and keyed.total_requests == 0
    assert evaluator.online.judge_errors.count == (0 if secret == "right" else 3)

    # The key is in no published message, nothing the server or ClickHouse kept, and no log line.
    if configured is not None:
        assert published and not [m for m in published if configured.encode() in m]
        assert configured not in await _stored_everywhere(context.settings.nats_url, store)
        assert configured not in caplog.text


async def _eval(context: ServiceContext, run_services: Callable[..., Any], endpoint: str) -> EvalCompleted:
    judge = {"name": "llm_judge", "weight": 1, "params": {"model": "judge-m", "rubric": "Is it right?", "n": 1}}
    suite = (await artifacts.register(context.bus, "eval_suite", "keyed", {
        "name": "keyed", "prompt": {"template": "{input}"}, "scorers": ["exact_match", judge],
        "dataset": [{"id": f"c{i}", "input": f"capital {i}?", "expected": "Paris"} for i in range(3)]})).hash
    got: asyncio.Queue[EvalCompleted] = asyncio.Queue()
    codec: Codec[EvalCompleted] = Codec(EvalCompleted)

    async def on(msg: Any) -> None:
        await got.put(codec.decode(msg.data))

    sub = await context.bus.nc.subscribe(context.bus.subjects.eval_completed, cb=on)
    req = EvalRequested(run_id=uuid7(), release="cand", suite=suite, endpoint=endpoint, model="m", timeout_s=5.0,
                        cache=False)
    await context.bus.publish(context.bus.subjects.eval_requested, req)
    try:
        async with asyncio.timeout(60):
            while (done := await got.get()).run_id != req.run_id:
                continue
    finally:
        await sub.unsubscribe()
    return done


async def test_an_eval_run_naming_an_endpoint_id_gets_its_credential_and_a_plain_url_none(
        context: ServiceContext, run_services: Any, tmp_path: Path, keyed: SimServer,
        published: list[bytes], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _configure(context, tmp_path, keyed.url, KEY)
    await run_services("sink", "query", "evaluator")  # a run reads its stored cases through the query service

    listed = await _eval(context, run_services, "judge")  # the suite's judge uses the run's endpoint too
    assert (listed.status, listed.n_errors, listed.metrics["exact_match"]) == ("completed", 0, 1.0)
    assert listed.metrics["llm_judge"] == 0.75 and listed.environment["endpoint"] == "judge"
    assert keyed.requests == {"m": 3, "judge-m": 3} and set(keyed.authorizations) == {f"Bearer {KEY}"}

    # A URL is called as given, without any credential: this upstream refuses it, each case says so.
    by_url = await _eval(context, run_services, keyed.url)
    assert by_url.n_errors == 3 and "HTTP 401" in by_url.error and keyed.unauthorized == 3

    # An id outside the allow-list is a failed run naming it, with no call.
    unknown = await _eval(context, run_services, "elsewhere")
    assert unknown.status == "failed" and unknown.error == "endpoint 'elsewhere' is not in the endpoint allow-list (judge)"
    assert keyed.unauthorized == 3 and keyed.requests == {"m": 3, "judge-m": 3}

    assert not [m for m in published if KEY.encode() in m] and KEY not in caplog.text
