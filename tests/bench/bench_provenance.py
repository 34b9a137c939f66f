"""Provenance costs: signing and appending alias changes, reading and verifying a long alias history,
and what the artifact lifecycle check adds to each gate decision."""

from __future__ import annotations

import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.identity import create_identity
from lockgate.provenance import aliases, lifecycle
from lockgate.signing import trust_file_path, trust_person
from lockgate.subjects import Subjects
from tests.bench.common import BenchEnv

CHANGES = 200
ARTIFACTS = 6
CHECKS = 50


async def run(env: BenchEnv) -> dict[str, Any]:
    home = Path(env.home) / f"prov-{uuid.uuid4().hex[:6]}"
    settings = env.settings(home=str(home))
    ann = create_identity(settings, "ann")
    trust_person(trust_file_path(settings), "ann", ann.signer.public, ["operator"])
    bus = Bus(settings.nats_url, Subjects(settings.prefix), name="bench-provenance")
    await bus.connect()
    try:
        hashes = {}
        for i in range(ARTIFACTS):
            art = await artifacts.register(bus, "prompt", f"p{i}", {"template": f"t{i}"})
            hashes[f"prompt/p{i}"] = art.hash
        for r in ("r-a", "r-b"):
            await artifacts.register_release(bus, r, "shop", hashes)

        started = time.perf_counter()
        for i in range(CHANGES):
            await aliases.set_alias(bus, settings, ann, "shop", "production", "r-a" if i % 2 == 0 else "r-b")
        set_s = time.perf_counter() - started

        reads = []
        for _ in range(5):
            t = time.perf_counter()
            records = (await aliases.history(bus, settings, "shop", "production")).records
            reads.append(time.perf_counter() - t)
        assert len(records) == CHANGES

        checks = []
        for _ in range(CHECKS):
            t = time.perf_counter()
            await lifecycle.gate_rules(bus, settings, hashes)
            checks.append(time.perf_counter() - t)
    finally:
        await bus.close()
    return {
        "alias_changes": CHANGES,
        # Each change verifies the whole history before appending, so this grows with the history.
        "alias_set_mean_ms": round(set_s / CHANGES * 1000, 2),
        "history_read_and_verify_ms": {"records": CHANGES, "median": round(statistics.median(reads) * 1000, 1)},
        "gate_lifecycle_check_ms": {"artifacts": ARTIFACTS, "median": round(statistics.median(checks) * 1000, 2)},
    }
