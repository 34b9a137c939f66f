"""JSON and YAML readers that refuse a document other readers would read another way (probe p20 F2, F3, F7).

A key given twice makes two documents of one: Python's `json`, msgspec and PyYAML keep the last value; gjson,
simdjson's on-demand API or a reviewer reading down a file meet the first. A signed document read
here (a decision file, an attestation's payload) or a Git folder's document is what lockgate acts on, and it
must be what everyone else reads, so a repeated key, at any depth, is refused naming it and its path.

YAML is read as PyYAML reads it (YAML 1.1); a plain scalar that YAML 1.2's core schema (most other tools, and
most readers) takes for another number, boolean or text is refused, quoting it: `0300` is 192 to YAML 1.1 and 300 to YAML 1.2,
`1:30` is 90 or text, `on`/`yes`/`no`/`off` a boolean or text, `1_000` a number or text, `1e3` text or a number.

The same loader measures a YAML document before building it: one whose aliases expand it past MAX_YAML_VALUES values
or MAX_YAML_BYTES of keys and values is refused (`Expands`), whichever parser reads it.

A scalar Python cannot build (a number past its 4,300 digits, the date 2024-02-30) and text with a lone surrogate
(`"\\ud800"`, which libyaml refuses and UTF-8 cannot carry) are a yaml.YAMLError naming their line, which every
reader words in one line naming the file (probe p58 F6).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from typing import Any

import yaml

_MERGE = "tag:yaml.org,2002:merge"
_BOOL, _INT, _FLOAT, _STR = (f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "str"))
# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1023-core-schema): what a YAML 1.2 reader takes a plain scalar for.
_CORE_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_CORE_DEC = re.compile(r"[-+]?[0-9]+")
_CORE_OCT = re.compile(r"0o[0-7]+")
_CORE_HEX = re.compile(r"0x[0-9a-fA-F]+")
_CORE_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_CORE_INF = re.compile(r"[-+]?\.(inf|Inf|INF)")
_CORE_NAN = re.compile(r"\.(nan|NaN|NAN)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_SURROGATE = re.compile("[\ud800-\udfff]")

# What a YAML document with aliases may expand to (see `_expanded`): values, and bytes of its keys' and values' text.
# Decoding shares an aliased value, so it is cheap; whatever walks the result (validating, encoding, hashing) is not:
# nine lists of nine aliases of the last, nine deep, are 387 million values from 400 bytes ("billion laughs"), and a
# folder applied in CI took the machine's memory (probe p11).
MAX_YAML_VALUES = 5_000_000
MAX_YAML_BYTES = 64 * 1024 * 1024


class TwoReadings(ValueError):
    """A document readers disagree on: a key given twice, or a YAML scalar YAML 1.1 and 1.2 read differently.
    The message ends in msgspec's way, `... - at `$.path``."""


def _step(path: str, key: Any) -> str:
    """`path` one key further, as msgspec writes paths (`$.a.b`, `$[0]`; other keys quoted, on one line)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    text = str(key)
    return f"{path}.{text}" if _NAME.fullmatch(text) else f"{path}[{json.dumps(text)}]"


class Expands(ValueError):
    """A YAML document whose aliases expand it past MAX_YAML_VALUES values or MAX_YAML_BYTES bytes."""


# JSON ----------------------------------------------------------------------------------------------------------

class _Repeated(Exception):
    """Raised from inside `json.loads` to stop at the first object with a repeated key."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Repeated
    return obj


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as its (key, value) pairs in order, to find where a key repeats."""


def _first_repeat(value: Any, path: str) -> tuple[str, str] | None:
    """(key, path of the object holding it) of the first repeated key in document order, None if none."""
    stack = [(value, path)]
    while stack:
        node, where = stack.pop()
        items: list[tuple[str, Any]] = []
        if isinstance(node, _Pairs):
            seen: set[str] = set()
            for key, _ in node:
                if key in seen:
                    return key, where
                seen.add(key)
            items = [(_step(where, k), v) for k, v in node]
        elif isinstance(node, list):
            items = [(_step(where, i), v) for i, v in enumerate(node)]
        stack.extend((v, p) for p, v in reversed(items))
    return None


def json_loads(data: bytes | str) -> Any:
    """`data` as `json.loads` reads it; TwoReadings naming the first key an object repeats (`"a"` and `"\\u0061"`
    are one key) and its path. ValueError (or RecursionError) for what is not JSON, as `json.loads` raises."""
    with contextlib.suppress(_Repeated):
        return json.loads(data, object_pairs_hook=_unique)
    # Only a refused document is read twice: the hook above cannot know where in the document it is.
    found = _first_repeat(json.loads(data, object_pairs_hook=_Pairs), "$")
    key, where = found if found else ("?", "$")
    raise TwoReadings(f"key {json.dumps(key)} is given twice (readers differ on which one counts) - at "
                      f"`{_step(where, key)}`")


# YAML ----------------------------------------------------------------------------------------------------------

def _core(text: str) -> Any:
    """What YAML 1.2's core schema reads the plain scalar `text` as (text itself when not a bool or number)."""
    if text in _CORE_BOOL:
        return _CORE_BOOL[text]
    if _CORE_DEC.fullmatch(text):
        return int(text, 10)
    if _CORE_OCT.fullmatch(text):
        return int(text[2:], 8)
    if _CORE_HEX.fullmatch(text):
        return int(text[2:], 16)
    if _CORE_FLOAT.fullmatch(text):
        return float(text)
    if _CORE_INF.fullmatch(text):
        return -math.inf if text.startswith("-") else math.inf
    if _CORE_NAN.fullmatch(text):
        return math.nan
    return text


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    return "text"


def _expanded(root: yaml.Node) -> tuple[int, int, bool]:
    """(values, bytes of scalar text, whether any node is named twice) of the document rooted at `root` once its
    aliases are expanded. An alias shares its anchor's node, so this costs one visit per node however far the
    aliases expand; an alias inside its own anchor (a cycle) counts as one value, as it is built once."""
    sizes: dict[int, tuple[int, int]] = {}
    open_: set[int] = set()  # nodes whose children are being measured
    shared = False
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, measured = stack.pop()
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        if measured:  # its children are: add them up
            open_.discard(id(node))
            inner = [sizes.get(id(c), (1, 0)) for c in children]
            sizes[id(node)] = (1 + sum(v for v, _ in inner), sum(b for _, b in inner))
        elif id(node) in sizes or id(node) in open_:
            shared = True
        elif isinstance(node, yaml.ScalarNode):
            # surrogatepass: a lone surrogate PyYAML's own parser reads (libyaml refuses it) is measured, not a
            # UnicodeEncodeError here; building it refuses it (_OneReading.construct_object).
            sizes[id(node)] = (1, len(node.value.encode(errors="surrogatepass")))
        else:
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children)
    values, size = sizes[id(root)]
    return values, size, shared


def _unreadable(node: yaml.Node, exc: ValueError) -> yaml.YAMLError:
    """A ValueError reading `node` (Python's int() refuses past 4,300 digits, datetime a 30 February) as the YAMLError
    every reader words in one line, at the node's line: before (probe p58 F6), it escaped them as a traceback."""
    why = str(exc).split("; use sys.set_int_max_str_digits")[0]  # that advice is for Python programs
    return yaml.constructor.ConstructorError(None, None, f"a value Python cannot read ({why})", node.start_mark)


def _core_of(node: yaml.ScalarNode) -> Any:
    try:
        return _core(node.value)
    except ValueError as exc:  # `0999...` past 4,300 digits: text to YAML 1.1, a number Python cannot build to 1.2
        raise _unreadable(node, exc) from None


class _OneReading:
    """Mixed into PyYAML's safe loaders: measures and checks the composed document before building it."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            value = super().construct_object(node, deep=deep)
        except (TwoReadings, Expands):
            raise
        except ValueError as exc:
            raise _unreadable(node, exc) from None
        if isinstance(value, str) and not value.isascii() and _SURROGATE.search(value):
            raise yaml.constructor.ConstructorError(None, None, "a lone surrogate (\\ud800-\\udfff) is not text "
                                                    "UTF-8 can carry (libyaml refuses it too)", node.start_mark)
        return value

    def construct_document(self, node: yaml.Node) -> Any:
        # Measured on the nodes this loader's own parser composed, so a document some other parser cannot read
        # (`%YAML 1.3`, which libyaml refuses and PyYAML reads) is never decoded unmeasured (probe p51 F1).
        values, size, shared = _expanded(node)
        if shared and values > MAX_YAML_VALUES:
            raise Expands(f"its aliases expand it to more than {MAX_YAML_VALUES:,} values")
        if shared and size > MAX_YAML_BYTES:
            # Before (probe p51 F2), only values were counted: one 1 MB string aliased 1,500 times was 1.5 GB.
            raise Expands(f"its aliases expand it to more than {MAX_YAML_BYTES // 2**20} MiB of text")
        self._check(node)
        return super().construct_document(node)

    def _check(self, root: yaml.Node) -> None:
        seen: set[int] = set()  # an aliased node is checked once, where it is first met
        stack: list[tuple[yaml.Node, str]] = [(root, "$")]
        while stack:
            node, path = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.ScalarNode):
                self._check_scalar(node, path)
            elif isinstance(node, yaml.SequenceNode):
                stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(node.value))))
            elif isinstance(node, yaml.MappingNode):
                stack.extend(reversed(self._check_keys(node, path)))

    def _check_keys(self, node: yaml.MappingNode, path: str) -> list[tuple[yaml.Node, str]]:
        """The mapping's keys and values to check next; TwoReadings if a key is given twice. Keys are compared as
        built (`1` and `1.0` are one dict key). A key a merge (`<<`) brings may be given again: that is what a
        merge is for, and only keys the mapping itself names are compared."""
        first: dict[Any, tuple[int, str]] = {}
        children: list[tuple[yaml.Node, str]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE or not isinstance(key_node, yaml.ScalarNode):
                children += [(key_node, path), (value_node, path)]
                continue
            at = _step(path, key_node.value)
            self._check_scalar(key_node, at)
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first:
                was, text = first[key]
                again = "given twice" if text == key_node.value else f"{json.dumps(text)} again"
                raise TwoReadings(f"key {json.dumps(key_node.value)} is {again}, on lines {was} and {line} (readers "
                                  f"differ on which one counts) - at `{at}`")
            first[key] = (line, key_node.value)
            children.append((value_node, at))
        return children

    def _check_scalar(self, node: yaml.ScalarNode, path: str) -> None:
        if node.style or node.tag not in (_BOOL, _INT, _FLOAT, _STR):  # quoted, or tagged as something else
            return
        text = node.value
        if node.tag == _STR:
            if not text or text[0] not in "-+.0123456789" or isinstance(_core_of(node), str):
                return  # fast: text to both readers
            here: Any = text
        else:
            here = self.construct_object(node, deep=True)
        there = _core_of(node)
        if not _same(here, there):
            if isinstance(here, bool) or isinstance(there, bool):
                fix = "write true or false"
            elif isinstance(here, str):
                fix = f"write {there!r} (the number YAML 1.2 reads)"
            else:
                fix = "write the number you mean without leading zeros, `_` or `:`"
            raise TwoReadings(f"{text} (line {node.start_mark.line + 1}) is {_shown(here)} to a YAML 1.1 reader "
                              f"(lockgate's) and {_shown(there)} to a YAML 1.2 one: quote it if it is text, or "
                              f"{fix} - at `{path}`")


class _PyLoader(_OneReading, yaml.SafeLoader):
    """PyYAML's pure-Python safe loader, checked."""


class _CLoader(_OneReading, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's safe loader (as msgspec.yaml uses), checked."""


def yaml_loads(data: bytes | str, *, c_parser: bool = False) -> Any:
    """`data` as `yaml.safe_load` reads it (with `c_parser`, as msgspec.yaml.decode: libyaml's parser, which refuses
    nesting past 1,000 where the pure-Python one runs out of stack); TwoReadings for a key given twice or a plain
    scalar YAML 1.1 and 1.2 read differently (naming its line and path); Expands for a document its aliases expand
    past MAX_YAML_VALUES values or MAX_YAML_BYTES; yaml.YAMLError for what is not YAML."""
    return yaml.load(data, Loader=_CLoader if c_parser else _PyLoader)  # safe loaders: build plain values only
