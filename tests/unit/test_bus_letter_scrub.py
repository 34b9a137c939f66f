"""How the bus scrubs a dead letter's payload (probe p16 F3): a large one in its own thread, once while remembered."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lockgate import bus as bus_module
from lockgate.bus import _SCRUB_OFF_LOOP, Bus
from lockgate.redact import scrub_bytes


@pytest.fixture
def scrubbed_in(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """The size of every payload scrubbed and the thread that scrubbed it."""
    calls: list[tuple[int, str]] = []

    def recorded(data: bytes) -> bytes:
        calls.append((len(data), threading.current_thread().name))
        return scrub_bytes(data)

    monkeypatch.setattr(bus_module, "scrub_bytes", recorded)
    return calls


async def test_a_large_payload_is_scrubbed_once_off_the_loop_and_a_small_one_on_it(
        scrubbed_in: list[tuple[int, str]]) -> None:
    bus = Bus("nats://127.0.0.1:1")
    key = b"Authorization: Bearer sk-proj-" + b"A1b2C3d4" * 6
    large = b"\x00garbage " * (_SCRUB_OFF_LOOP // 8) + key
    # Two consumers (or a delivery and its redelivery) at once, then again: one scrub.
    got = await asyncio.gather(bus._scrubbed_payload(large), bus._scrubbed_payload(large))
    again = await bus._scrubbed_payload(large)
    assert got == [scrub_bytes(large)] * 2 == [again] * 2 and b"sk-proj-" not in again
    small = await bus._scrubbed_payload(key)
    assert b"sk-proj-" not in small
    assert [(size, name.startswith("dlq-scrub")) for size, name in scrubbed_in] == [(len(large), True),
                                                                                    (len(key), False)]
    await bus.close()


async def test_the_remembered_payloads_are_bounded(monkeypatch: pytest.MonkeyPatch,
                                                   scrubbed_in: list[tuple[int, str]]) -> None:
    monkeypatch.setattr(bus_module, "_SCRUBBED_MAX_BYTES", 2 * _SCRUB_OFF_LOOP)
    bus = Bus("nats://127.0.0.1:1")
    payloads = [bytes([i]) * _SCRUB_OFF_LOOP for i in range(3)]
    for data in payloads:
        await bus._scrubbed_payload(data)
    await bus._scrubbed_payload(payloads[2])  # remembered
    await bus._scrubbed_payload(payloads[0])  # the oldest, forgotten past the bound: scrubbed again
    assert len(scrubbed_in) == 4 and bus._scrubbed_size <= 2 * _SCRUB_OFF_LOOP
    await bus.close()
