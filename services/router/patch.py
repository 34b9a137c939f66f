"""PATCH of a deployment: a JSON merge patch (RFC 7396) on its document. Pure, no I/O.

The document is what an operator sets: `stable_release`, `canary_release`, `weight` and `strategy`.
A patch changes only the fields it names (a `null` removes an optional one, e.g. the strategy's
analysis); everything else, and where the rollout stands (phase, step, cursor, analysis counts), is
kept. PUT stays a full replace that starts a new rollout.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from lockgate.codec import UNDECODABLE, undecodable
from lockgate.contracts.names import Name, check_names
from lockgate.services.router.domain import InvalidRequest, InvalidRollout, Route
from lockgate.services.router.strategy import Strategy

CONTENT_TYPES = ("application/merge-patch+json", "application/json")


class Document(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A deployment as a PATCH sees it."""

    stable_release: Name
    canary_release: Name | None = None
    weight: Annotated[float, msgspec.Meta(ge=0, le=100)] = 0.0
    strategy: Strategy | None = None

    def __post_init__(self) -> None:
        check_names(self)


def document(route: Route) -> dict[str, Any]:
    """The route's document (plain JSON values)."""
    return {"stable_release": route.stable.release, "canary_release": route.canary.release if route.canary else None,
            "weight": route.weight, "strategy": msgspec.to_builtins(route.strategy) if route.strategy else None}


def merge(target: Any, patch: Any) -> Any:
    """RFC 7396: objects merge key by key, `null` deletes a key, anything else replaces the target."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


def decode(body: bytes) -> dict[str, Any]:
    """A merge patch body: a JSON object, or InvalidRequest."""
    try:
        patch = msgspec.json.decode(body) if body.strip() else None
    except UNDECODABLE as exc:
        raise InvalidRequest(f"invalid merge patch: {undecodable(exc)}") from None
    if not isinstance(patch, dict) or not patch:
        raise InvalidRequest('a merge patch is a non-empty JSON object, e.g. {"weight": 10}')
    return patch


def apply(route: Route, patch: dict[str, Any]) -> Document:
    """The document after the patch, validated: InvalidRequest when the patch makes no valid document (a weight
    out of range, a wrong type: whatever the route), else InvalidRollout when the route has nothing to patch or
    the patch changes what a PATCH does not."""
    if not route.stable.release:  # never rolled out (read as the default route under passthrough)
        raise InvalidRollout(f"deployment {route.deployment!r} has no rollout to patch: PUT starts one")
    try:
        doc = msgspec.convert(merge(document(route), patch), Document)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid deployment after the patch: {exc}") from None
    except RecursionError:  # a patch that decoded but nests deeper than merging it can recurse
        raise InvalidRequest("invalid merge patch: JSON is nested too deeply") from None
    # A finished rollout keeps its canary's target (weight 0) until the next PUT: checked before the fields, or a
    # promoted one (stable and canary the same release) was refused for a canary_release nobody sent.
    finished = _finished(route)
    if finished:
        d = route.deployment
        retry = f"; `lockgate rollout retry {d}` restarts the aborted one" if route.phase == "aborted" else ""
        raise InvalidRollout(f"deployment {d!r} has no live rollout ({finished}): PUT starts one (lockgate rollout "
                             f"start {d} --stable {route.stable.release} --canary RELEASE){retry}")
    if doc.stable_release != route.stable.release:
        raise InvalidRollout("a PATCH does not change stable_release: PUT starts a new rollout from a new stable")
    if doc.canary_release is None:
        raise InvalidRollout("a PATCH does not remove the canary: abort the rollout instead")
    if doc.canary_release == doc.stable_release:
        raise InvalidRollout("canary_release must differ from stable_release")
    return doc


def _finished(route: Route) -> str:
    """Why `route` has no rollout a PATCH could change ("promoted shop-v2", "aborted shop-v2"), or "" for a live
    one (a canary idle or progressing)."""
    if route.phase == "promoted":
        return f"promoted {route.stable.release}"
    if route.phase == "aborted":
        return f"aborted {route.canary.release if route.canary is not None else ''}".strip()
    return "" if route.canary is not None else "no canary"


def changed(route: Route, doc: Document) -> list[str]:
    """The fields the document changes, in document order."""
    before = document(route)
    after = msgspec.to_builtins(doc)
    return [k for k in ("stable_release", "canary_release", "weight", "strategy") if before.get(k) != after.get(k)]
