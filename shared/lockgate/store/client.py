"""clickhouse-connect client from one URL: `chdb://PATH` (embedded) or `http(s)://host:8123`."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from itertools import repeat
from operator import floordiv, mul, sub
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError, DataError

from lockgate.codec import to_json
from lockgate.errors import ConfigError, QueryRefused, RowsRefused, StoreUnavailable

_DB = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# The operator SQL session: settings fixed when the session opens, before any query text exists.
# With readonly=1 ClickHouse refuses writes, DDL and any later change of a setting (including
# `SETTINGS readonly = 0` in the text); on a server the same settings ride on every HTTP request
# as URL parameters, never in the text. The bounds are the `lockgate_readonly` profile's
# (deploy/clickhouse/users.d/lockgate.xml; tests/integration/test_clickhouse_users.py checks they agree): on
# chDB there is no profile, and a viewer's `SELECT number FROM numbers(1e9)` was computed in full and turned
# into Python rows inside the query service's process (the whole stack's, embedded) before any check.
# `readonly` comes last: chDB applies them one SET at a time, and readonly=1 refuses every later one.
# They are tight for an embedded stack: a query stops before the CLI's 30 s wait does, and a result may be a
# few times what one reply carries (1 MB by default), room for its in-memory form.
# max_block_size: ClickHouse checks max_result_rows/bytes only between blocks, and a block comes to Python whole;
# `readonly_rows` counts the bytes block by block, so a block of at most this many rows is what may be read past
# the byte bound before the query is stopped (ClickHouse's default, 65,409 rows, let one 50 MB block through: probe
# p44 F1). max_block_size does not split what an arrayJoin makes (one block of 100,000 rows, probe p49 F1): operator
# SQL's SELECT also counts its rows' bytes in ClickHouse (`operator_sql.bounded`, BYTES_PAST_BOUND).
# max_subquery_depth: a statement's types are worked out before max_execution_time is checked, and they double with
# each `SELECT (c, c) AS c FROM (...)` around the last: 20 of them (544 characters) made a 14.7 MB DESCRIBE row, and 22
# ran `toTypeName` 41 s past the 25 s bound (probe p49 F1). 8 levels (3 of them `bounded`'s) cap that.
# max_threads: the running byte count is a window function, after which ClickHouse splits the rows over threads again
# and a statement's ORDER BY came back in any order; one thread keeps it (and leaves the embedded stack's cores to it).
READONLY_SETTINGS = {"max_execution_time": "25", "max_memory_usage": "2000000000", "max_result_rows": "100000",
                     "max_result_bytes": "16000000", "result_overflow_mode": "throw", "max_block_size": "1024",
                     "max_subquery_depth": "8", "max_threads": "1", "readonly": "1"}
# The message of the throwIf that stops a SELECT once its rows' running byte total passes the bound in ClickHouse.
BYTES_PAST_BOUND = "lockgate: operator SQL result past its byte bound"
# ClickHouse's answers to a query that went past those bounds, final for that text and the operator's to change:
# TOO_MANY_ROWS, TIMEOUT_EXCEEDED, MEMORY_LIMIT_EXCEEDED, TOO_MANY_BYTES, TOO_MANY_ROWS_OR_BYTES.
_OVER_BOUNDS = frozenset({158, 159, 241, 307, 396})
_TOO_DEEP_SUBQUERIES = 162


def over_bounds(detail: str, max_bytes: int | None = None) -> str:
    """Operator SQL's refusal of a query past its bounds: the bounds (`max_bytes` where a reply carries less than
    the session's max_result_bytes), what to do, and `detail`, what was crossed."""
    max_bytes = int(READONLY_SETTINGS["max_result_bytes"]) if max_bytes is None else max_bytes
    return (f"operator SQL returns at most {int(READONLY_SETTINGS['max_result_rows']):,} rows and {max_bytes:,} bytes, "
            f"and runs at most {READONLY_SETTINGS['max_execution_time']} s in "
            f"{int(READONLY_SETTINGS['max_memory_usage']):,} bytes of memory: add a LIMIT, aggregate or filter "
            f"({detail})")


def chdb_path(url: str) -> Path | None:
    """The directory a chdb:// URL names (chdb://relative/path and chdb:///abs/path both do); None for an
    in-memory database or another scheme."""
    parsed = urlparse(url)
    location = (parsed.netloc + parsed.path) if parsed.netloc else parsed.path
    if parsed.scheme != "chdb" or location in ("", "memory", ":memory:"):
        return None
    return Path(location).expanduser().resolve()


def chdb_in_use(path: Path) -> bool:
    """Another process has the chDB directory open: ClickHouse holds its `status` file flock'd while it runs,
    with its PID on the first line (this process's own engine is no obstacle: chDB shares it). Asked before
    opening, since chDB refuses a second process by printing its native error to stderr first."""
    try:
        fd = os.open(path / "status", os.O_RDONLY)
    except OSError:
        return False  # never opened, or not a chDB directory: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        first = os.read(fd, 64).decode(errors="replace").partition("\n")[0]
        return first != f"PID: {os.getpid()}"
    finally:
        os.close(fd)  # releases the probe's own lock, if it got one
    return False


def _private(path: Path) -> None:
    """Make the embedded store's directory this user's alone (0700): it holds every tenant's prompts, responses,
    spans and audit log, and chDB writes its parts with the process umask (0644 under 022), so any local account
    could copy and open them, credentials or not (probe p10). Closing the directory closes everything under it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:  # made before (or by another tool) open to others
        try:
            path.chmod(0o700)
        except OSError as exc:  # not ours to change: say so rather than serve from it open
            raise ConfigError(f"the store directory {path} is readable by other users and cannot be closed "
                              f"({exc.strerror}): chmod 700 it, or point LOCKGATE_CLICKHOUSE_URL elsewhere") from None


# Every time read back is aware: clickhouse-connect's default ("naive_utc") drops the zone of a UTC column, and a
# naive time went out in every JSON reply and `--json` as "2026-12-06T19:14:50.352549", which a script in another
# zone reads as its own local time. "aware" costs nothing per row, and gives bare DateTime columns the server's zone.
_TZ_MODE = "aware"


def _raw_client(url: str, database: str | None, settings: dict[str, str] | None = None) -> Any:
    parsed = urlparse(url)
    if parsed.scheme == "chdb":
        # One directory per process. Each client is its own chDB session (session settings are per handle)
        # on shared data.
        path = chdb_path(url)
        if path is None:
            return clickhouse_connect.get_client(dsn="chdb://memory", database=database, settings=settings,
                                                 tz_mode=_TZ_MODE)
        _private(path)
        return clickhouse_connect.get_client(dsn=f"chdb://{path}", database=database, settings=settings,
                                             tz_mode=_TZ_MODE)
    if parsed.scheme in ("http", "https"):
        return clickhouse_connect.get_client(dsn=url, database=database or "default", settings=settings,
                                             tz_mode=_TZ_MODE)
    raise ConfigError(f"ClickHouse URL {url!r} must start with chdb://, http:// or https://")


class Store:
    """A ClickHouse database. Calls run in a worker thread so the event loop never blocks."""

    def __init__(self, url: str, database: str = "lockgate") -> None:
        if not _DB.match(database):
            raise ConfigError(f"database name {database!r} must be an identifier")
        self.url = url
        self.database = database
        # Where operator SQL runs: the same server as a read-only user in server mode (see
        # deploy/clickhouse/users.d/lockgate.xml); its session is read-only whichever URL it is.
        self.readonly_url = url
        try:
            admin = _raw_client(url, None)
            admin.command(f"CREATE DATABASE IF NOT EXISTS {database}")
            self._client = _raw_client(url, database)
        except ClickHouseError as exc:
            raise StoreUnavailable(f"cannot open ClickHouse at {url}: {exc}") from None
        # clickhouse-connect clients are not safe for concurrent use (HTTP sessions lock).
        self._lock = threading.Lock()
        self._types: dict[str, dict[str, str]] = {}  # column types by table, for inserts
        self._readonly: Any = None  # the operator SQL session, opened on first use
        self._readonly_lock = threading.Lock()
        # The most bytes of JSON an operator SQL result may be (`readonly_sql`): the session's max_result_bytes, lowered
        # by the query service to what one NATS message carries.
        self.readonly_result_bytes = int(READONLY_SETTINGS["max_result_bytes"])
        # Settings every `rows` query of this client carries (the query service's sessions for named queries: their
        # bounds ride on each query, never in its text, and leave the session as it was).
        self.query_settings: dict[str, str] | None = None

    @property
    def exclusive(self) -> bool:
        """True when no other process can write this database while this one has it open (chDB: one
        process per data path), so what this process inserted is all that was inserted since it opened."""
        return urlparse(self.url).scheme == "chdb"

    # synchronous API (CLI, tests, migrations)
    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        """Run a statement."""
        with self._lock:
            try:
                return self._client.command(sql, parameters=parameters)
            except ClickHouseError as exc:
                raise StoreUnavailable(f"ClickHouse rejected statement: {_first_line(exc)}") from None

    def rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Query and return rows as dicts."""
        with self._lock:
            try:
                result = self._client.query(sql, parameters=parameters, settings=self.query_settings)
            except ClickHouseError as exc:
                if self.query_settings and _error_code(exc) in _OVER_BOUNDS:
                    # Stopped part way: the rest of its stream must not be read as the next query's answer.
                    with contextlib.suppress(Exception):
                        self._client.close()
                    self._client = _raw_client(self.url, self.database)
                    raise QueryRefused(f"the query went past the bounds it runs under (rows, bytes, time or memory; "
                                       f"ask for fewer rows or a narrower filter): {_first_line(exc)}") from None
                raise StoreUnavailable(f"ClickHouse rejected query: {_first_line(exc)}") from None
        names = result.column_names
        return [dict(zip(names, row, strict=True)) for row in result.result_rows]

    def readonly_rows(self, sql: str, parameters: dict[str, Any] | None = None, *,
                      max_bytes: int | None = None) -> list[dict[str, Any]]:
        """Rows from a session opened with readonly=1, which no query text can lift (operator SQL). With `max_bytes`
        (a SELECT) read block by block: once their JSON passes it the query is stopped and refused, the blocks after
        never read."""
        with self._readonly_lock:
            try:
                if self._readonly is None:
                    self._readonly = _raw_client(self.readonly_url, self.database, READONLY_SETTINGS)
                return self._read_bounded(sql, parameters, max_bytes)
            except ClickHouseError as exc:
                # A query stopped part way (a bound crossed after rows were sent) leaves the rest of its
                # stream in the session, where the next query read it as its own answer: a fresh one.
                self._close_readonly()
                if "(READONLY)" in str(exc):  # ClickHouse's own refusal: final, not worth a retry
                    raise QueryRefused(f"the read-only session refused it: {_first_line(exc)}") from None
                if _error_code(exc) in _OVER_BOUNDS:
                    raise QueryRefused(over_bounds(_first_line(exc), max_bytes)) from None
                if _error_code(exc) == _TOO_DEEP_SUBQUERIES:
                    raise QueryRefused(f"operator SQL nests subqueries at most "
                                       f"{READONLY_SETTINGS['max_subquery_depth']} deep (3 of them are the bounds "
                                       f"lockgate puts around a SELECT): {_first_line(exc)}") from None
                if max_bytes is not None and BYTES_PAST_BOUND in str(exc):
                    raise QueryRefused(over_bounds(f"stopped by ClickHouse at the row whose running total of text "
                                                   f"passed {max_bytes:,} bytes", max_bytes)) from None
                raise StoreUnavailable(f"ClickHouse rejected query: {_first_line(exc)}") from None
            except QueryRefused:
                self._close_readonly()  # stopped part way, as above
                raise

    def _read_bounded(self, sql: str, parameters: dict[str, Any] | None, max_bytes: int | None) -> list[dict[str, Any]]:
        if max_bytes is None:  # the checks' own reads (formatQuery, EXPLAIN: chDB streams neither), and DESCRIBE
            result = self._readonly.query(sql, parameters=parameters)
            names, whole = result.column_names, result.result_rows  # read here: a stream can fail late
            return [dict(zip(names, row, strict=True)) for row in whole]
        rows: list[dict[str, Any]] = []
        size = 0
        with self._readonly.query_row_block_stream(sql, parameters=parameters) as stream:
            names = stream.source.column_names
            for block in stream:
                batch = [dict(zip(names, row, strict=True)) for row in block]
                rows += batch
                size += len(to_json(batch))  # as the reply will carry them
                if size > max_bytes:
                    raise QueryRefused(over_bounds(f"stopped at {size:,} bytes of JSON after {len(rows):,} rows",
                                                   max_bytes))
        return rows

    def _close_readonly(self) -> None:
        if self._readonly is not None:
            with contextlib.suppress(Exception):
                self._readonly.close()
            self._readonly = None

    def scalar(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        """First column of the first row, or None."""
        rows = self.rows(sql, parameters)
        return next(iter(rows[0].values())) if rows else None

    def insert_columns(
        self, table: str, columns: Sequence[str], data: Sequence[Sequence[Any]], *, token: str | None
    ) -> int:
        """Insert column-oriented data; a repeated `token` is a no-op (deduplicated by ClickHouse)."""
        if not data or not len(data[0]):
            return 0
        # A repeat dropped by its token is dropped from the tables materialized views fill from this one too (their
        # own deduplication window: migration 024), or cost_hourly counted it again (probe p47 F2).
        settings = {"insert_deduplication_token": token, "insert_deduplicate": 1,
                    "deduplicate_blocks_in_dependent_materialized_views": 1} if token else None
        with self._lock:
            try:
                types = self._column_types(table)
                if not all(c in types for c in columns):  # the table changed since it was asked
                    self._types.pop(table)
                    types = self._column_types(table)
                known = all(c in types for c in columns)  # else clickhouse-connect asks, and says what is wrong
                if known:
                    data = [_ticks(col, types[c]) for c, col in zip(columns, data, strict=True)]
                context = self._client.create_insert_context(
                    table, column_names=list(columns), column_oriented=True, settings=settings, data=data,
                    column_type_names=[types[c] for c in columns] if known else None,
                )
                try:
                    self._client.insert(context=context)
                finally:
                    # The context keeps one of its own bound methods as an attribute, a cycle: left alone, it
                    # and the columns it holds live until the cyclic collector runs, a batch's worth each time.
                    vars(context).clear()
            except ClickHouseError as exc:
                self._types.pop(table, None)  # the table may have changed: ask again next time
                if isinstance(exc, DataError) or _data_error_code(exc):
                    raise RowsRefused(f"insert into {table} refused the rows: {_first_line(exc)}") from None
                raise StoreUnavailable(f"insert into {table} failed: {_first_line(exc)}") from None
        return len(data[0])

    def _column_types(self, table: str) -> dict[str, str]:
        # clickhouse-connect otherwise asks for the column types before every insert, one more round
        # trip each time; a table's types do not change while it is written, so they are asked once.
        types = self._types.get(table)
        if types is None:
            types = self._types[table] = {r[0]: r[1] for r in self._client.query(f"DESCRIBE TABLE {table}").result_rows}
        return types

    def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, token: str | None
    ) -> int:
        """Insert row-oriented data (small batches)."""
        if not rows:
            return 0
        return self.insert_columns(table, columns, list(map(list, zip(*rows, strict=True))), token=token)

    # async wrappers for services
    async def ainsert_columns(
        self, table: str, columns: Sequence[str], data: Sequence[Sequence[Any]], *, token: str | None
    ) -> int:
        """insert_columns off the event loop."""
        return await asyncio.to_thread(self.insert_columns, table, columns, data, token=token)

    async def ainsert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, token: str | None
    ) -> int:
        """insert_rows off the event loop."""
        return await asyncio.to_thread(self.insert_rows, table, columns, rows, token=token)

    async def arows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """rows off the event loop."""
        return await asyncio.to_thread(self.rows, sql, parameters)

    def close(self) -> None:
        """Release the client."""
        with self._lock:
            self._client.close()
        with self._readonly_lock:
            self._close_readonly()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_DATETIME64 = re.compile(r"DateTime64\((\d)")


def _ticks(values: Sequence[Any], ch_type: str) -> Sequence[Any]:
    """A DateTime64 column's aware datetimes as the integers ClickHouse stores (clickhouse-connect takes
    them as they are); any other column, or values that are not all aware datetimes, as given.

    clickhouse-connect turns each datetime into ticks in Python (about 0.5 µs each, a sixth of an
    insert's encoding); a subtraction and a division mapped in C cost a sixth of that. Exact: whole
    microseconds, the resolution of a datetime, then scaled to the column's precision as the driver does."""
    m = _DATETIME64.match(ch_type)
    if m is None or not values or type(values[0]) is not datetime:
        return values
    try:
        micros = list(map(floordiv, map(sub, values, repeat(_EPOCH)), repeat(_MICROSECOND)))
    except TypeError:  # a naive datetime (the driver reads it in the server's zone), a None, a string
        return values
    precision = int(m.group(1))
    if precision < 6:
        return list(map(floordiv, micros, repeat(10 ** (6 - precision))))
    return micros if precision == 6 else list(map(mul, micros, repeat(10 ** (precision - 6))))


# ClickHouse error codes that mean the data itself is wrong (the same insert always fails):
# CANNOT_PARSE_TEXT, CANNOT_PARSE_INPUT_ASSERTION_FAILED, CANNOT_PARSE_DATE, CANNOT_PARSE_DATETIME,
# TYPE_MISMATCH, ARGUMENT_OUT_OF_BOUND, CANNOT_CONVERT_TYPE, CANNOT_PARSE_NUMBER, INCORRECT_DATA,
# TOO_LARGE_STRING_SIZE, VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE.
_DATA_ERRORS = frozenset({6, 27, 38, 41, 53, 69, 70, 72, 117, 131, 321})
_CODE = re.compile(r"\bCode: (\d+)\b")


def _error_code(exc: Exception) -> int | None:
    m = _CODE.search(str(exc))
    return int(m.group(1)) if m else None


def _data_error_code(exc: Exception) -> bool:
    return _error_code(exc) in _DATA_ERRORS


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:500] if str(exc).strip() else repr(exc)

