"""Typed msgspec decoding with errors that say what was wrong and where."""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import repeat
from operator import attrgetter
from typing import Any, Generic, TypeVar

import msgspec
import msgspec.inspect as mi

from lockgate.contracts import SCHEMA_VERSION, AnyEvent, Event, names
from lockgate.errors import InvalidEvent, UnknownSchemaVersion

T = TypeVar("T")

_encoder = msgspec.json.Encoder()

# JSON bytes of an event, a list of events, or any msgspec-encodable value. The encoder's own bound
# method, not a function calling it: the SDK encodes every event it emits, and a Python frame each was
# a twentieth of that.
encode: Callable[[Any], bytes] = _encoder.encode

# What decoding JSON from outside can raise: msgspec raises RecursionError, not DecodeError, for arrays
# or objects nested deeper than Python's recursion limit where the type allows anything (`Any`), and
# UnicodeDecodeError for a string that is not UTF-8 (it checks strings with Python's codec): both were a 500.
UNDECODABLE = (msgspec.DecodeError, RecursionError, UnicodeDecodeError)


def undecodable(exc: Exception) -> str:
    """What was wrong, for a message, with JSON whose decoding raised one of UNDECODABLE."""
    if isinstance(exc, RecursionError):
        return "JSON is nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"JSON is not valid UTF-8 (byte {exc.start})"
    return str(exc)


def _result_hook(value: Any) -> Any:
    # msgspec itself writes datetimes and dates as ISO 8601, sets and tuples as arrays, bytes as
    # base64 (lossless; ClickHouse strings arrive as str anyway), UUIDs and Decimals as strings.
    # This hook only sees what msgspec cannot encode (an ipaddress, a numpy scalar, ...), which an
    # operator reads best as its text.
    return str(value)


_result_encoder = msgspec.json.Encoder(enc_hook=_result_hook)


def to_json(value: Any, *, indent: int = 0) -> bytes:
    """JSON of query results and CLI output: the one encoder, so a result reads the same from a
    running stack (the query service's reply) or straight from ClickHouse (`--clickhouse`)."""
    data = _result_encoder.encode(value)
    return msgspec.json.format(data, indent=indent) if indent else data


class Codec(Generic[T]):
    """Decoder for one wire type (an event type, a union, or a list of them)."""

    def __init__(self, wire_type: Any) -> None:
        self._decoder = msgspec.json.Decoder(wire_type)
        self._batch_names = _flat(wire_type)

    def decode(self, data: bytes) -> T:
        """Decode or raise InvalidEvent naming the problem (msgspec gives the JSON path)."""
        try:
            if self._batch_names:
                # Names are checked once per distinct value of the message, after msgspec's own checks.
                with names.deferred():
                    value = self._decoder.decode(data)
            else:
                value = self._decoder.decode(data)
        except msgspec.DecodeError as exc:
            msg = str(exc)
            if "Invalid value" in msg and "`$.type`" in msg:
                raise InvalidEvent(f"unknown event type: {msg}") from None
            if msg == _TRUNCATED and isinstance(data, bytes) and (lone := _LONE_SURROGATE.search(data)):
                # msgspec's words for a `\ud800` escape with no low half after it, however whole the JSON is.
                raise InvalidEvent(f"JSON holds a lone UTF-16 surrogate escape ({lone.group().decode()} at byte "
                                   f"{lone.start()}), which no Unicode text has") from None
            raise InvalidEvent(msg) from None
        except UnicodeDecodeError as exc:  # msgspec checks UTF-8 inside strings with Python's codec
            raise InvalidEvent(f"JSON is not valid UTF-8: {exc}") from None
        except RecursionError as exc:
            raise InvalidEvent(undecodable(exc)) from None
        # msgspec checks UTF-8 only inside what it decodes: bytes in an unknown field's key or value are skipped
        # unread ("mo\xc3del" stored an event whose model was empty). The whole body is checked: isascii costs
        # about 2% of decoding a 500-event message, the full check on non-ASCII about 8%.
        if isinstance(data, bytes) and not data.isascii():
            try:
                str(data, "utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidEvent(f"JSON is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
        if self._batch_names:
            try:
                names.check_all(value)
            except ValueError as exc:  # a name off the grammar, worded as msgspec words its own errors
                raise InvalidEvent(str(exc)) from None
        values = value if isinstance(value, list) else (value,)
        # A list of events (hundreds per inference message) is checked in C; anything else one by one.
        if not (values and all(map(isinstance, values, repeat(Event)))
                and max(map(_version, values)) <= SCHEMA_VERSION):
            for event in values:
                if isinstance(event, Event) and event.schema_version > SCHEMA_VERSION:
                    raise UnknownSchemaVersion(
                        f"unknown schema_version {event.schema_version} for {type(event).__name__} "
                        f"(this build reads up to {SCHEMA_VERSION})"
                    )
        return value


_version = attrgetter("schema_version")
_TRUNCATED = "Input data was truncated"
# A high surrogate escape with no low one after it (msgspec words a low one alone rightly).
_LONE_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")


def _flat(wire_type: Any) -> bool:
    """True when every Struct `wire_type` decodes to is the value itself or an item of the list it is, and
    holds no Struct: `names.check_all` then sees every Struct whose names `names.deferred()` left unchecked."""
    info = mi.type_info(wire_type)
    tops = info.types if isinstance(info, mi.UnionType) else (info,)
    structs = []
    for t in tops:
        t = t.item_type if isinstance(t, mi.ListType) else t
        if isinstance(t, mi.StructType):
            structs.append(t)
        elif _holds_struct(t):
            return False
    return bool(structs) and not any(_holds_struct(f.type) for s in structs for f in s.fields)


def _holds_struct(t: mi.Type) -> bool:
    if isinstance(t, mi.StructType | mi.DataclassType | mi.TypedDictType | mi.NamedTupleType):
        return True
    inner = [getattr(t, a) for a in ("type", "item_type", "key_type", "value_type") if hasattr(t, a)]
    inner += [*getattr(t, "types", ()), *getattr(t, "item_types", ())]
    return any(_holds_struct(i) for i in inner)

any_event: Codec[Any] = Codec(AnyEvent)
