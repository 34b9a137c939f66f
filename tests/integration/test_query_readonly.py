"""Operator SQL is read-only by construction (issue 7, item 5): every attack that once worked over
NATS is refused through the real query service and the `lockgate sql` CLI, and the audit log is
untouched afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.errors import QueryRefused, StoreUnavailable
from lockgate.queryclient import ask
from lockgate.server.service import ServiceContext
from lockgate.store import Store

pytestmark = pytest.mark.timeout(120)

DECISION_COLUMNS = ("id", "time", "release", "action", "actor", "decision", "eval_run", "policy", "baseline",
                    "rules", "reason", "signature", "key_id", "tenant")


def attacks(tmp: Path) -> dict[str, str]:
    """Each statement that must be refused, by the trick it tries (`{tmp}` holds would-be files)."""
    return {
        # The old surface appended `SETTINGS readonly = 1`: a trailing comment swallowed it.
        "line comment": "ALTER TABLE gate_decisions DELETE WHERE 1 --",
        "block comment": "DROP TABLE gate_decisions /*",
        "comment hides a second statement": "SELECT 1 /* x */; DROP TABLE gate_decisions -- ",
        "several statements": "SELECT 1; ALTER TABLE gate_decisions DELETE WHERE 1",
        "settings override": "SELECT count() FROM gate_decisions SETTINGS readonly = 0",
        "settings after a comment": "SELECT 1 -- \nSETTINGS readonly = 0",
        "insert": "INSERT INTO gate_decisions (id, release) VALUES ('forged', 'shop-v2')",
        "alter delete": "ALTER TABLE gate_decisions DELETE WHERE 1",
        "drop": "DROP TABLE gate_decisions",
        "create": "CREATE TABLE evil (a Int8) ENGINE = Memory",
        "system": "SYSTEM FLUSH LOGS",
        "kill": "KILL QUERY WHERE 1",
        "truncate": "TRUNCATE TABLE gate_decisions",
        "set": "SET readonly = 0",
        "file() reads a host file": "SELECT * FROM file('/etc/passwd', 'LineAsString')",
        "scalar file() reads a host file": "SELECT file('/etc/passwd')",
        "insert into function file() writes one": f"INSERT INTO FUNCTION file('{tmp}/w.csv', CSV) SELECT 1",
        "into outfile writes one": f"SELECT 1 INTO OUTFILE '{tmp}/o.txt'",
        "file() inside a view()": "SELECT * FROM view(SELECT * FROM file('/etc/passwd', 'LineAsString'))",
        "file() in a subquery": "SELECT 1 WHERE 1 IN (SELECT count() FROM file('/etc/passwd', 'LineAsString'))",
        "FILE() in capitals": "SELECT * FROM FILE('/etc/passwd', 'LineAsString')",
        "url": "SELECT * FROM url('http://127.0.0.1:1/x', CSV, 'a String')",
        "remote": "SELECT * FROM remote('127.0.0.1', system.one)",
        "remoteSecure": "SELECT * FROM remoteSecure('127.0.0.1', system.one)",
        "s3": "SELECT * FROM s3('http://127.0.0.1:1/b/k.csv', CSV, 'a String')",
        "hdfs": "SELECT * FROM hdfs('hdfs://127.0.0.1:1/x', CSV, 'a String')",
        "mysql": "SELECT * FROM mysql('127.0.0.1:1', 'db', 't', 'u', 'p')",
        "postgresql": "SELECT * FROM postgresql('127.0.0.1:1', 'db', 't', 'u', 'p')",
        "jdbc": "SELECT * FROM jdbc('jdbc:mysql://127.0.0.1:1/db', 't')",
        "odbc": "SELECT * FROM odbc('DSN=x', 'db', 't')",
        "input": "SELECT * FROM input('a String')",
        "cluster": "SELECT * FROM cluster('default', system.one)",
        "azureBlobStorage": "SELECT * FROM azureBlobStorage('http://127.0.0.1:1', 'c', 'b', 'a', 'k', 'CSV')",
        "executable": "SELECT * FROM executable('x.sh', CSV, 'a String')",
        "sqlite": "SELECT * FROM sqlite('/etc/passwd', 't')",
        "chDB's Python()": "SELECT * FROM Python(x)",
        "format choice": "SELECT 1 FORMAT JSON",
    }


async def test_operator_sql_attacks_are_refused_and_the_audit_log_is_unchanged(
    run_services: Callable[..., Any], bus: Bus, store: Store, settings: Settings, tmp_path: Path
) -> None:
    await run_services("query")
    row = ["d-1", datetime(2024, 5, 6, tzinfo=UTC), "shop-v2", "decided", "gatekeeper", "BLOCK", "run-1", "policy",
           "", "[]", "quality below 0.8", "sig", "key-1", "acme"]
    store.insert_rows("gate_decisions", DECISION_COLUMNS, [row], token=None)
    tables_before = store.rows("SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name")

    for trick, sql in attacks(tmp_path).items():
        with pytest.raises(QueryRefused) as refused:
            await ask(bus, "sql", {"query": sql})
        assert refused.value.message, trick  # a clear reason travels back to the operator

    # The CLI shows the refusal and exits non-zero (one of each family is enough here).
    for trick in ("line comment", "several statements", "file() reads a host file", "insert"):
        result = await asyncio.to_thread(_cli, settings, "sql", attacks(tmp_path)[trick])
        assert result.exit_code != 0, trick
        assert "operator SQL" in result.output or "read-only" in result.output, (trick, result.output)

    # Nothing changed: the decision is still there, no table came or went, no file was written.
    assert store.scalar("SELECT count() FROM gate_decisions") == 1
    assert store.rows("SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name") \
        == tables_before
    assert not await asyncio.to_thread(lambda: list(tmp_path.iterdir()))
    # The service's own writer session was not left read-only by any of it.
    store.insert_rows("gate_decisions", DECISION_COLUMNS, [["d-2", *row[1:]]], token=None)


async def test_plain_reads_still_work(run_services: Callable[..., Any], bus: Bus, settings: Settings) -> None:
    await run_services("query")
    rows = await ask(bus, "sql", {"query": "SELECT count() AS n FROM gate_decisions -- how many?"})
    assert rows == [{"n": 0}]
    rows = await ask(bus, "sql", {"query": "WITH 2 AS x SELECT x /* two */ UNION ALL SELECT number FROM numbers(1)"})
    assert sorted(r["x"] for r in rows) == [0, 2]
    described = await ask(bus, "sql", {"query": "DESCRIBE TABLE gate_decisions"})
    assert "release" in {r["name"] for r in described}
    result = await asyncio.to_thread(_cli, settings, "sql", "SELECT 41 + 1 AS answer", "--json")
    assert result.exit_code == 0 and '"answer": 42' in result.output


async def test_a_result_past_the_sessions_bounds_is_refused_by_clickhouse_not_built_in_memory(
    run_services: Callable[..., Any], bus: Bus, settings: Settings
) -> None:
    # Unbounded, a viewer's `numbers(1e9)` was computed whole and made Python rows in the stack's process
    # (gigabytes) before the reply was found too large; the endless `system.numbers` grew `lockgate up` to
    # 23 GB until the kernel killed it. ClickHouse now stops them at the profile's bounds.
    await run_services("query")
    for sql in ("SELECT number FROM system.numbers", "SELECT number FROM numbers(200000)",
                "SELECT repeat(toString(number), 300) FROM numbers(90000)",
                "SELECT groupArray(number) AS a FROM numbers(50000000)",
                "SELECT groupArray(number) FROM numbers(1000000000)"):
        with pytest.raises(QueryRefused, match=r"at most 100,000 rows and [\d,]+ bytes.*add a LIMIT"):
            await ask(bus, "sql", {"query": sql})
    result = await asyncio.to_thread(_cli, settings, "sql", "SELECT number FROM system.numbers")
    assert result.exit_code == 2 and "add a LIMIT" in result.output, result.output
    # Reading many rows to compute a small answer is what operator SQL is for: still fine.
    rows = await ask(bus, "sql", {"query": "SELECT count() AS n FROM (SELECT number FROM numbers(3000000))"})
    assert rows == [{"n": 3000000}]


def _cli(settings: Settings, *args: str) -> Any:
    from lockgate.cli.main import cli

    env = {"LOCKGATE_NATS_URL": settings.nats_url, "LOCKGATE_PREFIX": settings.prefix,
           "LOCKGATE_DATABASE": settings.database, "LOCKGATE_CLICKHOUSE_URL": settings.clickhouse_url}
    return CliRunner().invoke(cli, list(args), env=env)


async def test_operator_sql_runs_where_clickhouse_readonly_url_points(
    context: ServiceContext, run_services: Callable[..., Any], bus: Bus
) -> None:
    # Server mode points operator SQL at a read-only ClickHouse user; here the URL leads nowhere,
    # which shows operator SQL uses it while the named queries keep the service's own session.
    context.settings = context.settings.replace(clickhouse_readonly_url="http://127.0.0.1:1")
    await run_services("query")
    with pytest.raises(StoreUnavailable, match="127.0.0.1:1"):
        await ask(bus, "sql", {"query": "SELECT 1"})
    assert await ask(bus, "decisions", {}) == []
