"""Where the evaluator's calls go: an endpoint of the operator's allow-list, with its credential, or (for an
offline eval run only) a plain URL, with none: the development setup with the simulator.

An eval run (EvalRequested.endpoint, a suite judge's `endpoint:`) names an endpoint id or a URL; the online
judge names an id only, since a deployment document must never send live answers anywhere the operator did
not list. A listed endpoint whose credential is missing is a ConfigError naming both: never a call without it.
"""

from __future__ import annotations

from lockgate.config import Settings
from lockgate.endpoints import Access, AllowList, UnknownEndpoint
from lockgate.errors import ConfigError


def listed(settings: Settings, endpoint_id: str, what: str = "endpoint") -> Access:
    """An allow-listed endpoint's URL and credential; ConfigError (prefixed by `what`) when it is not listed,
    its credential is missing, or it does not speak the OpenAI API the evaluator calls."""
    try:
        access = AllowList(settings).access(endpoint_id, what)
    except UnknownEndpoint as exc:  # a ConfigError here: the run (or the judge's outcome) says why
        raise ConfigError(exc.message) from None
    if access.provider != "openai":
        raise ConfigError(f"{what} {endpoint_id!r} speaks the {access.provider} API; the evaluator calls "
                          "OpenAI-compatible chat completions: name an OpenAI-compatible endpoint")
    return access


def of_run(settings: Settings, endpoint: str, what: str = "endpoint") -> Access:
    """An eval run's endpoint: a URL as given (no credential), else an id of the allow-list."""
    if "://" in endpoint:  # an id never holds ':' or '/'
        return Access(id=endpoint, base=endpoint.rstrip("/"))
    return listed(settings, endpoint, what)
