"""The one grammar for tenant, app, deployment and release names, checked wherever a name enters.

Names become NATS subject tokens and KV keys (see `lockgate.subjects.token`): the grammar keeps out
whitespace, wildcards and control characters, and the token mapping is injective, so two different
names can never share a subject or a key.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from operator import attrgetter
from typing import Annotated, Any

import msgspec

from lockgate.errors import InvalidName

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)
NAME_RULE = ("1-128 characters: letters, digits and . _ : @ / + -, starting with a letter or digit "
             "(no spaces or wildcards)")

# The grammar is checked by `check_names`, from the `__post_init__` of the Structs that carry names,
# rather than by a msgspec `pattern`: msgspec runs the regex for every value (four per inference
# event, about half of the sink's decoding time), while names repeat, so a cached check is almost
# free. The JSON schema still carries the pattern; msgspec still checks type and length itself.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, description=f"a name: {NAME_RULE}",
                                   extra_json_schema={"pattern": NAME_PATTERN})]
# Optional references (an event's deployment or baseline) may be empty, else follow the grammar.
OptName = Annotated[str, msgspec.Meta(max_length=128, description=f"empty, or {NAME_RULE}",
                                      extra_json_schema={"pattern": r"^$|" + NAME_PATTERN})]


# Identifiers of the envelope: an event id (a key, chosen by producers) and W3C trace context ids. Checked
# like names, from `__post_init__` or per decoded batch in C (a msgspec `pattern` runs a regex per value:
# these three cut the sink's decoding from about 510k to 200k events/s), the JSON schema carrying the pattern.
ID_RULE = "1-128 characters, none of them whitespace or control characters"
TRACE_ID_RULE = "32 lowercase hex digits, not all zero (W3C trace context), or empty"
SPAN_ID_RULE = "16 lowercase hex digits, not all zero (W3C trace context), or empty"
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, description=f"an event id: {ID_RULE}",
                                      extra_json_schema={"pattern": r"^[^\s\x00-\x1f\x7f]+$"})]
TraceId = Annotated[str, msgspec.Meta(max_length=32, description=TRACE_ID_RULE,
                                      extra_json_schema={"pattern": r"^$|^(?!0{32})[0-9a-f]{32}$"})]
SpanId = Annotated[str, msgspec.Meta(max_length=16, description=SPAN_ID_RULE,
                                     extra_json_schema={"pattern": r"^$|^(?!0{16})[0-9a-f]{16}$"})]
_HEX = "0123456789abcdef"
_ZEROS = {32: "0" * 32, 16: "0" * 16}
_ID_KINDS = {EventId: ("id", ID_RULE), TraceId: (32, TRACE_ID_RULE), SpanId: (16, SPAN_ID_RULE)}
_id_fields: dict[type, tuple[tuple[str, int | str, str], ...]] = {}


def _ids_of(cls: type) -> tuple[tuple[str, int | str, str], ...]:
    """(field, kind, rule) for each EventId, TraceId or SpanId field of a Struct type."""
    found = _id_fields.get(cls)
    if found is None:
        found = _id_fields[cls] = tuple((f.name, *_ID_KINDS[f.type]) for f in msgspec.structs.fields(cls)
                                        if f.type in _ID_KINDS)
    return found


def _good_ids(values: list[Any], kind: int | str) -> bool:
    """True if every value follows its grammar; a pass in C over all of them (string values: msgspec
    checked the types)."""
    if kind == "id":  # lengths checked by msgspec; isprintable refuses every control and separator but " "
        joined = "".join(values)
        return joined.isprintable() and " " not in joined
    size = int(kind)
    return (set(map(len, values)) <= {0, size} and not "".join(values).strip(_HEX)
            and "0" * size not in values)


def check_ids(obj: msgspec.Struct) -> None:
    """Raise ValueError naming the field (worded like msgspec's errors) if an id field of `obj` breaks its
    grammar; called from `__post_init__`, so on decoding and on construction."""
    for field, kind, rule in _ids_of(type(obj)):
        value = getattr(obj, field)
        if type(value) is not str:
            continue  # msgspec said what is wrong with its type
        # One value: _good_ids's tests written out, a third of its cost for each event the SDK builds.
        if kind == "id":
            if value.isprintable() and " " not in value:
                continue
        elif not value or (len(value) == kind and not value.strip(_HEX) and value != _ZEROS[kind]):
            continue
        raise ValueError(f"invalid {field} {value[:40]!r}: {rule} - at `$.{field}`")


_fields: dict[type, tuple[tuple[str, bool], ...]] = {}
# Names seen to follow the grammar, and the tuples of a Struct's name fields seen to (an event's tenant,
# app, deployment and release come together again and again: one tuple lookup clears them all, "" where
# the field may be empty included). Bounded, and names are at most 128 characters: a flood of distinct
# names costs the regex each time, never memory.
_good: set[str] = set()
_GOOD_MAX = 8192


def _name_fields(cls: type) -> tuple[tuple[str, bool], ...]:
    """(field, may be empty) for each Name or OptName field of a Struct type."""
    found = tuple((f.name, f.type == OptName) for f in msgspec.structs.fields(cls) if f.type in (Name, OptName))
    names = [name for name, _ in found]
    _values[cls] = (attrgetter(*names) if len(names) > 1 else
                    (lambda obj: (getattr(obj, names[0]),)) if names else (lambda obj: ()))
    _good_tuples[cls] = set()
    _fields[cls] = found
    return found


# The values of a Struct type's name fields as one tuple, and the tuples seen good for that type (per
# type: "" is good where a field may be empty, and the same position may be one that may not elsewhere).
_values: dict[type, Callable[[Any], tuple[Any, ...]]] = {}
_good_tuples: dict[type, set[tuple[Any, ...]]] = {}


def check_names(obj: msgspec.Struct) -> None:
    """Raise ValueError naming the field (worded like msgspec's own errors) if a Name or OptName field
    of `obj` breaks the grammar; called from `__post_init__`, so on decoding and on construction."""
    cls = type(obj)
    values = _values.get(cls)
    key: tuple[Any, ...] | None = None
    if values is not None:
        key = values(obj)
        try:
            if key in _good_tuples[cls]:  # these names seen together and good before: the usual case
                return
        except TypeError:  # an unhashable value: the loop below says which field
            key = None
    for field, optional in _fields.get(cls) or _name_fields(cls):
        value = getattr(obj, field)
        if type(value) is str and (value in _good or (optional and not value)):
            continue
        if not is_name(value):
            raise ValueError(f"invalid {field} {value!r}: {NAME_RULE} - at `$.{field}`")
        if len(_good) < _GOOD_MAX:
            _good.add(value)
    if key is not None and len(good := _good_tuples[cls]) < _GOOD_MAX:
        good.add(key)


class _Deferral(threading.local):
    active = False


# Per thread: an event made in another thread while this one decodes is still checked as it is made.
deferral = _Deferral()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within: `Event.__post_init__` leaves its names unchecked, for `check_all` to check a decoded batch at
    once afterwards. Calling msgspec's `__post_init__` hook and checking each event's names cost about 0.7 µs
    per decoded event, a quarter of the sink's decoding; a batch's names repeat, so per batch they cost a
    pass in C per name field. Only for values whose every Struct `check_all` sees (see `lockgate.codec`)."""
    deferral.active = True
    try:
        yield
    finally:
        deferral.active = False


def check_all(value: object) -> None:
    """`check_names` on a decoded Struct, or each of a list of them; raises ValueError worded as msgspec words
    the first failure in the list (`... - at `$.app` - at `$[3]``)."""
    objs = value if isinstance(value, list) else [value]
    types = set(map(type, objs))
    for cls in types:
        if not issubclass(cls, msgspec.Struct):
            continue
        fields = _fields.get(cls) or _name_fields(cls)
        if not fields:
            continue
        of_cls = objs if len(types) == 1 else [o for o in objs if type(o) is cls]
        for field, kind, _ in _ids_of(cls):
            if not _good_ids(list(map(attrgetter(field), of_cls)), kind):
                for i, obj in enumerate(objs):  # the first failure, in document order
                    if type(obj) is cls:
                        try:
                            check_ids(obj)
                        except ValueError as exc:
                            raise ValueError(f"{exc} - at `$[{i}]`" if value is objs else str(exc)) from None
        good, getter = _good_tuples[cls], _values[cls]
        try:  # one pass in C: the distinct tuples of names, almost always all seen good before
            new: set[tuple[Any, ...]] | None = set(map(getter, of_cls)) - good
            if not new:
                continue
        except TypeError:  # an unhashable value: the event-by-event check says which
            new = None
        for i, obj in enumerate(objs):  # each new tuple's first event: a failure is reported in document order
            if type(obj) is not cls or (new is not None and getter(obj) not in new):
                continue
            try:
                check_names(obj)  # remembers a good tuple, so its other events pass at once
            except ValueError as exc:
                raise ValueError(f"{exc} - at `$[{i}]`" if value is objs else str(exc)) from None


def is_name(value: object) -> bool:
    """True if `value` is a string that follows the name grammar."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_name(value: object, kind: str = "name") -> str:
    """Return `value` if it follows the name grammar, else raise InvalidName saying what is allowed."""
    if not is_name(value):
        raise InvalidName(f"invalid {kind} {value!r}: {NAME_RULE}")
    return value  # type: ignore[return-value]
