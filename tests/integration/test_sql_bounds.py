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
import resource
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
        # Stopped in ClickHouse at the row past the bound (probe p49 F1), or read block by block and stopped at the
        # first block past it: either way the rest never became Python objects.
        if f"stopped by ClickHouse at the row whose running total of text passed {max_bytes:,} bytes" in said:
            continue
        stopped = re.search(r"stopped at [\d,]+ bytes of JSON after ([\d,]+) rows", said)
        assert stopped, said
        read = int(stopped[1].replace(",", ""))
        assert read <= 2 * BLOCK_ROWS < rows, said


def _peak_rss_bytes() -> int:
    """This process's peak resident memory so far (the stack runs in it: chDB and the query service are embedded)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def test_an_array_join_block_is_stopped_in_clickhouse_before_python_reads_it(stack: Runtime) -> None:
    # max_block_size does not split what an arrayJoin makes: 100,000 rows of 1 kB come as one block of 100 MB of JSON.
    # Before (probe p49 F1): read whole into Python, refused "(stopped at 100,900,001 bytes of JSON after 100,000
    # rows)" and the process went from 0.4 to 1.1 GB (with rows of 10 kB: 17.9 s and 4.5 GB).
    max_bytes = stack.ctx.bus.nc.max_payload
    before = _peak_rss_bytes()
    for sql in ("SELECT repeat('x', 1000) AS s FROM (SELECT arrayJoin(range(100000)))",
                "SELECT repeat('x', 1000) AS s FROM (SELECT 1) ARRAY JOIN range(100000) AS r"):
        said = refusal(await viewer_sql(stack, sql), max_bytes)
        assert f"stopped by ClickHouse at the row whose running total of text passed {max_bytes:,} bytes" in said, said
    grown = _peak_rss_bytes() - before
    assert grown < 64 * 2**20, f"the process's peak memory grew by {grown:,} bytes"
    # Under the bound the same shape answers, in its own order.
    result = await viewer_sql(stack, "SELECT arrayJoin([3, 1, 2]) AS n ORDER BY n DESC", "--json")
    assert json.loads(result.stdout) == [{"n": 3}, {"n": 2}, {"n": 1}], result.output


def _nested(levels: int) -> str:
    """A column whose type doubles at each level: Tuple(Tuple(...), Tuple(...)), 2**levels UInt8s."""
    sql = "SELECT 1 AS c"
    for _ in range(levels):
        sql = f"SELECT (c, c) AS c FROM ({sql})"
    return sql


async def test_a_describe_is_bounded_in_depth_and_bytes(stack: Runtime) -> None:
    # Before (probe p49 F1): 20 levels (544 characters) made one DESCRIBE row of 14.7 MB, read whole, and 22 levels
    # ran `toTypeName` 41 s past the 25 s max_execution_time (types are worked out before it is checked).
    depth = int(READONLY_SETTINGS["max_subquery_depth"])
    for sql in (f"DESCRIBE ({_nested(20)})", f"SELECT toTypeName(c) AS t FROM ({_nested(20)})"):
        result = await viewer_sql(stack, sql)
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
        assert result.stderr.startswith(f"error: operator SQL nests subqueries at most {depth} deep"), result.output
    # Within the depth, a DESCRIBE past the byte bound is refused naming it: (c, c, c, c, c) over 8 levels is 3.4 MB.
    wide = "SELECT 1 AS c"
    for _ in range(depth):
        wide = f"SELECT (c, c, c, c, c) AS c FROM ({wide})"
    said = refusal(await viewer_sql(stack, f"DESCRIBE ({wide})"), stack.ctx.bus.nc.max_payload)
    assert re.search(r"\(the DESCRIBE is [\d,]+ bytes of JSON\)$", said), said


async def test_legal_queries_still_answer(stack: Runtime) -> None:
    for sql, expected in (
        ("WITH 2 AS k SELECT number * k AS n FROM numbers(3)", [{"n": 0}, {"n": 2}, {"n": 4}]),
        ("SELECT a FROM (SELECT 1 AS a UNION ALL SELECT 2) ORDER BY a DESC", [{"a": 2}, {"a": 1}]),
        ("SELECT l.n AS n, r.m AS m FROM (SELECT number AS n FROM numbers(2)) AS l "
         "JOIN (SELECT number AS n, number * 10 AS m FROM numbers(2)) AS r ON l.n = r.n ORDER BY n",
         [{"n": 0, "m": 0}, {"n": 1, "m": 10}]),
        ("SELECT number % 2 AS k, number AS n FROM numbers(6) ORDER BY k, n LIMIT 1 BY k",
         [{"k": 0, "n": 0}, {"k": 1, "n": 1}]),
        (f"SELECT count() AS n FROM ({_nested(5)})", [{"n": 1}]),
    ):
        result = await viewer_sql(stack, sql, "--json")
        assert result.exit_code == 0 and json.loads(result.stdout) == expected, (sql, result.output)
    result = await viewer_sql(stack, "DESCRIBE TABLE inference_events", "--json")
    assert result.exit_code == 0 and "tenant" in [r["name"] for r in json.loads(result.stdout)], result.output
