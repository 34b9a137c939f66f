"""`lockgate sql`'s result bounds as the least-privileged CLI role meets them, against the stack as `lockgate up` runs
it (embedded nats-server with its users, the query service on chDB): past 100,000 rows or the bytes one reply carries
a query is refused saying so, whatever its shape, before its result is built.

Before (probe p44 F1), ClickHouse's max_result_rows/bytes were the only bounds: they are checked between blocks, so one
block of 50 MB passed, and not at all on the first part of `... UNION ALL SELECT 0`, whose 3,000,001 rows were built
as Python dicts before the reply was found too large for NATS."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import pytest
from click.testing import CliRunner, Result

from lockgate.cli.main import cli
from lockgate.config import Settings
from lockgate.server.runtime import Runtime
from lockgate.store.client import READONLY_SETTINGS

pytestmark = pytest.mark.timeout(120)

# The operator session's block size (ClickHouse's default where it sets none).
BLOCK_ROWS = int(READONLY_SETTINGS.get("max_block_size", 65409))


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["query"])
    await runtime.start()
    yield runtime
    await runtime.stop()


async def viewer_sql(runtime: Runtime, sql: str, *args: str) -> Result:
    """`lockgate --role viewer sql SQL` as a user runs it (in a thread: the stack answers on this loop)."""
    s = runtime.settings
    env = {"LOCKGATE_HOME": s.home, "LOCKGATE_NATS_URL": s.nats_url, "LOCKGATE_PREFIX": s.prefix,
           "LOCKGATE_ROLE": None, "LOCKGATE_NATS_USER": None, "LOCKGATE_NATS_PASSWORD": None,
           "LOCKGATE_CLICKHOUSE_URL": None}
    return await asyncio.to_thread(CliRunner().invoke, cli, ["--role", "viewer", "sql", sql, *args], env=env,
                                   catch_exceptions=False)


def refusal(result: Result, max_bytes: int) -> str:
    """The one-line refusal of a query past the bounds, naming both (exit 2, as QueryRefused exits)."""
    said = result.stderr
    assert result.exit_code == 2 and "Traceback" not in result.output and len(said.splitlines()) == 1, result.output
    assert said.startswith(f"error: operator SQL returns at most 100,000 rows and {max_bytes:,} bytes"), said
    assert "add a LIMIT, aggregate or filter" in said, said
    return said


async def test_a_union_all_carries_no_rows_past_the_row_bound(stack: Runtime) -> None:
    # 3,000,001 rows of 8 bytes of JSON each: only the row bound stops them (the control, the same SELECT alone, was
    # refused before too). Before: built whole, then "the result of query 'sql' is 24,000,013 bytes".
    max_bytes = stack.ctx.bus.nc.max_payload
    for sql in ("SELECT 0 AS a FROM numbers(3000000) UNION ALL SELECT 0",
                "SELECT 0 AS a FROM numbers(3000000)"):
        said = refusal(await viewer_sql(stack, sql), max_bytes)
        assert "max rows: 100.00 thousand" in said or "more than 100,000 rows" in said, said
    # Up to the bound a query answers as before, its rows in its own order, with its own column names.
    result = await viewer_sql(stack, "SELECT 1 AS a FROM numbers(100000)", "--json")
    assert result.exit_code == 0 and len(json.loads(result.stdout)) == 100_000, result.output
    result = await viewer_sql(stack, "SELECT number AS n, n * 2 FROM numbers(5) ORDER BY n DESC -- last", "--json")
    assert json.loads(result.stdout) == [{"n": n, "multiply(n, 2)": n * 2} for n in (4, 3, 2, 1, 0)], result.output
    result = await viewer_sql(stack, "DESCRIBE (SELECT 1 AS a)", "--json")
    assert [r["name"] for r in json.loads(result.stdout)] == ["a"], result.output
    # A trailing clause cannot end the subquery the bound wraps the statement in: refused, as any FORMAT is.
    result = await viewer_sql(stack, "SELECT 1 FORMAT Native")
    assert result.exit_code == 2 and "may not choose an output FORMAT" in result.stderr, result.output


async def test_a_result_past_the_byte_bound_is_refused_before_it_is_built(stack: Runtime) -> None:
    # One block of 50,000 rows of 1 kB (50 MB, under ClickHouse's default block size), and 50 MB as the first part of
    # a UNION ALL: either reply would be more than one NATS message carries. Before: both built whole in the stack's
    # process (the probe's 800 rows of 1 MB took it from 0.9 to 4.3 GB), then "the result of query 'sql' is 50,xxx,xxx
    # bytes, more than the 1,048,576 one NATS message may carry".
    max_bytes = stack.ctx.bus.nc.max_payload
    for sql, rows in (("SELECT repeat('x', 1000) AS s FROM numbers(50000)", 50_000),
                      ("SELECT repeat('x', 10000) AS s FROM numbers(5000) UNION ALL SELECT ''", 5_001)):
        said = refusal(await viewer_sql(stack, sql), max_bytes)
        stopped = re.search(r"stopped at [\d,]+ bytes of JSON after ([\d,]+) rows", said)
        assert stopped, said
        # Read block by block and stopped at the first block past the bound: the rest never became Python objects.
        read = int(stopped[1].replace(",", ""))
        assert read <= 2 * BLOCK_ROWS < rows, said
