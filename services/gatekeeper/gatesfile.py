"""The gates file: which policy (and suite) must gate each app's releases, fixed by whoever runs the gatekeeper.

Without it, an eval is judged by whatever policy it names, so whoever requests evals (an operator) could
register a policy with no thresholds and gate their own release with it. The file is the gatekeeper's
configuration (settings.gates_file, LOCKGATE_GATES_FILE), never read from the bus:

    apps:
      support-bot: {policy: strict=sha256:<64 hex>, suite: support-quality, baseline: {deployment: support-web}}
      "*": {policy: baseline}        # any app not named

A value is `NAME`, any version registered under that artifact name (which trusts whoever may register
versions under it: operators), or `NAME=sha256:<64 hex>`, exactly that content (the name is for people;
the hash decides). The kind is implied by the key: `policy` names a policy, `suite` an eval_suite.
`baseline: {deployment: D}` fixes what the app's evals are compared with: the newest known-good release of
deployment D, as its route says when the eval is decided (the eval's requester would otherwise choose the
yardstick of the policy's relative rules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from lockgate.contracts.names import NAME_RULE, Name, is_name
from lockgate.documents import NonEmpty, at, load_yaml, reroot
from lockgate.errors import ConfigError

__all__ = ["ANY_APP", "Gates", "Pin", "Required", "load_gates_file", "parse_pin"]

ANY_APP = "*"
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_KINDS = {"policy": "policy", "suite": "eval_suite"}


@dataclass(frozen=True)
class Pin:
    """A required artifact: any registered version of `name` (`hash` empty), or exactly the content `hash`."""

    kind: str  # the artifact kind: policy or eval_suite
    name: str
    hash: str = ""

    def __str__(self) -> str:
        return f"{self.name}={self.hash}" if self.hash else self.name


def parse_pin(value: str, key: str) -> Pin:
    """`NAME` or `NAME=sha256:<64 hex>` under `key` (policy or suite) as a Pin; ValueError saying what is wrong."""
    kind = _KINDS[key]
    name, sep, digest = value.partition("=")
    for prefix in {f"{key}/", f"{kind}/"}:
        # The kind is implied by the key; `policy/strict` would be an artifact name no policy is registered
        # under, and every eval of the app would be blocked for it.
        if name.startswith(prefix):
            raise ValueError(f"{key} {value!r}: write the name alone ({name.removeprefix(prefix)!r}); "
                             f"the kind ({kind}) is implied by the key")
    if not is_name(name):
        raise ValueError(f"{key} {value!r}: {name!r} is not an artifact name ({NAME_RULE})")
    if sep and not _HASH.match(digest):
        raise ValueError(f"{key} {value!r}: after '=' comes the exact version, sha256: and 64 lowercase hex "
                         f"digits, not {digest!r}")
    return Pin(kind, name, digest)


class _Baseline(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where an app's evals take their baseline from: the deployment whose known-good release it is."""

    deployment: Name

    def __post_init__(self) -> None:
        if not is_name(self.deployment):
            raise ValueError(f"deployment {self.deployment!r} is not a deployment name ({NAME_RULE})")


class _AppGates(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One app's entry as written in the file."""

    policy: NonEmpty
    suite: str = ""
    baseline: _Baseline | None = None

    def __post_init__(self) -> None:
        for key in ("policy", "suite"):
            value = getattr(self, key)
            if value:
                try:
                    parse_pin(value, key)
                except ValueError as exc:
                    raise at(f"$.{key}", str(exc)) from None


class _GatesFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Each app's entry is decoded apart (load_gates_file), so an error names the app: msgspec itself
    # writes a mapping's key as `[...]`.
    apps: dict[str, Any]


@dataclass(frozen=True)
class Required:
    """What must gate the releases of an app: a policy, perhaps a suite and the deployment whose known-good
    release is the baseline, and where that was said."""

    policy: Pin
    suite: Pin | None
    source: str  # the gates file, for the hint
    baseline_deployment: str = ""  # "": the eval's baseline is whatever it names (refused unless allowed)


@dataclass(frozen=True)
class Gates:
    """The decoded gates file: the requirement per app name, `*` for any app not named."""

    source: str
    apps: dict[str, Required]

    def for_app(self, app: str) -> Required | None:
        """The requirement that applies to `app` (its own entry, else `*`), None if the file covers it not."""
        return self.apps.get(app) or self.apps.get(ANY_APP)


def load_gates_file(path: str | Path) -> Gates | None:
    """The gates file at `path` (None for an empty path: no requirement); ConfigError naming the file and
    the field when it cannot be read or is invalid."""
    if not path:
        return None
    source = str(Path(path).expanduser())
    doc = load_yaml(source, _GatesFile, name="gates file")
    apps = {}
    for app, raw in doc.apps.items():
        where = f"$.apps.{app}"
        if app != ANY_APP and not is_name(app):
            raise ConfigError(f"gates file {source} is invalid: app {app!r} is not an app name ({NAME_RULE}) "
                              f"nor {ANY_APP!r} (any app not named) - at `{where}`")
        try:
            entry = msgspec.convert(raw, _AppGates)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"gates file {source} is invalid: {reroot(where, exc)}") from None
        apps[app] = Required(policy=parse_pin(entry.policy, "policy"),
                             suite=parse_pin(entry.suite, "suite") if entry.suite else None, source=source,
                             baseline_deployment=entry.baseline.deployment if entry.baseline else "")
    return Gates(source, apps)
