"""The one row mapper: a table's columns derived from its contract Struct, and Structs turned into
column-oriented data for `Store.insert_columns`.

A `Table` declares only what the Struct cannot say: fields that are not stored (`exclude`), columns
named otherwise (`rename`, e.g. the OTel Collector's `otel_traces` names), columns the insert adds
(`extra`, e.g. `msg_id`), columns computed from each value (`derived`, e.g. a span's sender's tenant,
its key), a list field whose items become the rows (`items`, e.g. a drift report's features, one row
each, with the report's fields repeated), and list-of-tuple fields stored as a ClickHouse `Nested`
column (`nested`). Everything else follows from `msgspec.structs.fields`, so
a field added to a Struct is a column the DDL must have (`schema_problems` says which are missing).

Values: dicts of scalars go as Map, lists of scalars as Array, datetimes as they are; nested
Structs, lists or dicts of Structs and `Any` go as JSON text (the DDL column is String); bytes as
UTF-8 text (undecodable bytes escaped).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Literal

import msgspec
import msgspec.inspect as mi

Kind = Literal["value", "json", "text", "nested"]
_SCALARS = (mi.StrType, mi.IntType, mi.FloatType, mi.BoolType, mi.DateTimeType, mi.LiteralType)
_json = msgspec.json.Encoder(order="deterministic")


def _unwrap(t: mi.Type) -> mi.Type:
    while isinstance(t, mi.Metadata):
        t = t.type
    return t


def _optional(t: mi.Type) -> mi.Type | None:
    """The X of `X | None`, or None when `t` is not such a union."""
    if isinstance(t, mi.UnionType):
        rest = [u for u in t.types if not isinstance(u, mi.NoneType)]
        if len(rest) == 1 and len(rest) < len(t.types):
            return _unwrap(rest[0])
    return None


def _scalar(t: mi.Type) -> bool:
    t = _unwrap(t)
    return isinstance(t, _SCALARS) or (_optional(t) is not None and isinstance(_optional(t), _SCALARS))


def _kind(t: mi.Type) -> Kind:
    t = _unwrap(t)
    if isinstance(t, mi.BytesType):
        return "text"
    if _scalar(t):
        return "value"
    if isinstance(t, mi.DictType) and _scalar(t.key_type) and _scalar(t.value_type):
        return "value"
    if isinstance(t, mi.ListType) and _scalar(t.item_type):
        return "value"
    return "json"


@dataclass(frozen=True)
class Column:
    """One ClickHouse column: where its value comes from and what Python type it has."""

    name: str
    source: str  # attribute name (on the row Struct, the item Struct), or the `extra` or `derived` key
    level: Literal["row", "item", "extra", "derived"]
    kind: Kind
    type: mi.Type
    part: int = 0  # position in the tuple, for a `nested` column


class Table:
    """A ClickHouse table as a projection of one contract Struct."""

    def __init__(
        self,
        name: str,
        struct: type[msgspec.Struct],
        *,
        exclude: Sequence[str] = (),
        rename: Mapping[str, str] | None = None,
        extra: Mapping[str, type] | None = None,
        items: str | None = None,
        nested: Mapping[str, Sequence[str]] | None = None,
        key: Sequence[str] = (),
        derived: Mapping[str, tuple[type, Callable[[Any], Any]]] | None = None,
    ) -> None:
        self.name = name
        self.struct = struct
        self.items = items
        rename = dict(rename or {})
        nested = dict(nested or {})
        known = {f.name for f in msgspec.structs.fields(struct)}
        cols: list[Column] = []
        item_struct = None
        for f in msgspec.structs.fields(struct):
            if f.name in exclude:
                continue
            info = mi.type_info(f.type)
            if f.name == items:
                inner = _unwrap(info)
                if not (isinstance(inner, mi.ListType) and isinstance(_unwrap(inner.item_type), mi.StructType)):
                    raise TypeError(f"{name}: items field {items!r} must be a list of Structs")
                item_struct = _unwrap(inner.item_type)
                continue
            if f.name in nested:
                cols += self._nested(f.name, info, nested[f.name])
                continue
            cols.append(Column(rename.get(f.name, f.name), f.name, "row", _kind(info), info))
        if items is not None:
            if item_struct is None:
                raise TypeError(f"{name}: {struct.__name__} has no field {items!r}")
            known |= {f.name for f in item_struct.fields}
            for f in item_struct.fields:
                cols.append(Column(rename.get(f.name, f.name), f.name, "item", _kind(f.type), f.type))
        for extra_name, py_type in (extra or {}).items():
            cols.append(Column(extra_name, extra_name, "extra", "value", mi.type_info(py_type)))
        derived = dict(derived or {})
        for derived_name, (py_type, _) in derived.items():
            cols.append(Column(derived_name, derived_name, "derived", "value", mi.type_info(py_type)))
        unknown = (set(exclude) | set(rename) | set(nested)) - known
        if unknown:
            raise TypeError(f"{name}: {struct.__name__} has no field(s) {sorted(unknown)}")
        names = [c.name for c in cols]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise TypeError(f"{name}: column(s) {sorted(dup)} declared twice; exclude or rename one")
        self.columns_info: tuple[Column, ...] = tuple(cols)
        self._getters = tuple(derived[c.name][1] if c.level == "derived" else attrgetter(c.source) for c in cols)
        # Where each row-level column's field sits in `msgspec.structs.astuple` of a row (see `data`).
        positions = {f.name: i for i, f in enumerate(msgspec.structs.fields(struct))}
        self._nfields = len(positions)
        self._positions = tuple(positions[c.source] if c.level == "row" else -1 for c in cols)
        self.columns: tuple[str, ...] = tuple(names)
        missing_key = set(key) - set(names)
        if missing_key:
            raise TypeError(f"{name}: key column(s) {sorted(missing_key)} are not columns")
        self.key: tuple[str, ...] = tuple(key)

    @staticmethod
    def _nested(fname: str, info: mi.Type, names: Sequence[str]) -> list[Column]:
        inner = _unwrap(info)
        if not (isinstance(inner, mi.ListType) and isinstance(_unwrap(inner.item_type), mi.TupleType)):
            raise TypeError(f"nested field {fname!r} must be a list of tuples")
        parts = _unwrap(inner.item_type).item_types
        if len(parts) != len(names):
            raise TypeError(f"nested field {fname!r} has {len(parts)} parts, {len(names)} columns declared")
        return [Column(n, fname, "row", "nested", mi.ListType(item_type=p), i)
                for i, (n, p) in enumerate(zip(names, parts, strict=True))]

    def index(self, column: str) -> int:
        """Position of a column in `columns` (and in the data `data` returns)."""
        return self.columns.index(column)

    def origins(self, values: Sequence[msgspec.Struct]) -> list[int]:
        """For each row `data(values)` makes, the index of the value it came from."""
        if self.items is None:
            return list(range(len(values)))
        return [i for i, v in enumerate(values) for _ in getattr(v, self.items)]

    def data(
        self,
        values: Sequence[msgspec.Struct],
        extra: Mapping[str, Sequence[Any]] | None = None,
        transform: Mapping[str, Callable[[Any], Any]] | None = None,
    ) -> list[list[Any]]:
        """Column-oriented data in `columns` order; `extra` gives one value per row for each extra column,
        `transform` maps a column's values on the way (e.g. redaction); None values stay None."""
        extra = extra or {}
        transform = transform or {}
        fields: list[list[Any]] | None = None
        if self.items is None:
            rows: Sequence[Any] = values
            parents: Sequence[Any] = values
            # One row per value: every field's column at once, transposed in C (a tuple of field values per
            # row, zipped), instead of a pass per column that looks an attribute up per row. Only for values
            # of the table's own Struct, whose fields sit where `_positions` says. A slice at a time: the
            # row tuples of a whole 20,000-row insert no longer fit the CPU's caches and made it slower.
            if values and set(map(type, values)) == {self.struct}:
                fields = [[] for _ in range(self._nfields)]
                for start in range(0, len(values), _SLICE):
                    part = zip(*map(msgspec.structs.astuple, values[start : start + _SLICE]), strict=True)
                    for column, part_values in zip(fields, part, strict=True):
                        column.extend(part_values)
        else:
            pairs = [(v, it) for v in values for it in getattr(v, self.items)]
            parents = [p for p, _ in pairs]
            rows = [it for _, it in pairs]
        out: list[list[Any]] = []
        for col, getter, position in zip(self.columns_info, self._getters, self._positions, strict=True):
            if col.level == "extra":
                if col.name not in extra:
                    raise ValueError(f"{self.name}: no values for extra column {col.name!r}")
                column = list(extra[col.name])
                if len(column) != len(rows):
                    raise ValueError(f"{self.name}: {len(column)} values for {col.name!r}, {len(rows)} rows")
            elif col.level == "derived":
                column = list(map(getter, parents))  # a function of the value (the parent, for an items table)
            elif fields is not None and position >= 0:
                column = _convert(col, fields[position])  # a field is one column (a nested one's parts are new lists)
            else:
                column = _convert(col, list(map(getter, rows if col.level == "item" else parents)))
            fn = transform.get(col.name)
            out.append(column if fn is None else _apply(fn, column))
        return out

    def keys(self, data: Sequence[Sequence[Any]]) -> list[Any]:
        """The key of every row of `data`: its value where the key is one column (most tables: an id, whose
        string hashes once and is kept as it is), else a tuple of the key columns' values."""
        if len(self.key) == 1:
            return list(data[self.index(self.key[0])])
        return list(zip(*(data[self.index(k)] for k in self.key), strict=True))


_SLICE = 1024  # rows transposed at a time by `Table.data`


def _apply(fn: Callable[[Any], Any], column: list[Any]) -> list[Any]:
    """`fn` over a column's values; a transform never sees None (an event without a prompt, say)."""
    if None not in column:  # the usual case: the values mapped in C, without a test per value
        return list(map(fn, column))
    if column.count(None) == len(column):
        return column
    return [v if v is None else fn(v) for v in column]


def _convert(col: Column, values: list[Any]) -> list[Any]:
    if col.kind == "value":
        return values
    if col.kind == "json":
        return [_json.encode(v).decode() for v in values]
    if col.kind == "text":
        return [v.decode("utf-8", errors="backslashreplace") for v in values]
    return [[t[col.part] for t in v] for v in values]  # nested: one array per row


# DDL checking: does a ClickHouse column type hold what the mapper inserts?

_INTS = {f"{s}Int{n}" for s in ("", "U") for n in (8, 16, 32, 64)}


def _parse(ch: str) -> tuple[str, list[str]]:
    """'Map(LowCardinality(String), Float64)' -> ('Map', ['LowCardinality(String)', 'Float64'])."""
    ch = ch.strip()
    m = re.fullmatch(r"(\w+)\((.*)\)", ch, re.S)
    if not m:
        return ch, []
    args, depth, cur = [], 0, ""
    for c in m.group(2):
        if c == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            continue
        depth += c == "("
        depth -= c == ")"
        cur += c
    args.append(cur.strip())
    return m.group(1), args


def fits(t: mi.Type, ch: str, kind: Kind = "value") -> bool:
    """True when a ClickHouse column of type `ch` stores values of Python type `t` as the mapper sends them."""
    name, args = _parse(ch)
    if name == "LowCardinality":
        return fits(t, args[0], kind)
    t = _unwrap(t)
    if kind in ("json", "text"):
        return name == "String"
    inner = _optional(t)
    if inner is not None:
        return name == "Nullable" and fits(inner, args[0])
    if isinstance(t, mi.StrType):
        return name == "String"
    if isinstance(t, mi.LiteralType):
        return name == "String" if all(isinstance(v, str) for v in t.values) else name in _INTS
    if isinstance(t, mi.BoolType):
        return name in ("Bool", "UInt8")
    if isinstance(t, mi.IntType):
        return name in _INTS
    if isinstance(t, mi.FloatType):
        return name in ("Float32", "Float64")
    if isinstance(t, mi.DateTimeType):
        return name in ("DateTime64", "DateTime")
    if isinstance(t, mi.DictType):
        return name == "Map" and fits(t.key_type, args[0]) and fits(t.value_type, args[1])
    if isinstance(t, mi.ListType):
        return name == "Array" and fits(t.item_type, args[0], _kind(t.item_type))
    return False


@dataclass(frozen=True)
class DdlColumn:
    """A column as `system.columns` describes it."""

    name: str
    type: str
    default_kind: str = ""


def schema_problems(table: Table, ddl: Sequence[DdlColumn]) -> list[str]:
    """Every way the DDL fails the mapper: a missing column, an incompatible type, or a DDL column
    without a default that the mapper never fills."""
    by_name = {c.name: c for c in ddl}
    problems = []
    for col in table.columns_info:
        d = by_name.get(col.name)
        if d is None:
            problems.append(f"{table.name}.{col.name}: no such column (add a migration or exclude the field)")
        elif not fits(col.type, d.type, col.kind):
            problems.append(f"{table.name}.{col.name}: column type {d.type} cannot hold {col.kind} {col.type!r}")
    for d in ddl:
        if d.name not in table.columns and not d.default_kind:
            problems.append(f"{table.name}.{d.name}: the mapper never fills it and it has no default")
    return problems

