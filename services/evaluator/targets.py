"""Where the evaluator's calls go: an endpoint of the operator's allow-list, with its credential, or (for an
offline eval run only) a plain URL, with none: the development setup with the simulator.

An eval run (EvalRequested.endpoint, a suite judge's `endpoint:`) names an endpoint id or a URL; the online
judge names an id only, since a deployment document must never send live answers anywhere the operator did
not list. A listed endpoint whose credential is missing is a ConfigError naming both: never a call without it.
An endpoint of either provider is called in its own API (runner.complete): an `anthropic` one through the
router's translation, so what the gate judges is what the router serves.
A release that carries a model config is evaluated as it ships (`evaluated`), whatever the run names.
A release whose model config names a group of endpoints is evaluated at the member the router serves it from
(lockgate.endpoints.first_choice: by price the cheapest); the run's environment names the group as
`endpoint` (what ships, which the gate checks) and the member as `endpoint_member`.
"""

from __future__ import annotations

from typing import Any

from lockgate.config import Settings
from lockgate.endpoints import Access, AllowList, UnknownEndpoint
from lockgate.errors import ConfigError
from lockgate.shipped import Shipped, refuse_other_endpoint, refuse_other_model


def listed(settings: Settings, endpoint_id: str, what: str = "endpoint") -> Access:
    """An allow-listed endpoint's URL, credential and provider; ConfigError (prefixed by `what`) when it is not
    listed or its credential is missing."""
    try:
        return AllowList(settings).access(endpoint_id, what)
    except UnknownEndpoint as exc:  # a ConfigError here: the run (or the judge's outcome) says why
        raise ConfigError(exc.message) from None


def of_run(settings: Settings, endpoint: str, what: str = "endpoint") -> Access:
    """An eval run's endpoint: a URL as given (no credential), else an id of the allow-list."""
    if "://" in endpoint:  # an id never holds ':' or '/'
        return Access(id=endpoint, base=endpoint.rstrip("/"))
    return listed(settings, endpoint, what)


def evaluated(settings: Settings, shipped: Shipped | None, endpoint: str, model: str
              ) -> tuple[Access, str, dict[str, Any]]:
    """The endpoint, model and fixed parameters a call task evaluates: what the release ships when it carries
    a model config (the router serves it exactly so), else what the run asks for.

    A run that asks for another model or another place than the release ships is refused (ConfigError):
    a PASS for it would let the gate judge one model and the router serve another. The place agrees when it
    is the shipped endpoint's id, or a URL equal to that endpoint's allow-listed URL (the development setup
    names the simulator by URL).
    """
    if shipped is None:
        if not endpoint:
            raise ConfigError("EvalRequested.endpoint is empty; give an endpoint id of the allow-list or the "
                              "base URL of an OpenAI-compatible API")
        if not model:
            raise ConfigError("no model to evaluate: set EvalRequested.model or 'model' in the suite")
        return of_run(settings, endpoint), model, {}
    refuse_other_model(shipped, model)
    access = listed(settings, shipped.endpoint, f"{shipped.where}: endpoint")
    refuse_other_endpoint(shipped, endpoint, access.base)
    return access, shipped.model, dict(shipped.params)


def recorded(release: str, task_app: str, task_release: str) -> None:
    """Refuse (ConfigError) a gated run of `release` on a recorded task of another release's traffic: its PASS
    would judge what another release answered, not what `release` ships."""
    if task_release != release:
        raise ConfigError(f"the suite scores events recorded for release {task_release!r} (app {task_app!r}), "
                          f"but the eval is of release {release!r}: the gate judges what the release answered; "
                          f"run a suite whose task records release {release!r}")
