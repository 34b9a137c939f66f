"""Backlog and health straight from JetStream: works embedded or distributed, stack running or not."""

from __future__ import annotations

from typing import Any

from lockgate.bus import Bus


async def status(bus: Bus) -> dict[str, Any]:
    """Streams (messages, bytes), durable consumers (pending, unacked, redelivered) and dead letters by origin."""
    streams, consumers = [], []
    for key, spec in bus.subjects.streams.items():
        info = await bus.js.stream_info(spec.name)
        streams.append({"stream": spec.name, "role": key, "messages": info.state.messages,
                        "bytes": info.state.bytes, "consumers": info.state.consumer_count})
        for c in await bus.js.consumers_info(spec.name):
            consumers.append({"consumer": c.name, "stream": spec.name, "pending": c.num_pending or 0,
                              "unacked": c.num_ack_pending or 0, "redelivered": c.num_redelivered or 0,
                              "waiting": c.num_waiting or 0})
    dlq = await bus.js.stream_info(bus.subjects.streams["dlq"].name, subjects_filter=bus.subjects.dlq_all)
    prefix = f"{bus.subjects.prefix}.dlq."
    dead = [{"origin": subject.removeprefix(prefix), "dead_letters": count}
            for subject, count in sorted((dlq.state.subjects or {}).items())]
    return {"streams": streams, "consumers": sorted(consumers, key=lambda c: c["consumer"]), "dead_letters": dead}
