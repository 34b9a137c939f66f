"""Secrets stay secret (issue 7, item 7): one secret of each format is planted in a router request
(prompt, body fields, headers), an SDK event (attributes, session id) and a malformed message that
is dead-lettered with credential headers; afterwards none is found on the bus (every stream, KV
buckets included), in dead letters, spans, logs or any ClickHouse table."""

from __future__ import annotations

import asyncio
import logging
import secrets
import string
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import nats
import pytest

from lockgate.client import Client
from lockgate.config import Settings
from lockgate.redact import scrub_secrets
from lockgate.server.apikeys import bootstrap
from lockgate.server.service import ServiceContext
from lockgate.store import Store
from lockgate.telemetry import NatsSpanExporter, Telemetry
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer

pytestmark = pytest.mark.timeout(90)

_ALNUM = string.ascii_letters + string.digits


def _r(n: int, alphabet: str = _ALNUM) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def planted() -> dict[str, tuple[str, str]]:
    """format -> (text as a user would paste it, the secret part that must never be stored)."""
    out: dict[str, tuple[str, str]] = {}

    def add(name: str, text: str, secret: str | None = None) -> None:
        out[name] = (text, secret or text)

    add("openai sk-", "sk-" + _r(48))
    add("openai sk-proj-", "sk-proj-" + _r(40) + "_" + _r(20))
    add("anthropic sk-ant-", "sk-ant-api03-" + _r(93) + "-" + _r(6))
    add("stripe sk_live_", "sk_live_" + _r(24))
    add("google AIza", "AIza" + _r(35))
    add("aws access key id", "AKIA" + _r(16, string.ascii_uppercase + string.digits))
    aws_secret = _r(10) + "/" + _r(14) + "+" + _r(14)
    add("aws secret key", f"aws_secret_access_key = {aws_secret}", aws_secret)
    add("aws secret key alone", aws_secret[::-1])  # mixed case and digits, no keyword around it
    basic = _r(24) + "=="
    add("basic auth", f"Authorization: Basic {basic}", basic)
    db_password = _r(18)
    add("password in a database url", f"postgresql://app:{db_password}@db.internal:5432/prod", db_password)
    pem_body = "MII" + _r(61)
    add("pem private key", f"-----BEGIN RSA PRIVATE KEY-----\n{pem_body}\n{_r(64)}\n-----END RSA PRIVATE KEY-----",
        pem_body)
    add("github_pat_", "github_pat_11" + _r(20) + "_" + _r(59))
    add("github ghp_", "ghp_" + _r(36))
    add("slack xox", "xoxb-" + _r(12, string.digits) + "-" + _r(13, string.digits) + "-" + _r(24))
    add("jwt", "eyJhbGciOiJIUzI1NiJ9." + "eyJ" + _r(30) + "." + _r(43))
    bearer = _r(32)
    add("bearer token", f"Bearer {bearer}", bearer)
    add("lockgate api key", "lg-" + _r(43, string.ascii_letters + string.digits + "-_"))  # apikeys.PREFIX
    # LLM providers' and their tools' keys, in the shapes they issue (probe p10 found each one kept whole)
    hexdigits = "0123456789abcdef"
    add("groq gsk_", "gsk_" + _r(52))
    add("xai xai-", "xai-" + _r(80))
    add("perplexity pplx-", "pplx-" + _r(48))
    add("replicate r8_", "r8_" + _r(37))
    add("fireworks fw_", "fw_" + _r(24))
    add("langsmith lsv2_pt_", f"lsv2_pt_{_r(32, hexdigits)}_{_r(10, hexdigits)}")
    add("pinecone pcsk_", f"pcsk_{_r(5)}_{_r(64)}")
    add("databricks dapi", "dapi" + _r(32, hexdigits))
    add("tavily tvly-", "tvly-dev-" + _r(32))
    subscription = _r(32, hexdigits)
    add("azure apim header", f"Ocp-Apim-Subscription-Key: {subscription}", subscription)
    return out


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(SimConfig(models={"m": ModelSpec(default="noted")})) as s:
        yield s


async def test_no_planted_secret_is_stored_anywhere(
    context: ServiceContext, run_services: Any, sim: SimServer, settings: Settings, store: Store,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets_ = planted()
    texts = [text for text, _ in secrets_.values()]
    everything = "\n".join(texts)
    # passthrough: the request reaches the simulator as sent, with everything a client could put in it
    context.settings = context.settings.replace(stable_upstream=sim.url, canary_upstream=sim.url,
                                                deployment="chat", app="shop", passthrough=True)
    # Spans go to the bus (and so to the sink and otel_traces) only when force_flush ships them.
    context.telemetry = Telemetry(exporter=NatsSpanExporter(context.bus, asyncio.get_running_loop()),
                                  schedule_delay_ms=600_000)
    svcs = await run_services("router", "sink")
    router, sink = svcs["router"], svcs["sink"]

    # 1. A router request: every secret in the prompt, credentials in headers and body fields.
    body = {"model": "m", "messages": [{"role": "system", "content": texts[0]},
                                       {"role": "user", "content": f"please keep these safe:\n{everything}"}],
            "user": texts[1], "metadata": {"api_key": texts[2], "note": everything}}
    # The lockgate key the client presents is a secret too: it must not be stored or forwarded either.
    app_key = bootstrap(context.settings.home, tenant="acme", app="shop").app_key
    secrets_["lockgate api key"] = (app_key, app_key)
    headers = {"Authorization": f"Bearer {app_key}", "X-Api-Key": texts[3],
               "Proxy-Authorization": f"Bearer {secrets_['bearer token'][1]}",
               "Cookie": f"session={texts[4]}", "x-lockgate-user": texts[5]}
    async with aiohttp.ClientSession() as http, \
            http.post(f"{router.url}/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200

    # 2. An SDK event: secrets in attribute keys and values, the session id, prompt and response.
    async with Client(settings.nats_url, prefix=settings.prefix, app="shop") as client:
        attributes = {name.replace(" ", "_"): text for name, (text, _) in secrets_.items()}
        attributes.update({"api_key": texts[6], "X-Api-Key": texts[7], texts[8]: "key named by a secret"})
        client.emit(prompt=everything, response=everything, session_id=texts[9], attributes=attributes)
        client.emit(prompt="hi", session_id=secrets_["jwt"][0], attributes={"authorization": texts[10]})
        await client.flush()

    # 3. A malformed message with credential headers: dead-lettered by the sink.
    poison = ("{not json " + everything).encode()
    await context.bus.publish(context.bus.subjects.inference("shop"), poison, msg_id="poison-" + _r(8),
                              headers={"X-Api-Key": texts[11], "Authorization": f"Basic {secrets_['basic auth'][1]}",
                                       "api-key": texts[12], "Proxy-Authorization": texts[13],
                                       "X-Note": everything.replace("\n", " ")})

    await sink.handlers.events.wait_for(3)
    await sink.handlers.dead_letters.wait_for(1)
    assert await asyncio.to_thread(context.telemetry.force_flush)  # the router's and sink's spans
    await sink.handlers.spans.wait_for(1)

    found: dict[str, list[str]] = {}

    def search(where: str, blob: str) -> None:
        for name, (_, secret) in secrets_.items():
            if secret in blob:
                found.setdefault(name, []).append(where)

    # Every message of every stream on the server: events, spans, dead letters, KV buckets.
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        streams = await js.streams_info()
        assert any(s.config.name.startswith("KV_") for s in streams)  # the KV buckets are searched too
        for info in streams:
            if not info.state.messages:
                continue
            for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
                try:
                    msg = await js.get_msg(info.config.name, seq)
                except nats.js.errors.NotFoundError:
                    continue
                search(f"stream {info.config.name}", (msg.data or b"").decode("utf-8", "replace"))
                search(f"headers in {info.config.name}", repr(msg.headers))
    finally:
        await nc.close()

    # Every ClickHouse table of this test's database, spans (otel_traces) and dead letters included.
    tables = [r["name"] for r in store.rows("SELECT name FROM system.tables WHERE database = currentDatabase()")]
    for table in tables:
        search(f"ClickHouse {table}", repr(store.rows(f"SELECT * FROM {table}")))
    assert store.scalar("SELECT count() FROM dead_letters") >= 1
    assert store.scalar("SELECT count() FROM otel_traces") >= 1
    assert store.scalar("SELECT count() FROM inference_events WHERE session_id != ''") == 2

    search("logs", caplog.text)
    await context.telemetry.shutdown()
    assert not found, f"secrets stored verbatim: {found}"

    # The flow still carries what is not secret: the marker shows where a secret was.
    letter = store.rows("SELECT payload, headers FROM dead_letters")[0]
    assert letter["headers"]["X-Api-Key"] == "[REDACTED]" and "[REDACTED]" in letter["payload"]
    sdk_row = store.rows("SELECT attributes FROM inference_events WHERE session_id LIKE '%REDACTED%' "
                         "AND prompt != 'hi'")[0]
    assert sdk_row["attributes"]["api_key"] == "[REDACTED]"


def test_context_words_survive_and_plain_text_is_untouched() -> None:
    # Scrubbing must not eat ordinary text: hex digests, prose about passwords, URLs without one.
    for text in ("sha1 2fd4e1c67a2d28fced849ee1bb76e7391b93eb12", "how do I reset my password?",
                 "see https://example.com/a?b=1 and http://user@host/", "max tokens is 4096"):
        assert scrub_secrets(text) == text
    assert scrub_secrets("postgres://app:hunter22@db/x") == "postgres://app:[REDACTED]@db/x"
    assert scrub_secrets("password = correct-horse") == "password = [REDACTED]"
