"""Operator SQL (`lockgate sql`, the `sql` named query): one read-only statement, checked by
ClickHouse's own parser and run in a session whose readonly setting no query text can change.

Three independent layers, so that a gap in one is not a hole:
1. the session: `Store.readonly_rows` opens its own ClickHouse session with readonly=1 set before any
   text arrives (on a server: a URL parameter of every request, and the `lockgate_reader` user of
   deploy/clickhouse/users.d); readonly=1 also refuses `SETTINGS readonly = 0` in the text;
2. one statement: `formatQuery()` parses the text passed as a bound parameter (never spliced into
   SQL), refuses several statements and returns the canonical text without comments; only that
   canonical text is run, so comment tricks (`--`, `/* */`) have nothing left to hide behind;
3. the statement's structure: `EXPLAIN AST` of the canonical text is walked node by node; the
   statement kind must be on an allow-list (SELECT, DESCRIBE), it may not carry INTO OUTFILE,
   FORMAT or SETTINGS, and it may name no function that reaches files, the network, processes
   or the host (readonly=1 alone does not stop the scalar `file()` nor INTO OUTFILE in chDB).

Its result is bounded apart from the checks: a SELECT runs as the subquery of one with a LIMIT past the row bound
(ClickHouse's max_result_rows missed the first part of `... UNION ALL SELECT 0`), and its rows are read block by
block up to a byte bound (`Store.readonly_rows`; max_result_bytes is checked between blocks only). Probe p44 F1.
The same outer SELECT counts each row's text in ClickHouse and throws once the running total passes the byte bound,
so no block past it reaches Python whatever its row count: max_block_size does not split the block an arrayJoin
makes, and one of 100,000 rows of 10 kB came whole (1 GB of JSON, 4.5 GB of process memory). Probe p49 F1.
"""

from __future__ import annotations

import re
from typing import Any

from lockgate.codec import to_json
from lockgate.errors import QueryRefused, StoreUnavailable
from lockgate.store import Store
from lockgate.store.client import BYTES_PAST_BOUND, READONLY_SETTINGS, over_bounds

MAX_SQL_CHARS = 100_000
# The most rows an answer holds: the session's max_result_rows, kept again by the LIMIT `bounded` adds (ClickHouse's
# own missed the first part of a UNION ALL).
MAX_ROWS = int(READONLY_SETTINGS["max_result_rows"])

# Statement kinds (the AST's root node) an operator may run.
ALLOWED_STATEMENTS = frozenset({"SelectWithUnionQuery", "SelectIntersectExceptQuery", "DescribeQuery"})

# Table functions that only compute rows in memory; every other table function is refused.
SAFE_TABLE_FUNCTIONS = frozenset({
    "numbers", "numbers_mt", "zeros", "zeros_mt", "values", "generate_series", "generateseries",
    "generaterandom", "null", "view",
})

# Functions that read or write files, reach the network or other databases, run processes, or read
# the host process's memory (chDB's `python`); refused wherever they appear (table or scalar).
# Source: ClickHouse docs "Table Functions" and "Other Functions" (file), chDB docs (Python).
FORBIDDEN_FUNCTIONS = frozenset({
    "file", "filecluster", "url", "urlcluster", "remote", "remotesecure", "cluster", "clusterallreplicas",
    "s3", "s3cluster", "gcs", "cosn", "oss", "hdfs", "hdfscluster", "azureblobstorage", "azureblobstoragecluster",
    "mysql", "postgresql", "jdbc", "odbc", "sqlite", "mongodb", "redis", "input", "executable", "executablepool",
    "python", "arrowflight", "ytsaurus", "hive", "loop", "prometheusquery", "timeseriesdata",
    "filesystem", "fuzzjson", "fuzzquery",
})
# Families named by prefix (iceberg, icebergS3, deltaLakeAzure, hudi, paimonHDFS, ...).
FORBIDDEN_PREFIXES = ("iceberg", "deltalake", "hudi", "paimon", "s3", "hdfs", "azure", "url", "remote", "mysql",
                      "postgres", "mongo", "file", "executable", "cluster")

_NODE = re.compile(r"^( *)(\w+)(?: (\S+))?")


def _forbidden(name: str) -> bool:
    low = name.lower()
    return low in FORBIDDEN_FUNCTIONS or low.startswith(FORBIDDEN_PREFIXES)


def _canonical(store: Store, query: str) -> str:
    """The text as ClickHouse's parser sees it: exactly one statement, comments gone."""
    rows = store.readonly_rows("SELECT formatQuery({q:String}) AS q", {"q": query})
    return str(rows[0]["q"])


def check_ast(lines: list[str]) -> str:
    """The statement's kind; refused if its `EXPLAIN AST` shows a kind, clause or function operators may not use."""
    if not lines:
        raise QueryRefused("ClickHouse returned no syntax tree for the query")
    root = _NODE.match(lines[0])
    kind = root.group(2) if root else lines[0]
    if kind not in ALLOWED_STATEMENTS:
        raise QueryRefused(f"operator SQL may only read (SELECT or DESCRIBE; list tables with "
                            f"SELECT name FROM system.tables), not run a {kind}")
    statement = kind
    parents = [kind]  # node kind at each depth, to tell a table function from a scalar one
    for line in lines[1:]:
        node = _NODE.match(line)
        if node is None or not node.group(2):
            continue  # a continuation of a quoted alias that spans lines: not a node
        depth, kind, name = len(node.group(1)), node.group(2), node.group(3) or ""
        if depth == 1:
            if kind == "Set":
                raise QueryRefused("operator SQL may not carry a SETTINGS clause; the session's settings are fixed")
            if kind == "Literal":
                raise QueryRefused("operator SQL may not write a file (INTO OUTFILE)")
            if kind == "Identifier" and name != "Native":
                raise QueryRefused(f"operator SQL may not choose an output FORMAT ({name}); lockgate renders rows")
        del parents[depth:]
        parents.extend([""] * (depth - len(parents)))
        if kind == "Function":
            if _forbidden(name):
                raise QueryRefused(f"operator SQL may not use {name}(): it reaches files, the network or the host")
            in_table = depth > 0 and parents[depth - 1] == "TableExpression"
            if in_table and name.lower() not in SAFE_TABLE_FUNCTIONS:
                raise QueryRefused(f"operator SQL may only read lockgate's tables; table function {name}() is not "
                                   f"allowed (allowed: {', '.join(sorted(SAFE_TABLE_FUNCTIONS))})")
        if kind == "Set":
            raise QueryRefused("operator SQL may not carry a SETTINGS clause; the session's settings are fixed")
        parents.append(kind)
    return statement


# The running byte count `bounded` adds, and drops again before the rows leave ClickHouse.
_BYTES_COLUMN = "_lockgate_result_bytes"


def bounded(store: Store, canonical: str, max_bytes: int) -> str:
    """A SELECT as it is run: the subquery of one that stops one row past MAX_ROWS, so no more rows than that are
    ever made, and that throws (BYTES_PAST_BOUND) at the first row whose running total of text passes `max_bytes`,
    so the block holding it never leaves ClickHouse, whatever the statement's shape. A row's text is its tuple's
    toString, near its JSON (which adds the column names). `canonical` is ClickHouse's printout (no comments; SETTINGS
    and INTO OUTFILE refused by `check_ast`), on lines of its own; the whole is parsed again, and a FORMAT (Native
    passes `check_ast`: clickhouse-connect adds it to every query) is refused, as a subquery cannot end in one."""
    text = (f"SELECT * EXCEPT ({_BYTES_COLUMN}) FROM (SELECT *, sum(length(toString(tuple(*)))) OVER "
            f"(ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS {_BYTES_COLUMN} FROM (\n{canonical}\n))\n"
            f"WHERE throwIf({_BYTES_COLUMN} > {max_bytes}, '{BYTES_PAST_BOUND}') = 0\nLIMIT {MAX_ROWS + 1}")
    try:
        return _canonical(store, text)
    except StoreUnavailable as exc:
        if "SYNTAX_ERROR" in exc.message or "Syntax error" in exc.message:
            raise QueryRefused("operator SQL may not choose an output FORMAT; lockgate renders rows") from None
        raise


def readonly_sql(store: Store, query: str) -> list[dict[str, Any]]:
    """Plain SQL for operators: one read-only statement, checked by ClickHouse's parser, run read-only."""
    if not query.strip():
        raise QueryRefused("operator SQL is empty")
    if len(query) > MAX_SQL_CHARS:
        raise QueryRefused(f"operator SQL is {len(query):,} characters, more than {MAX_SQL_CHARS:,}")
    try:
        canonical = _canonical(store, query)
    except StoreUnavailable as exc:
        if "Multi-statements" in exc.message:
            raise QueryRefused("operator SQL runs one statement at a time; remove the ';' and what follows") from None
        if "SYNTAX_ERROR" in exc.message or "Syntax error" in exc.message:
            raise QueryRefused(f"ClickHouse cannot parse the query: {exc.message}") from None
        raise  # ClickHouse itself is unreachable: a retryable outage, not the operator's mistake
    # The canonical text is one statement printed by ClickHouse, so prefixing it is safe.
    try:
        explained = store.readonly_rows(f"EXPLAIN AST {canonical}")
    except StoreUnavailable as exc:  # e.g. SYSTEM or SET cannot be explained: not a query
        raise QueryRefused(f"operator SQL may only read (SELECT or DESCRIBE): {exc.message}") from None
    lines = [str(next(iter(row.values()))) for row in explained]
    if check_ast(lines) == "DescribeQuery":
        # One row per column the statement names (its text is at most MAX_SQL_CHARS); ClickHouse takes no DESCRIBE
        # as a subquery, nor chDB as a stream, so it is read whole and then held to the byte bound: a row's type is
        # as big as the session's max_subquery_depth lets it grow (probe p49 F1: 20 levels made one of 14.7 MB).
        rows = store.readonly_rows(canonical)
        size = len(to_json(rows))
        if size > store.readonly_result_bytes:
            raise QueryRefused(over_bounds(f"the DESCRIBE is {size:,} bytes of JSON", store.readonly_result_bytes))
        return rows
    max_bytes = store.readonly_result_bytes
    rows = store.readonly_rows(bounded(store, canonical, max_bytes), max_bytes=max_bytes)
    if len(rows) > MAX_ROWS:  # the session's max_result_rows stops most first
        raise QueryRefused(over_bounds(f"more than {MAX_ROWS:,} rows", store.readonly_result_bytes))
    return rows
