"""`lockgate budget list`: the budgets of the gateway file and how much of each is used this period.

Budgets are declared in the gateway file (settings.gateway_file, LOCKGATE_GATEWAY_FILE), reviewed and
versioned like the endpoints file; the counters live in the `lg_budgets` KV bucket, where the routers
lease from them. A counter shows what replicas spent *or hold*: an idle replica gives back what it
holds within `lease_s`, so a quiet budget's counter settles on its spend.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
import msgspec

from lockgate.bus import Bus
from lockgate.cli.access import with_bus
from lockgate.cli.main import handle_errors, json_option
from lockgate.cli.render import output
from lockgate.errors import UnreadableValue
from lockgate.services.router.admission import load_gateway_file
from lockgate.services.router.budgets import NANO, Budget, Counter, period_id, resolve


async def read_budgets(bus: Bus, budgets: list[Budget], now: datetime) -> list[dict[str, Any]]:
    """One row per counter of this period (a split budget has one per tenant, app or key)."""
    entries = await bus.kv_entries(bus.subjects.kv_budgets)
    rows = []
    for b in budgets:
        pid = period_id(b.spec.period, now)
        mine = [k for k in entries if k.startswith(f"{b.name}.") and k.endswith(f".{pid}")] or [f"{b.name}.{pid}"]
        for key in sorted(mine):
            try:
                leased = msgspec.json.decode(entries[key], type=Counter).leased if key in entries else Counter().leased
            except msgspec.DecodeError as exc:
                raise UnreadableValue(f"budget counter {key} in KV {bus.subjects.kv_budgets} is unreadable ({exc}): the "
                                      "router refuses the requests it counts, whatever fail_open says, until it is "
                                      f"deleted (nats kv del {bus.subjects.kv_budgets} {key}: the period's count "
                                      "restarts from zero)") from None
            split = key[len(b.name) + 1: -len(pid) - 1]
            rows.append({
                "budget": b.name, "split": split, "period": pid,
                "selects": ", ".join(f"{k}={v}" for k in ("tenant", "app", "key") if (v := getattr(b.spec, k))) or "all",
                "usd_used": round(leased.usd / NANO, 6) if b.limits_usd else None, "usd_limit": b.spec.usd,
                "tokens_used": leased.tokens if b.limits_tokens else None, "tokens_limit": b.spec.tokens,
            })
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
        budgets = resolve(load_gateway_file(file).budgets)
        now = datetime.now(UTC)
        rows = with_bus(settings, lambda bus: read_budgets(bus, budgets, now))
        output(rows, as_json, title="budgets (used = spent or held by a router replica)", empty=_none_declared(file))


def _none_declared(file: str) -> str:
    """Why there is nothing to list: an applied GitOps budget document is no budget the router holds anyone to."""
    where = f"the gateway file {file} declares none" if file else \
        "no gateway file is set (LOCKGATE_GATEWAY_FILE, or --file)"
    return (f"no budgets: {where}. The router enforces only the gateway file's budgets; a GitOps `kind: budget` "
            "document is desired state, recorded by `apply` and shown by `plan`, and limits nothing.")
