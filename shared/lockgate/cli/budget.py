"""`lockgate budget list`: the budgets of the gateway file and how much of each is used this period.

Budgets are declared in the gateway file (settings.gateway_file, LOCKGATE_GATEWAY_FILE), reviewed and
versioned like the endpoints file; the counters live in the `lg_budgets` KV bucket, where the routers
lease from them. A counter shows what replicas spent *or hold*: an idle replica gives back what it
holds within `lease_s`, so a quiet budget's counter settles on its spend. Without a gateway file the
counters of the current period are listed as they are: what the routers enforce.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
import msgspec

from lockgate.bus import Bus
from lockgate.cli.access import with_bus
from lockgate.cli.render import output
from lockgate.cli.root import handle_errors, json_option
from lockgate.errors import UnreadableValue
from lockgate.services.router.admission import load_gateway_file
from lockgate.services.router.budgets import NANO, Budget, Counter, parse_counter_key, period_id, resolve
from lockgate.subjects import Subjects


def _counter(entries: dict[str, bytes], key: str, bucket: str) -> Counter:
    """The counter stored under `key` (a zero one when there is none yet); UnreadableValue when it is no counter."""
    if key not in entries:
        return Counter()
    try:
        return msgspec.json.decode(entries[key], type=Counter)
    except msgspec.DecodeError as exc:
        raise UnreadableValue(f"budget counter {key} in KV {bucket} is unreadable ({exc}): the router refuses the "
                              "requests it counts, whatever fail_open says, until it is deleted (nats kv del "
                              f"{bucket} {key}: the period's count restarts from the cost ledger's)") from None


def _row(budget: str, split: str, pid: str, selects: str | None, c: Counter, b: Budget | None) -> dict[str, Any]:
    """One counter as a row. `counting_since`: when the counter was created (None: no counter yet, or one created
    before counters were seeded); `seeded`: `ledger` when it holds what the routers served before then (the
    `seeded_*` amounts, from the cost ledger), `pending` when the ledger could not be read yet (it counts only
    since its creation until a router adds them)."""
    usd, tokens = (b.limits_usd, b.limits_tokens) if b is not None else (True, True)
    state = "" if c.since is None else "pending" if c.seeded is None else "ledger"
    return {
        "budget": budget, "split": split, "period": pid, "selects": selects,
        "usd_used": round(c.leased.usd / NANO, 6) if usd else None, "usd_limit": b.spec.usd if b else None,
        "tokens_used": c.leased.tokens if tokens else None, "tokens_limit": b.spec.tokens if b else None,
        "counting_since": c.since.isoformat(timespec="seconds") if c.since else None, "seeded": state,
        "seeded_usd": round(c.seeded.usd / NANO, 6) if c.seeded is not None and usd else None,
        "seeded_tokens": c.seeded.tokens if c.seeded is not None and tokens else None,
    }


async def read_budgets(bus: Bus, budgets: list[Budget], now: datetime) -> list[dict[str, Any]]:
    """One row per counter of this period (a split budget has one per tenant, app or key)."""
    bucket = bus.subjects.kv_budgets
    entries = await bus.kv_entries(bucket)
    rows = []
    for b in budgets:
        pid = period_id(b.spec.period, now)
        mine = [k for k in entries if k.startswith(f"{b.name}.") and k.endswith(f".{pid}")] or [f"{b.name}.{pid}"]
        for key in sorted(mine):
            split = key[len(b.name) + 1: -len(pid) - 1]
            selects = ", ".join(f"{k}={v}" for k in ("tenant", "app", "key") if (v := getattr(b.spec, k))) or "all"
            rows.append(_row(b.name, split, pid, selects, _counter(entries, key, bucket), b))
    return rows


async def read_counters(bus: Bus, now: datetime) -> list[dict[str, Any]]:
    """Every budget counter of the current day or month in the store: what the routers enforce, whatever gateway
    file this shell has (none); limits and selections are the gateway file's, so they are not known here."""
    bucket = bus.subjects.kv_budgets
    entries = await bus.kv_entries(bucket)
    current = (period_id("day", now), period_id("month", now))
    rows = []
    for key in sorted(entries):
        parsed = parse_counter_key(key)
        if parsed is not None and parsed[2] in current:
            rows.append(_row(*parsed, None, _counter(entries, key, bucket), None))
    return rows


def register(cli: click.Group) -> None:
    """Attach `budget` to the top-level group."""

    @cli.group()
    def budget() -> None:
        """Budgets of the gateway file (settings.gateway_file) and their use."""

    @budget.command("list")
    @click.option("--file", "path", default=None, help="The gateway file (default: settings.gateway_file).")
    @json_option
    @click.pass_context
    @handle_errors
    def list_(ctx: click.Context, path: str | None, as_json: bool) -> None:
        """Each budget's use this period (spent or held by a router replica) against its limit."""
        settings = ctx.obj["settings"]
        file = path or settings.gateway_file
        now = datetime.now(UTC)
        if not file:
            # The routers read their own gateway file, which this shell may not set: their counters are what they
            # enforce. Before, "no budgets" was said here while a router refused requests over one (probe p23 F6).
            rows = with_bus(settings, lambda bus: read_counters(bus, now))
            output(rows, as_json, title="budget counters of this period in the store (limits: pass the gateway "
                                        "file, --file)", empty=_none_counted(settings))
            return
        budgets = resolve(load_gateway_file(file).budgets)
        rows = with_bus(settings, lambda bus: read_budgets(bus, budgets, now))
        output(rows, as_json, title="budgets (used = spent or held by a router replica)", empty=_none_declared(file))


def _none_declared(file: str) -> str:
    """Why there is nothing to list: an applied GitOps budget document is no budget the router holds anyone to."""
    return (f"no budgets: the gateway file {file} declares none. The router enforces only the gateway file's budgets; "
            "a GitOps `kind: budget` document is desired state, recorded by `apply` and shown by `plan`, and limits "
            "nothing.")


def _none_counted(settings: Any) -> str:
    """Why there is nothing to list without a gateway file: no router has counted on any budget this period."""
    return (f"no budget counters this period in KV {Subjects(settings.prefix).kv_budgets}: no router has admitted a "
            "request under a budget today or this month. This shell sets no gateway file (LOCKGATE_GATEWAY_FILE, or "
            "--file); the routers enforce their own's. A GitOps `kind: budget` document is desired state, recorded "
            "by `apply` and shown by `plan`, and limits nothing.")
