"""One bad event in an application's JSON array, published over NATS with its per-application credential through the
relay (probe p72 F1): it is lettered alone with its `$[i]` reason, whatever the contract says it broke, and its valid
neighbours are stored once, billed once and counted by drift (before, all but a tenant or time refusal lettered the
whole array, and its valid events were neither stored nor billed)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from lockgate.codec import encode
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.server.runtime import Runtime
from tests.helpers import eventually, run_cli

pytestmark = pytest.mark.timeout(120)

BAD = 4  # the index of the bad event in each array
# What a bad event breaks, and the end of its letter's reason.
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "tokens over uint32": ({"input_tokens": 2**32}, "- at `$[4].input_tokens`"),
    "nested attribute": ({"attributes": {"k": {"x": "y"}}}, "- at `$[4].attributes[...]`"),
    "unknown type": ({"type": "lockgate.nope"}, "- at `$[4].type`"),
    "deployment off the grammar": ({"deployment": "web app"}, "- at `$[4].deployment`"),
    "invalid UTF-8": ({"prompt": "@@NOT-UTF8@@"}, "- at `$[4]`"),
}


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"),
                      services=["sink", "gateway", "gatekeeper", "cost", "drift"])
    await runtime.start()
    yield runtime
    await runtime.stop()


def _array(events: list[InferenceEvent], bad: dict[str, Any]) -> bytes:
    """The events' JSON array with the one at BAD changed by `bad` (a prompt of `@@NOT-UTF8@@` becomes a lone 0xff)."""
    items = json.loads(encode(events))
    items[BAD].update(bad)
    return json.dumps(items).encode().replace(b"@@NOT-UTF8@@", b"\xff")


async def test_a_bad_event_of_an_array_is_lettered_alone_and_its_neighbours_are_stored_and_billed_once(
        stack: Runtime) -> None:
    created = await run_cli(stack, "app-credential", "create", "--tenant", "acme", "--app", "web", "--json")
    assert created.exit_code == 0, created.output
    cred = json.loads(await asyncio.to_thread(Path(json.loads(created.output)["file"]).read_text))
    bus, s = stack.ctx.bus, stack.ctx.bus.subjects

    def events(n: int, **fields: Any) -> list[InferenceEvent]:
        return [InferenceEvent(tenant="acme", app="web", deployment="web", release="web-v1", model="m",
                               input_tokens=3, output_tokens=2, **fields) for _ in range(n)]

    messages = {name: (events(10), bad, why) for name, (bad, why) in CASES.items()}
    valid = {e.id for sent, _, _ in messages.values() for i, e in enumerate(sent) if i != BAD}
    # Id-less events (ids derived from the message) with a bad one at 4 and one whose id reads as a key at 7 (the scrub
    # refuses it): both are lettered under their own index among all ten, the eight others stored under one id each.
    idless = [{k: v for k, v in item.items() if k != "id"} for item in json.loads(encode(events(10)))]
    idless[BAD]["input_tokens"] = -1
    idless[7]["id"] = "sk-proj-" + "Ab3" * 16
    dead = await bus.nc.subscribe(s.dlq_all)
    nc = await nats.connect(stack.settings.nats_url, user=cred["user"], password=cred["password"],
                            inbox_prefix=f"_INBOX.{cred['user']}", allow_reconnect=False)
    try:
        for sent, bad, _ in messages.values():
            ack = await nc.request(s.ingest("web", "acme"), _array(sent, bad), timeout=10)
            assert b'"seq"' in ack.data, ack.data
        ack = await nc.request(s.ingest("web", "acme"), json.dumps(idless).encode(), timeout=10)
        assert b'"seq"' in ack.data, ack.data
    finally:
        await nc.close()

    letters: dict[str, dict[str, Any]] = {}  # by error: one letter per message, whoever sends it
    while len(letters) < len(messages) + 1:
        letter = json.loads((await dead.next_msg(timeout=30)).data)
        letters[letter["error"]] = letter
    assert {letter["reason"] for letter in letters.values()} == {"invalid event"}
    # Each letter holds its bad events only (before: the whole array of ten).
    held = {e: len(msgspec.json.decode(base64.b64decode(letter["payload"]), type=list[msgspec.Raw]))
            for e, letter in letters.items()}
    assert held == {e: 2 if "credential" in e else 1 for e in letters}, held
    for name, (_, _, why) in messages.items():
        assert [e for e in letters if e.endswith(why)], (name, why, "\n".join(letters))
    mixed = next(e for e in letters if "credential" in e)
    assert mixed.startswith("Expected `int` >= 0 - at `$[4].input_tokens`; ") and mixed.endswith("- at `$[7].id`"), mixed

    store, sink = stack.ctx.store, stack.services["sink"].handlers
    total = len(valid) + 8
    await eventually(lambda: store.scalar("SELECT count() FROM cost_ledger WHERE tenant = 'acme'") == total,
                     [sink.progress("cost_ledger")], what=f"{total} ledger entries")
    stored = [r["id"] for r in store.rows("SELECT id FROM inference_events WHERE tenant = 'acme'")]
    billed = [r["event_id"] for r in store.rows("SELECT event_id FROM cost_ledger WHERE tenant = 'acme'")]
    assert len(stored) == len(set(stored)) == total and sorted(billed) == sorted(stored)
    assert valid <= set(stored)
    await stack.services["drift"].handlers.events.wait_for(total, 30)
