"""Upstream endpoints: an allow-list from operator configuration, each with a credential held by lockgate.

Routes and releases name an endpoint by id, never by URL, so neither a route change nor a request
can send traffic (or a key) anywhere the operator did not list. The provider key is looked up by
name in the environment, then in the secrets file, and sent only to its own endpoint (lockgate.endpoints:
the one loader, shared with the evaluator; this module adds the router's fields and sections).

    # endpoints.yaml (settings.endpoints_file / LOCKGATE_ENDPOINTS_FILE)
    endpoints:
      openai-prod: {url: https://api.openai.com/v1, credential: OPENAI_API_KEY}
      claude: {url: https://api.anthropic.com/v1, credential: ANTHROPIC_API_KEY, provider: anthropic}
      openai-backup:
        url: https://backup.example/v1
        credential: BACKUP_KEY
        timeouts: {connect_s: 2, first_byte_s: 20, between_chunks_s: 10, total_s: 120}
        retry: {attempts: 2, budget_ratio: 0.1}
        breaker: {consecutive_failures: 3, cooldown_s: 30}
        fallback: openai-prod   # tried when this one fails or its breaker is open
    models:             # optional: which deployment serves a model name clients send
      gpt-4o-mini: chat
      claude-sonnet: support
    groups:             # optional: endpoints serving the same model, one chosen per request
      gpt-4o-any: {endpoints: [openai-prod, openai-backup], choose: price}

`provider` (default `openai`) says what the endpoint speaks: `openai` (OpenAI-compatible; requests
pass through) or `anthropic` (Anthropic Messages; chat completions are translated both ways, and the
key goes in `x-api-key`). `models` maps a request's `model` to a deployment; the
`x-lockgate-deployment` header overrides it (see Proxy.deployment_of).

Timeouts, retries and the breaker default to resilience.py's values (fallback: none).

A release may name a group instead of an endpoint (cost-aware routing): each request goes to the
member that is cheapest (`choose: price`, by each member's `price:` in USD per million tokens, like
the price book; unpriced members last) or fastest (`choose: latency`, by the first-byte time this
replica measured, members not yet measured first so that each gets measured; `explore` of the
requests go to another member so the figures stay current), and the other members are its
fallbacks, in that order.

The file is read, and its groups checked, by lockgate.endpoints, the reading the evaluator's allow-list
shares: a group is allowed when each of its members is, so a release naming one is gated as it is served.

Without a file, two endpoints come from settings: `default` (stable_upstream) and `canary`
(canary_upstream), with no credential: the development setup with the simulator.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec
from yarl import URL

from lockgate import endpoints as allowlist
from lockgate.config import Settings
from lockgate.contracts.names import Name
from lockgate.endpoints import EndpointId, GroupSpec, UnknownEndpoint
from lockgate.errors import ConfigError
from lockgate.pricebook import ModelPrice
from lockgate.services.router.resilience import BreakerSpec, RetrySpec, Timeouts

__all__ = ["Endpoint", "EndpointSpec", "Endpoints", "GroupSpec", "UnknownEndpoint"]


class EndpointSpec(allowlist.EndpointSpec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One endpoint as configured: the shared fields (url, credential, provider, price) and the router's own."""

    timeouts: Timeouts = Timeouts()
    retry: RetrySpec = RetrySpec()
    breaker: BreakerSpec = BreakerSpec()
    fallback: EndpointId | None = None  # the endpoint tried when this one fails (an id, never a URL)


class _File(allowlist.EndpointsFile, forbid_unknown_fields=True):
    # The shared reading (endpoints and groups, the groups checked there) with the router's fields and section.
    endpoints: dict[EndpointId, EndpointSpec]
    models: dict[str, Name] = {}  # model name -> deployment
    spec_type: ClassVar[type[allowlist.EndpointSpec]] = EndpointSpec


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    """A resolved endpoint: where chat completions go and the Authorization lockgate sends there."""

    id: str
    url: URL  # chat completions (OpenAI-compatible endpoints)
    authorization: str | None = None  # never logged, never in events
    base: URL | None = None  # the configured base URL: each operation appends its path
    provider: str = "openai"
    auth_headers: dict[str, str] = {}  # the credential as this provider expects it; never logged

    timeouts: Timeouts = Timeouts()
    retry: RetrySpec = RetrySpec()
    breaker: BreakerSpec = BreakerSpec()
    fallback: str | None = None
    price: ModelPrice | None = None

    def url_for(self, path: str) -> URL:
        """The upstream URL of one operation path (e.g. "/embeddings")."""
        base = self.base if self.base is not None else URL(str(self.url).removesuffix("/chat/completions"))
        return URL(f"{str(base).rstrip('/')}{path}")

    def __repr__(self) -> str:  # keep the secret out of any accidental repr in logs or tracebacks
        return f"Endpoint(id={self.id!r}, url={str(self.url)!r})"


class Endpoints:
    """The allow-list, loaded once at start."""

    def __init__(self, settings: Settings) -> None:
        file = allowlist.read(settings, _File)
        specs: dict[str, EndpointSpec] = file.endpoints
        self.models: dict[str, str] = file.models  # model name -> deployment
        self.groups: dict[str, GroupSpec] = file.groups
        self._member_of = allowlist.member_of(specs, self.groups)
        secrets = allowlist.read_secrets(settings)
        self.by_id: dict[str, Endpoint] = {}
        for eid, spec in specs.items():
            access = allowlist.resolve(eid, spec, secrets)
            if spec.fallback is not None and spec.fallback not in specs:
                raise ConfigError(f"endpoint {eid!r} falls back to {spec.fallback!r}, which is not configured "
                                  f"(allowed: {', '.join(sorted(specs))})")
            self.by_id[eid] = Endpoint(id=eid, url=URL(f"{access.base}/chat/completions"),
                                       authorization=access.authorization, base=URL(access.base),
                                       provider=spec.provider, auth_headers=access.headers,
                                       timeouts=spec.timeouts, retry=spec.retry, breaker=spec.breaker,
                                       fallback=spec.fallback, price=spec.price)
        self.fallbacks = {eid: e.fallback for eid, e in self.by_id.items()}

    def get(self, endpoint_id: str) -> Endpoint:
        """The endpoint with this id (a group's first choice, the member the evaluator evaluates), or
        UnknownEndpoint naming the allowed ones."""
        eid = self._member_of.get(endpoint_id)
        if eid is None:
            raise UnknownEndpoint(f"endpoint {endpoint_id!r} is not configured (allowed: "
                                  f"{', '.join(sorted([*self.by_id, *self.groups])) or 'none'})")
        return self.by_id[eid]
