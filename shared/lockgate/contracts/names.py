"""The one grammar for tenant, app, deployment and release names, checked wherever a name enters.

Names become NATS subject tokens and KV keys (see `lockgate.subjects.token`): the grammar keeps out
whitespace, wildcards and control characters, and the token mapping is injective, so two different
names can never share a subject or a key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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


_fields: dict[type, tuple[tuple[str, bool], ...]] = {}
# Names seen to follow the grammar. Bounded, and only short strings enter: a flood of distinct
# names costs the regex each time, never memory.
_good: set[str] = set()
_GOOD_MAX = 8192


def _name_fields(cls: type) -> tuple[tuple[str, bool], ...]:
    """(field, may be empty) for each Name or OptName field of a Struct type."""
    found = tuple((f.name, f.type == OptName) for f in msgspec.structs.fields(cls) if f.type in (Name, OptName))
    names = [name for name, _ in found]
    _values[cls] = (attrgetter(*names) if len(names) > 1 else
                    (lambda obj: (getattr(obj, names[0]),)) if names else (lambda obj: ()))
    _fields[cls] = found
    return found


# The values of a Struct type's name fields as one tuple: all of them looked up in `_good` at once, in C.
_values: dict[type, Callable[[Any], tuple[Any, ...]]] = {}


def check_names(obj: msgspec.Struct) -> None:
    """Raise ValueError naming the field (worded like msgspec's own errors) if a Name or OptName field
    of `obj` breaks the grammar; called from `__post_init__`, so on decoding and on construction."""
    cls = type(obj)
    values = _values.get(cls)
    if values is not None:
        try:
            if _good.issuperset(values(obj)):  # every name seen good before: the usual case
                return
        except TypeError:  # an unhashable value: the loop below says which field
            values = None
    for field, optional in _fields.get(cls) or _name_fields(cls):
        value = getattr(obj, field)
        if type(value) is str and (value in _good or (optional and not value)):
            continue
        if not is_name(value):
            raise ValueError(f"invalid {field} {value!r}: {NAME_RULE} - at `$.{field}`")
        if len(_good) < _GOOD_MAX:
            _good.add(value)


def is_name(value: object) -> bool:
    """True if `value` is a string that follows the name grammar."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_name(value: object, kind: str = "name") -> str:
    """Return `value` if it follows the name grammar, else raise InvalidName saying what is allowed."""
    if not is_name(value):
        raise InvalidName(f"invalid {kind} {value!r}: {NAME_RULE}")
    return value  # type: ignore[return-value]
