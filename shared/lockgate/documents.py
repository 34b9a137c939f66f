"""Documents (suites, policies, configs) decoded into msgspec Structs; every error names the path.

A document is declared once, as Structs with `forbid_unknown_fields=True` and `Meta` constraints;
msgspec does the checking and its message already carries the path (`... - at `$.rules[2].threshold``).
These helpers only prefix the document's name and raise the domain's error type. They read JSON and YAML through
`lockgate.onereading`, which refuses a document other readers would read another way (a key given twice; a YAML
scalar YAML 1.1 and 1.2 read differently) and a YAML document its aliases expand too far.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import yaml

from lockgate.errors import ConfigError, LockgateError
from lockgate.onereading import Expands, TwoReadings, json_loads, yaml_loads

T = TypeVar("T")

# Shared constraint vocabulary, so "non-empty" or "a content hash" means the same in every document.
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]
ArtifactHash = Annotated[str, msgspec.Meta(pattern="^sha256:")]


def convert(raw: Any, type_: type[T], *, name: str, error: type[LockgateError] = ConfigError) -> T:
    """`raw` (parsed YAML/JSON) as `type_`, or `error("<name>: <what> - at `$.path`")`."""
    try:
        return msgspec.convert(raw, type_)
    except msgspec.ValidationError as exc:
        raise error(f"{name}: {exc}") from None


def load_yaml(path: str | Path, type_: type[T], *, name: str, error: type[LockgateError] = ConfigError,
              shown: str | None = None) -> T:
    """A YAML file decoded straight into `type_`; unreadable, not YAML, or invalid each say so (naming the
    file as `shown`, e.g. relative to a folder, when given)."""
    p = Path(path).expanduser()
    where = shown or p
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {name} {where}: {exc.strerror or exc}") from None
    try:
        # As msgspec.yaml.decode does, but through the reader that refuses what other readers read another way.
        return msgspec.convert(yaml_loads(data, c_parser=True), type_, builtin_types=(datetime.datetime, datetime.date))
    except (TwoReadings, Expands) as exc:
        raise error(f"{name} {where} is refused: {exc}") from None
    except msgspec.ValidationError as exc:
        raise error(f"{name} {where} is invalid: {exc}") from None
    except yaml.YAMLError as exc:
        raise error(f"{name} {where} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise error(f"{name} {where}: nested too deeply to read") from None


def parse(data: bytes | str, fmt: Literal["json", "yaml", "text"], *, where: str | Path,
          error: type[LockgateError] = ConfigError) -> Any:
    """`data` as JSON, YAML (aliases measured) or UTF-8 text, or `error("<where>: <why>")` in one line. Every file the
    CLI reads without a Struct goes through here: before (probe p11), nesting 200,000 deep (RecursionError) or
    Latin-1 text (UnicodeDecodeError) escaped the readers' own `except` and ended the command in a traceback."""
    try:
        if fmt == "text":
            return data.decode() if isinstance(data, bytes) else data
        if fmt == "json":
            return json_loads(data)
        return yaml_loads(data)
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1 if isinstance(exc.object, bytes) else 1
        raise error(f"{where}: not UTF-8 text (line {line})") from None
    except RecursionError:
        raise error(f"{where}: nested too deeply to read") from None
    except (TwoReadings, Expands) as exc:
        raise error(f"{where} is refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise error(f"{where}: not JSON or YAML ({' '.join(str(exc).split())})") from None
    except ValueError as exc:  # json.loads's; before (probe p58 F6) a YAML file's read "not valid JSON" too
        raise error(f"{where}: not valid {fmt.upper()}: {exc}") from None


def decode_json(data: bytes, type_: Any = Any, *, where: str | Path, error: type[LockgateError] = ConfigError) -> Any:
    """A signed JSON document (a decision file, an attestation's payload) as `type_`, or `error("<where> is refused:
    ...")` when a key repeats at any depth: a signature covers what lockgate decodes, not the bytes, so a repeated key
    was verified in lockgate's reading while a reader keeping the first saw another (probe p20 F2, F7). What is not
    JSON, or not a `type_`, raises as `json.loads` (`type_` Any) or `msgspec.json.decode` would, for the caller to
    word."""
    try:
        value = json_loads(data)
    except TwoReadings as exc:
        raise error(f"{where} is refused: {exc}") from None
    except (ValueError, RecursionError):
        if type_ is Any:
            raise
        value = None  # msgspec says where
    return value if type_ is Any else msgspec.json.decode(data, type=type_)


def read(path: str | Path, fmt: Literal["json", "yaml", "text"], *, name: str,
         error: type[LockgateError] = ConfigError) -> Any:
    """The file at `path` through `parse`; ConfigError (one line, naming it) if it cannot be read."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {name} {p}: {exc.strerror or exc}") from None
    return parse(data, fmt, where=f"{name} {p}", error=error)


def at(path: str, message: str) -> ValueError:
    """A check a Struct's `__post_init__` makes across fields, worded like msgspec's own (`... - at `$.x``).

    Only for the document's root Struct: msgspec appends a nested Struct's path itself.
    """
    return ValueError(f"{message} - at `{path}`")


def reroot(path: str, exc: msgspec.ValidationError | str) -> str:
    """A sub-document's error message with its paths moved under `path` (`$.n` -> `$.scorers[1].params.n`)."""
    message = str(exc)
    head, sep, rest = message.rpartition(" - at `$")
    return f"{head} - at `{path}{rest}" if sep else f"{message} - at `{path}`"
