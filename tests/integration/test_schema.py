"""Every table's DDL against its contract Struct, through the one row mapper."""

from __future__ import annotations

import pytest

from lockgate.store import Store
from lockgate.store.rows import DdlColumn, schema_problems
from lockgate.store.tables import DERIVED, TABLES

pytestmark = pytest.mark.timeout(60)


def _ddl(store: Store) -> dict[str, list[DdlColumn]]:
    rows = store.rows("SELECT table, name, type, default_kind FROM system.columns WHERE database = {db:String} "
                      "ORDER BY table, position", {"db": store.database})
    out: dict[str, list[DdlColumn]] = {}
    for r in rows:
        out.setdefault(r["table"], []).append(DdlColumn(r["name"], r["type"], r["default_kind"]))
    return out


def test_every_table_is_declared_once_and_matches_its_struct(store: Store) -> None:
    ddl = _ddl(store)
    assert set(ddl) - {"schema_migrations", *DERIVED} == {t.name for t in TABLES}
    problems = [p for t in TABLES for p in schema_problems(t, ddl[t.name])]
    assert problems == []


def test_round_trip_of_one_row_per_table(store: Store) -> None:
    """What the mapper sends, ClickHouse accepts: one real insert per table (types, Map, Nested, JSON)."""
    from tests.unit.test_rows import SAMPLE_ROWS

    for table in TABLES:
        values, extra = SAMPLE_ROWS[table.name]
        data = table.data(values, extra)
        assert store.insert_columns(table.name, table.columns, data, token=None) == len(data[0]), table.name
        assert store.scalar(f"SELECT count() FROM {table.name}") == len(data[0]), table.name


def test_times_are_stored_to_the_microsecond_whatever_their_zone(store: Store) -> None:
    """Aware datetimes go to DateTime64 columns as ticks computed by the store (not the driver): the same
    instants, to the microsecond, for UTC, another offset, before 1970 and at every precision."""
    from datetime import UTC, datetime, timedelta, timezone

    store.command("CREATE TABLE ticks (k UInt8, t6 DateTime64(6, 'UTC'), t3 DateTime64(3, 'UTC'), "
                  "t9 DateTime64(9, 'UTC')) ENGINE = MergeTree ORDER BY k")
    times = [datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
             datetime(2026, 1, 2, 5, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2))),
             datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)]
    store.insert_columns("ticks", ["k", "t6", "t3", "t9"], [[0, 1, 2], times, times, times], token=None)
    rows = store.rows("SELECT k, toUnixTimestamp64Micro(t6) AS us, toUnixTimestamp64Milli(t3) AS ms, "
                      "toUnixTimestamp64Nano(t9) AS ns FROM ticks ORDER BY k")
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    expected = [(t - epoch) // timedelta(microseconds=1) for t in times]
    assert [r["us"] for r in rows] == expected == [1767323045678901, 1767323045678901, -1]
    assert [r["ms"] for r in rows] == [us // 1000 for us in expected]
    assert [r["ns"] for r in rows] == [us * 1000 for us in expected]


def test_an_insert_leaves_nothing_for_the_cyclic_collector(store: Store) -> None:
    """The rows of an insert are freed when it returns, not at the next full collection: the driver's
    insert context refers to itself, and a sink holding every batch until then grew and paused."""
    import gc

    from clickhouse_connect.driver.insert import InsertContext

    store.command("CREATE TABLE freed (k UInt32, s String) ENGINE = MergeTree ORDER BY k")
    gc.collect()
    gc.disable()
    try:
        for i in range(3):
            store.insert_columns("freed", ["k", "s"], [[i, i + 1], ["a", "b"]], token=None)
        assert [o for o in gc.get_objects() if isinstance(o, InsertContext)] == []
    finally:
        gc.enable()
    assert store.scalar("SELECT count() FROM freed") == 6


def test_an_insert_repeated_under_its_token_counts_once_in_every_rollup(store: Store) -> None:
    """The sink retries an insert whose outcome it did not learn under the same deduplication token: ClickHouse drops
    the repeat, and every table a materialized view fills from it (cost_hourly, the stored-keys tables, the trace
    lookup) drops it too. Before, probe p47 F2, cost_hourly counted the dropped block again: 12 calls for 11 billed."""
    from tests.unit.test_rows import SAMPLE_ROWS

    def counts() -> dict[str, int]:
        derived = [name for name in DERIVED if not name.endswith("_mv")]
        return {**{t: store.scalar(f"SELECT count() FROM {t}") for t in derived},
                "cost_hourly calls": store.scalar("SELECT sum(calls) FROM cost_hourly"),
                **{t.name: store.scalar(f"SELECT count() FROM {t.name}") for t in TABLES}}

    def insert_all() -> None:
        for table in TABLES:
            values, extra = SAMPLE_ROWS[table.name]
            store.insert_columns(table.name, table.columns, table.data(values, extra), token=f"once-{table.name}")

    insert_all()
    once = counts()
    assert once["cost_hourly calls"] == once["cost_ledger"] > 0
    assert all(once[name] > 0 for name in DERIVED if not name.endswith("_mv")), once
    insert_all()  # the same blocks under the same tokens
    assert counts() == once
