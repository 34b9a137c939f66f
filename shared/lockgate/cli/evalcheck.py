"""What `lockgate eval run` checks of the releases it names before it registers or requests anything.

The evaluator fails a run that asks for another model or endpoint than the candidate ships, and the gatekeeper
signs a BLOCK of a failed run; a BLOCK of a serving release rolls it back. So a mistyped `--endpoint` or
`--model` (or a `--baseline` that names no release of the candidate's app) is refused here, as an input error
(exit 2), with the rule the evaluator keeps to (lockgate.shipped): nothing is requested and no decision is
written. The evaluator keeps its own check for requests others publish. A URL with a credential in it
(`http://user:password@host/v1`) is refused the same way, whatever the candidate: the run's records would keep it.

A URL is compared with the allow-list as this CLI's settings read it, which need not be the evaluator's (a
simulator on another port): a URL that differs is refused, and one that agrees is requested as the endpoint's
id, so the evaluator, which calls what ships either way, has no URL of its own to refuse the run over.
"""

from __future__ import annotations

from typing import Any

from lockgate import artifacts, shipped
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.endpoints import AllowList
from lockgate.errors import ConfigError, NotFound


async def check_releases(bus: Bus, settings: Settings, *, candidate: str, baseline: str, endpoint: str, model: str,
                         suite_model: str, suite_name: str, calls: bool) -> str:
    """The endpoint to request (`endpoint`, or the shipped endpoint's id for its URL); ConfigError when the eval
    of `candidate` would be refused or judged against another release than meant: a candidate nobody registered
    and no endpoint to call, a model or endpoint other than the candidate ships (`calls`: the suite calls the
    model; a recorded task calls nothing), a baseline that is not registered or is another app's; a URL carrying a
    credential, whatever the candidate (lockgate.shipped.refuse_url_credentials)."""
    shipped.refuse_url_credentials(endpoint)
    bundle = await _bundle(bus, candidate)
    if bundle is None and not endpoint:
        # Before, one nobody registered was refused by the evaluator as "EvalRequested.endpoint is empty",
        # blaming the endpoint.
        raise ConfigError(f"release {candidate!r} is not registered: register it (`lockgate release create` or "
                          "`lockgate apply`), or evaluate a model directly with --endpoint and --model")
    if bundle is not None and calls:
        endpoint = await _check_binding(bus, settings, candidate, endpoint, model, suite_model, suite_name)
    if baseline:
        base = await _bundle(bus, baseline)
        if base is None:
            raise ConfigError(f"baseline release {baseline!r} is not registered: name a gated release of the same "
                              "app (such as the one its deployment serves), or leave --baseline out")
        app, base_app = (bundle or {}).get("app"), base.get("app")
        if bundle is not None and base_app != app:
            raise ConfigError(f"baseline {baseline!r} is a release of app {base_app!r}, not of {app!r}: a release "
                              "is compared with an earlier release of its own app, gated by the same gates")
    return endpoint


async def _bundle(bus: Bus, release: str) -> dict[str, Any] | None:
    try:
        return await artifacts.release_of(bus, release)
    except NotFound:
        return None


async def _check_binding(bus: Bus, settings: Settings, candidate: str, endpoint: str, model: str,
                         suite_model: str, suite_name: str) -> str:
    try:
        ships = await shipped.of_release(bus, candidate)
    except (NotFound, ConfigError):
        return endpoint  # no usable model config: the evaluator evaluates it as asked
    shipped.refuse_other_model(ships, model)
    if not model:  # the evaluator calls the suite's `model:` when the request names none
        shipped.refuse_other_model(ships, suite_model, by=f"suite {suite_name}")
    if not endpoint or endpoint == ships.endpoint:
        return endpoint
    shipped.refuse_other_endpoint(ships, endpoint, _listed_url(settings, ships.endpoint))
    return ships.endpoint


def _listed_url(settings: Settings, endpoint_id: str) -> str | None:
    """The endpoint's URL in the allow-list as this CLI's settings read it (LOCKGATE_ENDPOINTS_FILE, else
    LOCKGATE_STABLE_UPSTREAM / LOCKGATE_CANARY_UPSTREAM), a group's that of the member the evaluator calls; None
    when they do not list it (then only its id is taken)."""
    found = AllowList(settings).spec(endpoint_id)
    return found.spec.url.rstrip("/") if found is not None else None
