"""`lockgate status`: is the pipeline keeping up, is a stream (or the dead-letter originals bucket) full, and did
anything land in the DLQ?

Read from JetStream: works embedded or distributed, stack running or not. Only the dead letters already stored
come from the record (the query service, when one answers): the DLQ stream keeps a letter until the sink stored it.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import click
import nats.js.errors

from lockgate import queryclient
from lockgate.bus import TOPOLOGY_APPLY, Bus, stream_full
from lockgate.cli import running
from lockgate.cli.access import with_bus
from lockgate.cli.render import emit_json, table
from lockgate.cli.root import handle_errors, json_option
from lockgate.config import Settings
from lockgate.errors import BusUnreachable, LockgateError
from lockgate.redact import shown_url

# A full stream's state, and the dead-letter originals bucket's row among the streams with what its being full means.
STREAM_FULL = "FULL: refusing publishes"
ORIGINALS_ROLE = "dlq_originals"
ORIGINALS_FULL = "FULL: cut letters go without their whole original"
# A stream this version declares that a home made before lacks until admin applies the topology (a service may only
# create one, and cannot when an older stream still captures its subjects: the cost records' stream).
STREAM_MISSING = f"MISSING: apply it with `{TOPOLOGY_APPLY}`"


async def read_status(bus: Bus) -> dict[str, Any]:
    """Streams (messages, bytes), durable consumers (pending, unacked, redelivered) and dead letters by origin."""
    streams, consumers = [], []
    for key, spec in bus.subjects.streams.items():
        try:
            info = await bus.js.stream_info(spec.name)
        except nats.js.errors.NotFoundError:
            streams.append({"stream": spec.name, "role": key, "messages": 0, "bytes": 0, "max_bytes": spec.max_bytes,
                            "retention": spec.retention, "consumers": 0, "state": STREAM_MISSING})
            continue
        max_bytes = info.config.max_bytes or spec.max_bytes  # the limit the server enforces
        full = spec.discard == "new" and stream_full(info.state.bytes, max_bytes, bus.nc.max_payload)
        streams.append({"stream": spec.name, "role": key, "messages": info.state.messages,
                        "bytes": info.state.bytes, "max_bytes": max_bytes,
                        "retention": getattr(info.config.retention, "value", info.config.retention),
                        "consumers": info.state.consumer_count,
                        # discard new: every publish is refused until its consumers take their backlog
                        "state": STREAM_FULL if full else "ok"})
        for c in await bus.js.consumers_info(spec.name):
            consumers.append({"consumer": c.name, "stream": spec.name, "pending": c.num_pending or 0,
                              "unacked": c.num_ack_pending or 0, "redelivered": c.num_redelivered or 0,
                              "waiting": c.num_waiting or 0})
    originals = await bus.originals_state()
    if originals is not None:  # a stream too (object stores are): shown with them
        streams.append({"stream": originals["stream"], "role": ORIGINALS_ROLE, "messages": originals["messages"],
                        "bytes": originals["bytes"], "max_bytes": originals["max_bytes"], "retention": "limits",
                        "consumers": 0, "state": ORIGINALS_FULL if originals["full"] else "ok"})
    dlq = await bus.js.stream_info(bus.subjects.streams["dlq"].name, subjects_filter=bus.subjects.dlq_all)
    prefix = f"{bus.subjects.prefix}.dlq."
    waiting = {subject.removeprefix(prefix): count for subject, count in (dlq.state.subjects or {}).items()}
    try:
        stored = {r["origin"]: r["dead_letters"] for r in await queryclient.ask(bus, "dead_letter_counts", timeout_s=10)}
    except LockgateError:  # no query service: the letters the sink has not stored yet only
        stored = {}
    # Stored: in the record (`lockgate dlq`); not yet: in the DLQ stream, for the sink to store (a letter
    # being stored just now may be counted in both).
    dead = [{"origin": origin, "dead_letters": stored.get(origin, 0), "not_yet_stored": waiting.get(origin, 0)}
            for origin in sorted(stored.keys() | waiting.keys())]
    return {"streams": streams, "consumers": sorted(consumers, key=lambda c: c["consumer"]), "dead_letters": dead,
            "overrides": await read_overrides(bus)}


def streams_title(streams: list[dict[str, Any]]) -> str:
    """The streams table's heading: what FULL means, only when a row is."""
    states = {s["state"] for s in streams}
    notes = [note for state, note in (
        (STREAM_FULL, "FULL: producers are refused until the consumers below catch up"),
        (ORIGINALS_FULL, f"FULL {ORIGINALS_ROLE}: a letter over 256 KiB keeps its first 256 KiB only, until "
                         "originals expire or an operator makes room")) if state in states]
    return f"streams ({'; '.join(notes)})" if notes else "streams"


async def read_overrides(bus: Bus) -> list[dict[str, Any]]:
    """Break-glass overrides in effect, from the routes KV: a canary's until an admin clears it, a promoted stable's
    (`glass_stable`) until a gate decision admits it or another release serves in its place."""
    out = []
    for key, value in (await bus.kv_entries(bus.subjects.kv_routes)).items():
        try:
            route = json.loads(value or b"{}")
        except ValueError:
            continue  # not a route
        if not isinstance(route, dict):
            continue
        for o in (route.get("override"), route.get("glass_stable")):
            if o:
                out.append({"deployment": route.get("deployment", key), "release": o.get("release"),
                            "action": o.get("action"), "by": o.get("actor"), "key_id": o.get("key_id", ""),
                            "since": dt.datetime.fromtimestamp(o.get("at", 0), dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
                            "reason": o.get("reason")})
    return out


def unreachable(settings: Settings, exc: BusUnreachable) -> BusUnreachable:
    """Why nothing answered at the NATS URL: a live stack named by the home's stack.json listens there (its bus is
    restarting or hung: "no stack answers, start one" misled during a restart, probe p4), or `exc` as it is."""
    pid = running.owner(settings.home)
    if pid is None or running.endpoints(settings.home).get("nats") != settings.nats_url:
        return exc
    return BusUnreachable(f"the lockgate stack running from {settings.home} (process {pid}) does not answer at "
                          f"{shown_url(settings.nats_url)} ({exc.reason}): its bus is restarting or unreachable; try "
                          "again shortly (the stack's log says why, if it stays away)", reason=exc.reason)


def register(cli: click.Group) -> None:
    """Attach the command to the top-level group."""

    @cli.command()
    @json_option
    @click.pass_context
    @handle_errors
    def status(ctx: click.Context, as_json: bool) -> None:
        """Streams, consumer backlog (pending / unacked / redelivered) and dead letters by origin."""
        settings = ctx.obj["settings"]
        try:
            report = with_bus(settings, read_status)
        except BusUnreachable as exc:
            raise unreachable(settings, exc) from None
        if as_json:
            emit_json(report)
            return
        table(report["streams"], title=streams_title(report["streams"]))
        table(report["consumers"], title="consumers (pending = not yet delivered; unacked = in flight)")
        table(report["dead_letters"], title="dead letters by origin", empty="no dead letters")
        table(report["overrides"], title="BREAK-GLASS overrides in effect (a canary's until an admin clears it: "
                                         "DELETE /lockgate/v1/deployments/DEPLOYMENT/break-glass; a promote's until "
                                         "a gate decision admits the release or it is rolled back)",
              empty="no break-glass overrides")
