"""Retention: a TTL per table, from settings, applied when a store owner opens the store.

`LOCKGATE_RETENTION_DAYS` overrides the defaults per table, e.g. `inference_events=60,dead_letters=7`;
0 keeps a table's rows for ever. Rows past their TTL are removed by ClickHouse's merges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from lockgate.errors import ConfigError
from lockgate.limits import duration
from lockgate.store.client import Store

# The time column each table expires by (tables not listed keep their rows: releases, artifacts,
# lineage, evals, gate decisions and the audit log are the record of what was shipped and why).
TTL_COLUMNS: dict[str, str] = {
    "inference_events": "time",
    "inference_event_keys": "time",
    "inference_scores": "time",
    "inference_scores_keys": "time",
    "otel_traces": "Timestamp",
    "otel_traces_keys": "Timestamp",
    "otel_traces_trace_id_ts": "End",
    "dead_letters": "time",
    "drift_reports": "time",
    "rollout_events": "time",
    "cost_ledger": "time",
    "cost_ledger_keys": "time",
    "cost_hourly": "hour",
}

# A table kept as long as another unless set itself: stored keys, as long as their rows (a key kept longer only
# refuses a re-send of an expired event; one dropped sooner would let it be stored, or billed, twice).
FOLLOWS: dict[str, str] = {"inference_event_keys": "inference_events", "cost_ledger_keys": "cost_ledger",
                           "inference_scores_keys": "inference_scores", "otel_traces_keys": "otel_traces"}

# The tables the sink deduplicates against, and their key tables: each must keep a row longer than an event (or span)
# may be dated back (`event_time_past_s`), else a re-send of one older than its table's TTL is accepted, finds no
# key (ClickHouse drops an expired row as it is inserted) and is stored again, and billed again by `cost_hourly`,
# which keeps every insert. The margin covers the clocks of the edges, the sink and ClickHouse, and a backlog.
DEDUPLICATED: tuple[str, ...] = tuple(table for keys, rows in FOLLOWS.items() for table in (rows, keys))
MARGIN_DAYS = 1

# High-volume raw data goes first; the bill (ledger, then its hourly rollup) is kept longest.
DEFAULT_DAYS: dict[str, int] = {
    "inference_events": 90,
    "inference_event_keys": 90,
    "inference_scores": 90,
    "inference_scores_keys": 90,
    "otel_traces": 31,  # a span may be dated 30 days back (event_time_past_s), plus the margin
    "otel_traces_keys": 31,
    "otel_traces_trace_id_ts": 31,
    "dead_letters": 30,
    "drift_reports": 365,
    "rollout_events": 0,
    "cost_ledger": 400,
    "cost_ledger_keys": 400,
    "cost_hourly": 0,
}


def parse_retention(text: str, event_past_s: float) -> dict[str, int]:
    """Days per table: the defaults, overridden by `table=days,...`; ConfigError for a deduplicated table kept
    for less than `event_past_s` (the setting `event_time_past_s`) and a day."""
    given: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        table, sep, value = part.partition("=")
        table = table.strip()
        if not sep or table not in TTL_COLUMNS or not value.strip().isdigit():
            raise ConfigError(f"retention {part!r} must be TABLE=DAYS (days >= 0, 0 = for ever) with TABLE one of "
                              f"{', '.join(TTL_COLUMNS)}")
        given[table] = int(value)
    days = {**DEFAULT_DAYS, **given}
    for table, leader in FOLLOWS.items():
        days[table] = given.get(table, days[leader])
    _check_deduplicated(days, event_past_s)
    return days


def _check_deduplicated(days: Mapping[str, int], event_past_s: float) -> None:
    """Refuse, naming every one, the deduplicated tables whose TTL an accepted re-send can outlive (0: for ever)."""
    least = math.ceil(event_past_s / 86400) + MARGIN_DAYS
    short = [f"{table}={days[table]}" for table in DEDUPLICATED if 0 < days[table] < least]
    if short:
        raise ConfigError(f"retention {', '.join(short)} (days) is shorter than event_time_past_s "
                          f"({duration(event_past_s)}: how old an accepted event may be) and {MARGIN_DAYS} day: an event "
                          "re-sent after its row expired would be stored, and billed, again; keep "
                          f"{'them' if len(short) > 1 else 'it'} {least} days or more (0 = for ever), or lower "
                          "LOCKGATE_EVENT_TIME_PAST_S")


def ttl_expression(table: str, days: int) -> str:
    """The TTL as ClickHouse prints it in the table's engine (so an unchanged TTL is recognised)."""
    return f"toDateTime({TTL_COLUMNS[table]}) + toIntervalDay({days})"


def apply_retention(store: Store, days: Mapping[str, int]) -> list[str]:
    """Set each table's TTL where it differs from `days`; returns the tables changed."""
    engines = {r["name"]: r["engine_full"] for r in store.rows(
        "SELECT name, engine_full FROM system.tables WHERE database = {db:String}", {"db": store.database})}
    changed = []
    for table, n in days.items():
        engine = engines.get(table)
        if engine is None:
            continue
        has_ttl = " TTL " in engine
        if n > 0 and f" TTL {ttl_expression(table, n)} " not in f"{engine} ":
            # Existing parts are rewritten in the background to drop what is already past the TTL.
            store.command(f"ALTER TABLE {table} MODIFY TTL {ttl_expression(table, n)}")
            changed.append(table)
        elif n == 0 and has_ttl:
            store.command(f"ALTER TABLE {table} REMOVE TTL")
            changed.append(table)
    return changed
