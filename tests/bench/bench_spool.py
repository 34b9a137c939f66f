"""Spool bench: what the router's `Outbox.add` costs per event with its spool (one append: framing,
CRC-32, one writev into the page cache) and without, in the same run, rounds interleaved.
Run alone: `python -m tests.bench.bench_spool` (prints JSON)."""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time

from lockgate.contracts import InferenceEvent
from lockgate.outbox import Encoded, Outbox, encode_event
from lockgate.spool import Spool
from lockgate.subjects import Subjects

N = 20_000
ROUNDS = 7


def _events(prompt_bytes: int) -> list[Encoded]:
    text = ("lorem ipsum " * (prompt_bytes // 12 + 1))[:prompt_bytes]
    return [encode_event(InferenceEvent(app="shop", tenant="acme", deployment="chat", model="gpt-4o-mini",
                                        input_tokens=20, output_tokens=40, prompt=text, response=text,
                                        trace_id=f"{i + 1:032x}", span_id=f"{i + 1:016x}")) for i in range(N)]


def _per_event_us(events: list[Encoded], spooled: bool) -> float:
    with tempfile.TemporaryDirectory() as home:
        outbox = Outbox(Subjects("b"), capacity=N, spool=Spool(home) if spooled else None)  # not started: adds only
        add = outbox.add
        t0 = time.perf_counter()
        for e in events:
            add(e)
        took = time.perf_counter() - t0
        if outbox.spool is not None:
            logging.getLogger("lockgate.spool").setLevel(logging.ERROR)  # "events kept for the next start": yes
            outbox.spool.close()
    return took / len(events) * 1e6


def main() -> dict[str, float]:
    """Median µs per `Outbox.add` without and with the spool, for small and router-sized events."""
    out: dict[str, float] = {}
    for label, size in (("small", 0), ("1kB_prompt_and_response", 1000)):
        events = _events(size)
        plain, spooled = [], []
        for _ in range(ROUNDS):
            plain.append(_per_event_us(events, False))
            spooled.append(_per_event_us(events, True))
        out[f"{label}_event_bytes"] = float(len(events[0].data))
        out[f"{label}_add_us"] = statistics.median(plain)
        out[f"{label}_add_spooled_us"] = statistics.median(spooled)
        out[f"{label}_spool_cost_us"] = statistics.median(spooled) - statistics.median(plain)
    return out


async def run(env: object) -> dict[str, float]:
    """Entry point of `make bench`."""
    return main()


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
