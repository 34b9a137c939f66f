"""The one grammar for tenant, app, deployment and release names, checked wherever a name enters.

Names become NATS subject tokens and KV keys (see `lockgate.subjects.token`): the grammar keeps out
whitespace, wildcards and control characters, and the token mapping is injective, so two different
names can never share a subject or a key.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from lockgate.errors import InvalidName

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)
NAME_RULE = ("1-128 characters: letters, digits and . _ : @ / + -, starting with a letter or digit "
             "(no spaces or wildcards)")

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, description=f"a name: {NAME_RULE}")]
# Optional references (an event's deployment or baseline) may be empty, else follow the grammar.
OptName = Annotated[str, msgspec.Meta(pattern=r"^$|" + NAME_PATTERN, description=f"empty, or {NAME_RULE}")]


def is_name(value: object) -> bool:
    """True if `value` is a string that follows the name grammar."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_name(value: object, kind: str = "name") -> str:
    """Return `value` if it follows the name grammar, else raise InvalidName saying what is allowed."""
    if not is_name(value):
        raise InvalidName(f"invalid {kind} {value!r}: {NAME_RULE}")
    return value  # type: ignore[return-value]
