"""Lengths of the free text, lists and maps of the documents people publish on the events stream.

An operator's artifact registrations, release registrations and eval requests, and an approver's reviews, are kept
by the events stream for 90 days and stored in tables for ever: unbounded, one 1 MB label was as valid as a short
one (probe p12). msgspec checks a `Meta(max_length=...)` when it decodes, so a consumer refuses (dead-letters) a
document over its bounds; `check_bounds` checks the same bounds when a document is made, so the CLI refuses it
before anything is published.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import msgspec.inspect as mi

from lockgate.errors import FieldTooLong

# A hash (`sha256:` and 64 hex digits), a run id, a key id; a signature (Ed25519, base64) or who made a document (a
# person, service or client: the audit log's actor); a label's key or value; a person's free text (a release's
# description, a review's reason); entries of a label or artifact map.
ID_MAX, SIGNATURE_MAX, WHO_MAX, LABEL_KEY_MAX, LABEL_MAX, TEXT_MAX = 128, 256, 256, 128, 1024, 4096
LABELS_MAX, ARTIFACTS_MAX = 64, 256

Id = Annotated[str, msgspec.Meta(max_length=ID_MAX)]
Who = Annotated[str, msgspec.Meta(max_length=WHO_MAX)]
Signature = Annotated[str, msgspec.Meta(max_length=SIGNATURE_MAX)]
Text = Annotated[str, msgspec.Meta(max_length=TEXT_MAX)]
Short = Annotated[str, msgspec.Meta(max_length=LABEL_MAX)]  # a media type, a model or endpoint name
Labels = Annotated[dict[Annotated[str, msgspec.Meta(max_length=LABEL_KEY_MAX)], Short],
                   msgspec.Meta(max_length=LABELS_MAX)]
# `kind/name` -> hash: a kind, `/` and a name (128) fit in LABEL_KEY_MAX + 128.
Artifacts = Annotated[dict[Annotated[str, msgspec.Meta(max_length=LABEL_KEY_MAX + 128)], Id],
                      msgspec.Meta(max_length=ARTIFACTS_MAX)]

_fields: dict[type, tuple[tuple[str, Any], ...]] = {}


def _bounded(t: Any) -> bool:
    """Whether a type (msgspec.inspect's) has a length bound anywhere in it."""
    if isinstance(t, mi.StrType):
        return t.max_length is not None
    if isinstance(t, mi.DictType):
        return t.max_length is not None or _bounded(t.key_type) or _bounded(t.value_type)
    if isinstance(t, mi.ListType):
        return t.max_length is not None or _bounded(t.item_type)
    return False


def _over(value: Any, t: Any, path: str, at: str = "") -> str:
    """What in `value` (at JSON path `path`) is longer than `t` allows, worded like msgspec's own errors; "" when
    nothing is. `at` says where when it is not the value at `path` itself (a map's key)."""
    where = at or f"`{path}`"
    if isinstance(t, mi.StrType):
        if t.max_length is not None and isinstance(value, str) and len(value) > t.max_length:
            return f"Expected `str` of length <= {t.max_length} (got {len(value):,}) - at {where}"
    elif isinstance(t, mi.DictType) and isinstance(value, dict):
        if t.max_length is not None and len(value) > t.max_length:
            return f"Expected `object` of length <= {t.max_length} (got {len(value):,}) - at {where}"
        for k, v in value.items():
            if why := (_over(k, t.key_type, path, f"a key of `{path}`")
                       or _over(v, t.value_type, f"{path}[{str(k)[:40]!r}]")):
                return why
    elif isinstance(t, mi.ListType) and isinstance(value, list | tuple):
        if t.max_length is not None and len(value) > t.max_length:
            return f"Expected `array` of length <= {t.max_length} (got {len(value):,}) - at {where}"
        for i, item in enumerate(value):
            if why := _over(item, t.item_type, f"{path}[{i}]"):
                return why
    return ""


def check_bounds(obj: msgspec.Struct) -> None:
    """Raise FieldTooLong naming the field if a text, list or map of `obj` is longer than its type allows; called from
    `__post_init__` of the documents people publish, so on construction too (decoding checks them already)."""
    cls = type(obj)
    fields = _fields.get(cls)
    if fields is None:
        info = mi.type_info(cls)
        fields = _fields[cls] = tuple((f.name, f.type) for f in info.fields if _bounded(f.type))  # type: ignore[attr-defined]
    for name, t in fields:
        if why := _over(getattr(obj, name), t, f"$.{name}"):
            raise FieldTooLong(f"{cls.__name__} is too large to publish: {why}")
