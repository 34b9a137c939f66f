"""The operator's endpoint allow-list and the credential lockgate holds for each endpoint.

One loader for every service that calls a provider: the router (which adds its own resilience fields and model
map on top, services/router/endpoints.py) and the evaluator (its online judge and offline eval runs). Both read
the endpoints and the groups of one file through this module, so what a release may name is the same for the
router that serves it and the evaluator that gates it.
An endpoint is named by id; its provider key is looked up by name in the environment, then in the secrets
file (settings.secrets_file, a YAML mapping NAME: secret), and sent only to that endpoint: as `x-api-key`
to an Anthropic endpoint, else as `Authorization: Bearer`. A named credential that is found nowhere is a
ConfigError naming the endpoint and the credential, never a call without it. The secret itself is never
in a repr, a message, a log line or an event.

    # endpoints.yaml (settings.endpoints_file / LOCKGATE_ENDPOINTS_FILE); the router documents the rest
    endpoints:
      openai-prod: {url: https://api.openai.com/v1, credential: OPENAI_API_KEY}
      judge: {url: https://judge.example/v1, credential: JUDGE_KEY}
      openai-backup:
        url: https://backup.example/v1
        credential: BACKUP_KEY
        price: {input_per_mtok: 0.1, output_per_mtok: 0.4}
    groups:             # endpoints serving the same model: a release may name one instead of an endpoint
      gpt-4o-any: {endpoints: [openai-prod, openai-backup], choose: price}

A group is allowed when each of its members is (a group whose members are not all listed, or whose id is an
endpoint's, is a ConfigError of the file). A release naming a group is served by the member the router ranks
first (`first_choice`): by price, the cheapest (declared prices, so every replica picks the same one); by
latency, the one measured fastest, and before any measurement the first listed. The evaluator evaluates that
same member, with its URL and credential, so the gate judges what the router will serve.

Without a file, two endpoints come from settings: `default` (stable_upstream) and `canary`
(canary_upstream), with no credential: the development setup with the simulator.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, TypeVar

import msgspec

from lockgate.config import Settings
from lockgate.documents import load_yaml
from lockgate.errors import ConfigError, LockgateError
from lockgate.pricebook import ModelPrice

EndpointId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Url = Annotated[str, msgspec.Meta(pattern="^https?://")]
Provider = Literal["openai", "anthropic"]


class UnknownEndpoint(LockgateError):
    """A release, route, judge or eval run names an endpoint that is not in the operator's allow-list."""


class EndpointSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What every reader needs of one configured endpoint; the router's own fields extend it."""

    url: Url
    credential: str = ""  # name of the env variable or secrets-file entry holding the provider key
    provider: Provider = "openai"
    # OpenAI's organization and project the credential is used for (sent as `OpenAI-Organization` and
    # `OpenAI-Project`). The operator's to choose, never a client's: lockgate does not forward a client's.
    organization: str = ""
    project: str = ""
    price: ModelPrice | None = None  # what this endpoint charges, for groups that choose by price


class GroupSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Endpoints serving the same model: each request goes to the best by `choose`; the rest are its fallbacks."""

    endpoints: Annotated[list[EndpointId], msgspec.Meta(min_length=2)]
    choose: Literal["price", "latency"] = "price"
    explore: Annotated[float, msgspec.Meta(ge=0, le=0.5)] = 0.05  # by latency: share sent to the runner-up


class EndpointsFile(msgspec.Struct):
    """The shared view of the endpoints file: the router's own section (models) and fields are its to check
    (its reading extends this one)."""

    endpoints: dict[EndpointId, EndpointSpec]
    groups: dict[EndpointId, GroupSpec] = {}
    # What `endpoints` holds: a reading that extends this one names its own, so that the development endpoints
    # (no file) are of the same type as a file's.
    spec_type: ClassVar[type[EndpointSpec]] = EndpointSpec


F = TypeVar("F", bound=EndpointsFile)


def blended(price: ModelPrice | None) -> float | None:
    """A price per million input plus output tokens (None when the endpoint declares none)."""
    return None if price is None else price.input_per_mtok + price.output_per_mtok


def by_price(members: Sequence[str], prices: Mapping[str, float | None]) -> list[str]:
    """A group's members cheapest first, unpriced last; ties keep the configured order."""
    return sorted(members, key=lambda m: (prices.get(m) is None, prices.get(m) or 0.0))


def first_choice(group: GroupSpec, prices: Mapping[str, ModelPrice | None]) -> str:
    """The member the router sends a group's request to when nothing is measured or throttled yet (`prices`: each
    member's declared price): by price the cheapest (declared, so every replica's choice for every request), by
    latency the first listed."""
    if group.choose == "price":
        return by_price(group.endpoints, {m: blended(prices.get(m)) for m in group.endpoints})[0]
    return group.endpoints[0]


def member_of(specs: Mapping[str, EndpointSpec], groups: Mapping[str, GroupSpec]) -> dict[str, str]:
    """Each allowed id and the endpoint it stands for: an endpoint itself, a group its first choice. Prices are
    declared, so a reader computes this once, not per request."""
    prices = {eid: spec.price for eid, spec in specs.items()}
    return {**{e: e for e in specs}, **{g: first_choice(group, prices) for g, group in groups.items()}}


def check_groups(specs: dict[str, Any], groups: dict[str, GroupSpec]) -> None:
    """ConfigError when a group has an endpoint's id or names an endpoint that is not configured: a group is
    allowed only as far as each of its members is."""
    for gid, group in groups.items():
        if gid in specs:
            raise ConfigError(f"group {gid!r} has the id of an endpoint: a release could not tell which it names")
        unknown = [m for m in group.endpoints if m not in specs]
        if unknown:
            raise ConfigError(f"group {gid!r} names endpoints that are not configured: {', '.join(unknown)} "
                              f"(allowed: {', '.join(sorted(specs))})")


class Access(msgspec.Struct, frozen=True, kw_only=True):
    """One allow-listed endpoint resolved: its base URL and the headers that carry its credential."""

    id: str  # the id named (a group's, when one was named)
    base: str  # the configured base URL without a trailing slash: each operation appends its path
    member: str = ""  # when `id` is a group's: the member endpoint whose URL and credential these are
    provider: str = "openai"
    authorization: str | None = None  # "Bearer <key>"; never logged, never in events
    headers: dict[str, str] = {}  # the credential as this provider expects it, and `scope`; never logged
    scope: dict[str, str] = {}  # the OpenAI-Organization / OpenAI-Project headers sent (no secret)
    # sha256 of the credential's name and value ("" without one): tells two credentials apart (the evaluator's
    # cache keys answers by it) without holding the secret
    fingerprint: str = ""

    def __repr__(self) -> str:  # keep the secret out of any accidental repr in logs or tracebacks
        return f"Access(id={self.id!r}, base={self.base!r})"


def fingerprint(name: str, secret: str) -> str:
    """A credential's fingerprint: sha256 of its name and value, domain-separated ("" without a secret)."""
    if not secret:
        return ""
    return hashlib.sha256(b"lockgate.credential\0" + name.encode() + b"\0" + secret.encode()).hexdigest()


def auth_headers(provider: str, secret: str) -> dict[str, str]:
    """The headers carrying `secret` to an endpoint of `provider` (none without a secret)."""
    if not secret:
        return {}
    return {"x-api-key": secret} if provider == "anthropic" else {"Authorization": f"Bearer {secret}"}


def read_file(settings: Settings, file_type: type[F]) -> F:
    """The endpoints file decoded as `file_type` (a ConfigError naming the file when unreadable or invalid)."""
    return load_yaml(settings.endpoints_file, file_type, name="endpoints file")


def dev_endpoints(settings: Settings, spec_type: type[EndpointSpec] = EndpointSpec
                  ) -> dict[str, EndpointSpec]:
    """The two endpoints of a setup without an endpoints file, as `spec_type`: `default` and `canary`, no
    credential."""
    return {"default": spec_type(url=settings.stable_upstream), "canary": spec_type(url=settings.canary_upstream)}


def read_secrets(settings: Settings) -> dict[str, str]:
    """The secrets file as NAME -> value ({} without one)."""
    if not settings.secrets_file:
        return {}
    raw = load_yaml(settings.secrets_file, dict[str, Any] | None, name="secrets file")
    return {str(k): str(v) for k, v in (raw or {}).items()}


def resolve(endpoint_id: str, spec: EndpointSpec, secrets: dict[str, str]) -> Access:
    """The endpoint with its credential, or ConfigError naming the endpoint and the credential not found."""
    secret = ""
    if spec.credential:
        secret = os.environ.get(spec.credential) or secrets.get(spec.credential) or ""
        if not secret:
            raise ConfigError(f"credential {spec.credential!r} of endpoint {endpoint_id!r} is neither an environment "
                              "variable nor an entry of the secrets file (settings.secrets_file)")
    scope = {name: value for name, value in (("OpenAI-Organization", spec.organization),
                                             ("OpenAI-Project", spec.project)) if value}
    return Access(id=endpoint_id, base=spec.url.rstrip("/"), provider=spec.provider,
                  authorization=f"Bearer {secret}" if secret else None,
                  headers={**auth_headers(spec.provider, secret), **scope}, scope=scope,
                  fingerprint=fingerprint(spec.credential, secret))


def read(settings: Settings, file_type: type[F]) -> F:
    """The endpoints file as `file_type` (this view or the router's), its groups checked (ConfigError); without a
    file, the development endpoints (as `file_type.spec_type`) and no group."""
    if not settings.endpoints_file:
        return file_type(endpoints=dev_endpoints(settings, file_type.spec_type))
    file = read_file(settings, file_type)
    check_groups(file.endpoints, file.groups)
    return file


class Member(NamedTuple):
    """The endpoint an allowed id stands for: `id` itself, or a group's first choice."""

    id: str
    spec: EndpointSpec


class AllowList:
    """The allow-list as read now: endpoint and group ids and, on demand, each one's URL and credential."""

    def __init__(self, settings: Settings) -> None:
        file = read(settings, EndpointsFile)
        self.specs: dict[str, EndpointSpec] = file.endpoints
        self.groups: dict[str, GroupSpec] = file.groups
        self._member_of = member_of(self.specs, self.groups)
        self._settings = settings

    def spec(self, endpoint_id: str) -> Member | None:
        """The endpoint an id stands for, with its id: itself, or a group's first choice (None: not listed)."""
        eid = self._member_of.get(endpoint_id)
        return None if eid is None else Member(eid, self.specs[eid])

    def access(self, endpoint_id: str, what: str = "endpoint") -> Access:
        """The endpoint's URL and credential (a group's: its first choice's, `member` naming it): UnknownEndpoint
        naming the allowed ids (and the endpoint as `what`), or ConfigError when its credential is missing. Only
        this endpoint's credential is looked up."""
        found = self.spec(endpoint_id)
        if found is None:
            raise UnknownEndpoint(f"{what} {endpoint_id!r} is not in the endpoint allow-list "
                                  f"({', '.join(sorted([*self.specs, *self.groups])) or 'none'})")
        eid, spec = found
        access = resolve(eid, spec, read_secrets(self._settings))
        if eid == endpoint_id:
            return access
        return msgspec.structs.replace(access, id=endpoint_id, member=eid)
