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
