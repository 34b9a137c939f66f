"""What a release ships: its one `model_config` artifact's model, endpoint id and sampling parameters.

The router serves a release exactly so, and the evaluator calls it exactly so: the gate then judges what
will take traffic, not whatever model an eval request happened to name.

    # a model_config artifact
    model: gpt-4o-mini
    endpoint: openai-prod        # an id of the endpoint allow-list (default `default`)
    temperature: 0.2             # any of PARAMS: they override what a client or a suite asks for
"""

from __future__ import annotations

from typing import Any

import msgspec

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.errors import ConfigError, NotFound

# Sampling parameters a model config may fix for its release (they override the client's and the suite's).
PARAMS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "presence_penalty",
          "frequency_penalty", "stop")


class Shipped(msgspec.Struct, frozen=True, kw_only=True):
    """A release's model config, resolved: where and how its traffic is served."""

    release: str
    app: str = ""  # the app the release belongs to (its registration says)
    tenant: str = ""  # the tenant it is registered under (its registration says)
    config: str  # the model_config artifact (`model_config/name` key's hash)
    model: str
    endpoint: str = "default"
    params: dict[str, Any] = {}


async def of_release(bus: Bus, release: str) -> Shipped:
    """The model config release `release` is bound to. NotFound if the release (or its config's content) is not
    registered; ConfigError naming the release when it carries no single model config naming a model."""
    bundle = await artifacts.release_of(bus, release)
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
