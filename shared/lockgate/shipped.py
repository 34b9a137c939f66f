"""What a release ships: its one `model_config` artifact's model, endpoint id and sampling parameters.

The router serves a release exactly so, and the evaluator calls it exactly so: the gate then judges what
will take traffic, not whatever model an eval request happened to name.

    # a model_config artifact
    model: gpt-4o-mini
    endpoint: openai-prod        # an id of the endpoint allow-list (default `default`)
    temperature: 0.2             # any of PARAMS: they override what a client or a suite asks for
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.errors import ConfigError, NotFound
from lockgate.redact import shown_url

# Sampling parameters a model config may fix for its release (they override the client's and the suite's), and
# the processing tier it is served at (`service_tier`: the operator's price to choose, never a client's).
PARAMS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "presence_penalty",
          "frequency_penalty", "stop", "service_tier")


class Shipped(msgspec.Struct, frozen=True, kw_only=True):
    """A release's model config, resolved: where and how its traffic is served."""

    release: str
    app: str = ""  # the app the release belongs to (its registration says)
    tenant: str = ""  # the tenant it is registered under (its registration says)
    config: str  # the model_config artifact (`model_config/name` key's hash)
    model: str
    endpoint: str = "default"
    params: dict[str, Any] = {}

    @property
    def where(self) -> str:
        """What the release ships, as a refusal names it."""
        return (f"release {self.release!r} ships model {self.model!r} at endpoint {shown_url(self.endpoint)!r} "
                f"({self.config})")


# The rule an eval of a release with a model config keeps to, in one place: the evaluator applies it to every
# request on the bus, and `lockgate eval run` before it requests anything (a run the evaluator refuses is a
# failed run, which the gate BLOCKs: a typo in a flag would roll back a serving release).

def refuse_other_model(shipped: Shipped, model: str, by: str = "the eval") -> None:
    """ConfigError when an eval of `shipped` asks for another model (`model`, "" for none) than it ships: a PASS
    for it would let the gate judge one model and the router serve another."""
    if model and model != shipped.model:
        raise ConfigError(f"{shipped.where}, but {by} asks for model {model!r}: the gate judges what ships; "
                          f"omit the model or give {shipped.model!r}")


def refuse_other_endpoint(shipped: Shipped, endpoint: str, base: str | None) -> None:
    """ConfigError when an eval of `shipped` asks for another place (`endpoint`, "" for none) than it ships. The
    place agrees when it is the shipped endpoint's id, or a URL equal to `base`, that endpoint's allow-listed URL
    (None: not known here, so only the id agrees); the development setup names the simulator by URL."""
    if endpoint and endpoint != shipped.endpoint and endpoint.rstrip("/") != base:
        raise ConfigError(f"{shipped.where}, but the eval asks for endpoint {shown_url(endpoint)!r}: the gate "
                          f"judges what ships; omit the endpoint or give {shown_url(shipped.endpoint)!r}")


def refuse_url_credentials(endpoint: str) -> None:
    """ConfigError when the URL an eval names (`endpoint`) carries a credential: a user or password before its `@`,
    or a secret `shown_url` masks (`?api-key=...`). The URL is copied into every record of the run (its environment,
    its error, the gate's signed reason, the audit log, a route's reason), so the credential would be stored for good;
    an endpoint's credential belongs in the endpoints file, named by the endpoint's id."""
    if "://" not in endpoint:
        return  # an id of the allow-list (an id never holds ':' or '/')
    shown = shown_url(endpoint)
    if shown != endpoint or "@" in re.split(r"[/?#]", endpoint.partition("://")[2], maxsplit=1)[0]:
        raise ConfigError(f"eval endpoint {shown!r} carries a credential in its URL, which every record of the run "
                          "would keep: list the endpoint in the endpoints file (LOCKGATE_ENDPOINTS_FILE) with its "
                          "credential named there, and give its id")


async def of_release(bus: Bus, release: str) -> Shipped:
    """The model config release `release` is bound to. NotFound if the release (or its config's content) is not
    registered; ConfigError naming the release when it carries no single model config naming a model."""
    return await of_bundle(bus, release, await artifacts.release_of(bus, release))


async def of_bundle(bus: Bus, release: str, bundle: Mapping[str, Any]) -> Shipped:
    """The model config of `bundle`, release `release`'s binding as read earlier (an eval run reads it once, when
    it starts, and calls what it read then on every delivery); the errors of `of_release`."""
    configs = [h for k, h in bundle["artifacts"].items() if k.startswith("model_config/")]
    if len(configs) != 1:
        raise ConfigError(f"release {release!r} must carry exactly one model_config artifact (it has "
                          f"{len(configs)}): a release is served and evaluated as it says")
    try:
        config = await artifacts.load_structured(bus, configs[0])
    except NotFound as exc:
        raise type(exc)(f"model config of release {release!r}: {exc.message}") from None  # ArtifactCorrupt stays so
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, str) or not model:
        raise ConfigError(f"model config {configs[0]} of release {release!r} names no model")
    return Shipped(release=release, app=str(bundle.get("app") or ""), tenant=str(bundle.get("tenant") or ""),
                   config=configs[0], model=model,
                   endpoint=str(config.get("endpoint", "default")),
                   params={k: config[k] for k in PARAMS if k in config})
