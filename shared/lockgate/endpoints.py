"""The operator's endpoint allow-list and the credential lockgate holds for each endpoint.

One loader for every service that calls a provider: the router (which adds its own resilience, groups and
model map on top, services/router/endpoints.py) and the evaluator (its online judge and offline eval runs).
An endpoint is named by id; its provider key is looked up by name in the environment, then in the secrets
file (settings.secrets_file, a YAML mapping NAME: secret), and sent only to that endpoint: as `x-api-key`
to an Anthropic endpoint, else as `Authorization: Bearer`. A named credential that is found nowhere is a
ConfigError naming the endpoint and the credential, never a call without it. The secret itself is never
in a repr, a message, a log line or an event.

    # endpoints.yaml (settings.endpoints_file / LOCKGATE_ENDPOINTS_FILE); the router documents the rest
    endpoints:
      openai-prod: {url: https://api.openai.com/v1, credential: OPENAI_API_KEY}
      judge: {url: https://judge.example/v1, credential: JUDGE_KEY}

Without a file, two endpoints come from settings: `default` (stable_upstream) and `canary`
(canary_upstream), with no credential: the development setup with the simulator.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

import msgspec

from lockgate.config import Settings
from lockgate.documents import load_yaml
from lockgate.errors import ConfigError, LockgateError

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


class _File(msgspec.Struct):
    # The shared view: the router's sections (models, groups) and fields are its own to check.
    endpoints: dict[EndpointId, EndpointSpec]


class Access(msgspec.Struct, frozen=True, kw_only=True):
    """One allow-listed endpoint resolved: its base URL and the headers that carry its credential."""

    id: str
    base: str  # the configured base URL without a trailing slash: each operation appends its path
    provider: str = "openai"
    authorization: str | None = None  # "Bearer <key>"; never logged, never in events
    headers: dict[str, str] = {}  # the credential as this provider expects it; never logged

    def __repr__(self) -> str:  # keep the secret out of any accidental repr in logs or tracebacks
        return f"Access(id={self.id!r}, base={self.base!r})"


def auth_headers(provider: str, secret: str) -> dict[str, str]:
    """The headers carrying `secret` to an endpoint of `provider` (none without a secret)."""
    if not secret:
        return {}
    return {"x-api-key": secret} if provider == "anthropic" else {"Authorization": f"Bearer {secret}"}


def read_file(settings: Settings, file_type: type[Any]) -> Any:
    """The endpoints file decoded as `file_type` (a ConfigError naming the file when unreadable or invalid)."""
    return load_yaml(settings.endpoints_file, file_type, name="endpoints file")


def dev_endpoints(settings: Settings) -> dict[str, EndpointSpec]:
    """The two endpoints of a setup without an endpoints file: `default` and `canary`, no credential."""
    return {"default": EndpointSpec(url=settings.stable_upstream), "canary": EndpointSpec(url=settings.canary_upstream)}


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
                  headers={**auth_headers(spec.provider, secret), **scope})


class AllowList:
    """The allow-list as read now: endpoint ids and, on demand, each one's URL and credential."""

    def __init__(self, settings: Settings) -> None:
        self.specs: dict[str, EndpointSpec] = (read_file(settings, _File).endpoints if settings.endpoints_file
                                               else dev_endpoints(settings))
        self._settings = settings

    def access(self, endpoint_id: str, what: str = "endpoint") -> Access:
        """The endpoint's URL and credential: UnknownEndpoint naming the allowed ids (and the endpoint as
        `what`), or ConfigError when its credential is missing. Only this endpoint's credential is looked up."""
        spec = self.specs.get(endpoint_id)
        if spec is None:
            raise UnknownEndpoint(f"{what} {endpoint_id!r} is not in the endpoint allow-list "
                                  f"({', '.join(sorted(self.specs)) or 'none'})")
        return resolve(endpoint_id, spec, read_secrets(self._settings))
