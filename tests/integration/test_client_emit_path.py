"""The SDK's emit path where an application's process shape meets it: a worker forked after the client started, a
large event emitted on an asyncio application's loop, a host whose clock runs ahead of the stack's (probe p80)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import lockgate.outbox
from lockgate import credentials
from lockgate.bus import Bus
from lockgate.client import SCRUB_OFF_CALLER, Client
from lockgate.config import Settings
from lockgate.errors import InvalidEvent
from lockgate.server.runtime import Runtime
from tests.integration import test_app_credentials
from tests.integration.test_client import client, stored
from tests.integration.test_client_edges import Seen

pytestmark = pytest.mark.timeout(90)

stack = test_app_credentials.stack


@pytest.fixture
def seen() -> Iterator[Seen]:
    handler = Seen()
    logger = logging.getLogger("lockgate.client")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


async def test_a_worker_forked_after_start_refuses_its_events_counts_and_says_so(
    bus: Bus, settings: Settings, seen: Seen
) -> None:
    # Before (probe p80 F1): gunicorn --preload style, the client started on a background loop thread before the
    # fork; in the worker, emit() handed each event to the parent's loop object (not running there), returned True,
    # and nothing was published, counted or logged.
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    c = client(settings, flush_interval_s=60)  # the parent's three events are still buffered at the fork
    try:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(c.start(), loop))
        for _ in range(3):
            assert c.emit(model="parent")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: answers on the pipe, then leaves without running the parent's teardown
            try:
                accepted = [c.emit(model="child") for _ in range(100)]
                report = {"accepted": sum(accepted), "dropped": c.dropped}
                # Its own shutdown hook: returns, and publishes nothing of the parent's buffer.
                asyncio.run(asyncio.wait_for(c.close(), 10))
                report["said"] = [r.getMessage() for r in seen.records if r.levelno == logging.WARNING]
            except BaseException as exc:  # reported, never a second pytest run in the child
                report = {**locals().get("report", {}), "error": repr(exc)}
            os.write(write, json.dumps(report).encode())
            os._exit(0)
        os.close(write)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        with os.fdopen(read, "rb") as pipe:
            report = json.loads(pipe.read())
        assert status == 0 and "error" not in report, report
        assert (report["accepted"], report["dropped"]) == (0, 100), report
        fork_warnings = [m for m in report["said"] if "forked" in m]
        assert (
            len(fork_warnings) == 1 and "create the Client in each worker after the fork" in fork_warnings[0]
        )
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(c.close(), loop))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)
        loop.close()
    assert (c.sent, c.dropped) == (3, 0)
    events, _ = await stored(bus)
    assert sorted(e.model for e in events) == ["parent"] * 3  # the parent's buffer sent once, by the parent


async def test_a_large_event_is_scrubbed_off_the_callers_loop_and_a_bad_one_still_raises(
    bus: Bus, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before (probe p80 F3): emit() scrubbed and encoded in the caller, a 600 KB prompt shaped like keys holding an
    # asyncio application's loop 548 ms.
    scrubbed_on: dict[str, int] = {}
    real = lockgate.outbox.scrub_event

    def scrub_event(event: Any) -> Any:
        scrubbed_on[event.model] = threading.get_ident()
        return real(event)

    monkeypatch.setattr(lockgate.outbox, "scrub_event", scrub_event)
    prompt = ("token sk-proj-" + "A1b2" * 10 + " ") * 11_000
    assert len(prompt) >= SCRUB_OFF_CALLER
    async with client(settings) as c:
        assert c.emit(model="big", prompt=prompt)
        assert c.emit(model="small", prompt="token sk-proj-" + "A1b2" * 10)
        with pytest.raises(InvalidEvent, match=r"\$\.input_tokens"):  # checked at once, large or not
            c.emit(model="big-bad", prompt=prompt, input_tokens=-1)
        with pytest.raises(InvalidEvent, match="more than 1 hour after now"):
            c.emit(model="big-late", prompt=prompt, time="2299-01-01T00:00:00Z")
        with pytest.raises(InvalidEvent, match="credential"):
            c.emit(model="big-key", prompt=prompt, release="sk-proj-" + "A1b2" * 10)
        await c.flush()  # waits for the large event's scrub too
        assert (c.sent, c.dropped, c.pending) == (2, 0, 0)
    caller = threading.get_ident()
    assert scrubbed_on["small"] == caller
    assert scrubbed_on["big"] != caller
    events, _ = await stored(bus)
    big = next(e for e in events if e.model == "big")
    assert big.prompt is not None and "sk-proj-" not in big.prompt and "[REDACTED]" in big.prompt


async def test_a_host_clock_ahead_of_the_stack_is_measured_and_said(stack: Runtime, seen: Seen) -> None:
    # Before (probe p80 F4): under faketime +2h every event was dead-lettered ("more than 1 hour after now") while
    # `sent` counted it, and nothing was said.
    app = credentials.for_identity(stack.settings, "app")
    prefix = stack.ctx.bus.subjects.prefix
    for ahead_s in (0.0, 7200.0):
        async with Client(
            stack.settings.nats_url,
            prefix=prefix,
            app="shop",
            tenant="acme",
            user=app.user,
            password=app.password,
            clock=lambda ahead_s=ahead_s: time.time() + ahead_s,
        ) as c:
            c.emit(input_tokens=1)
            await c.flush()
            assert c.sent == 1 and c.clock_offset is not None
            assert abs(c.clock_offset.seconds - ahead_s) < 60, c.clock_offset
            assert c.clock_skewed is (ahead_s > 0)
    said = [m for m in seen.at(logging.WARNING) if "clock" in m]
    assert len(said) == 1 and "+7200 s off the lockgate stack's" in said[0], said
