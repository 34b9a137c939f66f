"""Large garbage from an application's own NATS user, on the embedded runtime as `lockgate up` runs it (probe p16
F3): a dead letter's payload is scrubbed off the event loop every service shares, and once per message even when
its letter waits for a redelivery; valid events sent between the garbage are all stored."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
from collections import Counter
from pathlib import Path

import nats
import pytest

from lockgate import bus as bus_module
from lockgate.bus import MAX_LETTER_PAYLOAD, Bus
from lockgate.codec import encode
from lockgate.contracts import InferenceEvent
from lockgate.errors import BusUnavailable
from lockgate.server.runtime import Runtime
from tests.helpers import eventually, run_cli
from tests.integration.test_app_credentials import stack  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(120)

# How long the first scrub waits for the concurrent request: only a guard against a deadlock (the request cannot
# be answered while the scrub holds the loop), not a measure of anything.
_GUARD_S = 10.0




async def test_large_garbage_is_scrubbed_off_the_loop_once_and_holds_back_no_event(
        stack: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    created = await run_cli(stack, "app-credential", "create", "--tenant", "acme", "--app", "shop", "--json")
    assert created.exit_code == 0, created.output
    secret = json.loads(await asyncio.to_thread(Path(json.loads(created.output)["file"]).read_text))
    s, sink, loop = stack.ctx.bus.subjects, stack.services["sink"].handlers, asyncio.get_running_loop()

    # The first large scrub waits until a request made on the loop meanwhile is answered: on the loop, it would wait
    # for itself (until the guard runs out).
    scrubbing, answered, held = asyncio.Event(), threading.Event(), []
    scrubs: Counter[str] = Counter()
    real_scrub = bus_module.scrub_bytes

    def gated_scrub(data: bytes) -> bytes:
        if len(data) >= 64 * 1024:
            scrubs[hashlib.sha256(data).hexdigest()] += 1
            if not scrubbing.is_set():
                loop.call_soon_threadsafe(scrubbing.set)
                if not answered.wait(_GUARD_S):
                    held.append(threading.current_thread().name)
        return real_scrub(data)

    monkeypatch.setattr(bus_module, "scrub_bytes", gated_scrub)
    # Each original's first put fails as under load (TimeoutError): its message comes back for its letter.
    refused_once: set[str] = set()
    real_keep = Bus.keep_original

    async def keep_once_refused(self: Bus, name: str, data: bytes) -> str:
        if name not in refused_once:
            refused_once.add(name)
            raise BusUnavailable(f"cannot keep the original of a dead letter as {name}: TimeoutError()")
        return await real_keep(self, name, data)

    monkeypatch.setattr(Bus, "keep_original", keep_once_refused)

    async def concurrent_request() -> None:
        await scrubbing.wait()
        gates = await stack.ctx.bus.kv(s.kv_gates)
        await gates.put("probe", b"1")
        assert (await gates.get("probe")).value == b"1"
        answered.set()

    request = asyncio.create_task(concurrent_request())
    nc = await nats.connect(stack.settings.nats_url, user=secret["user"], password=secret["password"],
                            allow_reconnect=False, connect_timeout=5, inbox_prefix=f"_INBOX.{secret['user']}")
    garbage = [random.Random(i).randbytes(900_000) for i in range(3)]
    try:
        js = nc.jetstream()
        for i, body in enumerate(garbage):
            valid = [InferenceEvent(app="shop", tenant="acme", session_id=f"v{i}-{j}") for j in range(2)]
            await js.publish(s.ingest("shop", "acme"), encode(valid), timeout=30)
            await js.publish(s.ingest("shop", "acme"), body, timeout=30)
        await sink.events.wait_for(6)
        # Each original's letter stored (a count of letters includes a redelivery's repeat of one, stored once: a
        # ci-local run counted 3 letters with 2 stored).
        await eventually(lambda: stack.ctx.store.scalar("SELECT uniqExact(original) FROM dead_letters") == 3,
                         [sink.dead_letters], what="3 originals' dead letters stored")
    finally:
        await nc.close()
    await asyncio.wait_for(request, _GUARD_S)

    assert held == [], "the scrub held the event loop: the concurrent request waited for it"
    assert stack.ctx.store.scalar("SELECT count() FROM inference_events") == 6
    letters = stack.ctx.store.rows("SELECT reason, error, original, deliveries FROM dead_letters")
    assert len(letters) == 3 and len({r["original"] for r in letters}) == 3, letters
    for letter in letters:
        assert letter["reason"] == "invalid event"
        assert f"cut to its first {MAX_LETTER_PAYLOAD}" in letter["error"] and letter["original"] in letter["error"]
        assert letter["deliveries"] >= 2  # its first letter failed: it was redelivered
    # Scrubbed once each, though each came back for its letter.
    assert scrubs == Counter({hashlib.sha256(body).hexdigest(): 1 for body in garbage})
