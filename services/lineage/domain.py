"""Pure lineage logic: which graph edges each event implies, and what a release's binding records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import msgspec

from lockgate.artifacts import announcement_id
from lockgate.contracts import (
    ArtifactRegistered,
    EvalCompleted,
    GateDecided,
    LineageEdge,
    LineageEdges,
    LineageRun,
    ReleaseRegistered,
    RolloutState,
)
from lockgate.errors import InvalidEvent
from lockgate.identity import bundle_content
from lockgate.ids import content_hash, derived_id

LineageEvent = ArtifactRegistered | ReleaseRegistered | LineageRun | EvalCompleted | GateDecided | RolloutState

# How far from the recorder's clock the time a never-bound release's announcement claims may lie. The recorder
# records the binding's own time whatever the claim; a claim this far off is a forged or broken sender, refused
# rather than bound (`register_release` binds before it announces, so no honest announcement is a first sighting).
MAX_CLAIM_SKEW = timedelta(minutes=10)


class Edge(NamedTuple):
    """A directed, labelled edge between two typed nodes."""

    src: str
    src_kind: str
    dst: str
    dst_kind: str
    relation: str


def artifact_kind_of(key: str) -> str:
    """Kind of a release's artifact entry (`kind/name` -> kind); 'artifact' when the key has no kind."""
    kind, sep, _ = key.partition("/")
    return kind if sep and kind else "artifact"


def node_kind_guess(node: str) -> str:
    """Best kind for a node named only by id (run inputs/outputs carry no type)."""
    return "artifact" if node.startswith("sha256:") else "node"


def run_kind(kind: str) -> str:
    """Node kind of a run: 'eval' -> 'eval_run', so an EvalCompleted run id gets the same label."""
    return kind if kind.endswith("run") else f"{kind}_run"


def edges_for(event: LineageEvent) -> list[Edge]:
    """The edges one event adds to the lineage graph."""
    match event:
        case ReleaseRegistered():
            out = [Edge(event.release, "release", h, artifact_kind_of(k), "uses")
                   for k, h in sorted(event.artifacts.items())]
            if event.parent:
                out.append(Edge(event.parent, "release", event.release, "release", "parent_of"))
            return out
        case LineageRun():
            rk = run_kind(event.kind)
            out = [Edge(event.run_id, rk, i, node_kind_guess(i), "used") for i in event.inputs]
            # a run listing itself as an output adds nothing but a self-loop
            out += [Edge(event.run_id, rk, o, node_kind_guess(o), "produced") for o in event.outputs
                    if o != event.run_id]
            if event.release:
                out.append(Edge(event.release, "release", event.run_id, rk, "ran"))
            return out
        case EvalCompleted():
            return [Edge(event.release, "release", event.run_id, "eval_run", "evaluated_by")]
        case GateDecided():
            out = [Edge(event.release, "release", event.id, "decision", "decided")]
            if event.eval_run:
                out.insert(0, Edge(event.eval_run, "eval_run", event.id, "decision", "gated_by"))
            return out
        case RolloutState():
            releases = {r for r in (event.stable_release, event.canary_release) if r}
            return [Edge(r, "release", event.deployment, "deployment", "rolled_out") for r in sorted(releases)]
        case _:
            return []


def edges_fact(event: LineageEvent) -> LineageEdges | None:
    """The edges of one event as the fact the sink stores (None when it adds none); deterministic, so a
    redelivered event republishes the same fact."""
    edges = edges_for(event)
    if not edges:
        return None
    return LineageEdges(id=derived_id("lineage-edges", event.id), event_id=event.id, time=event.time, tenant=event.tenant,
                        source="lineage", trace_id=event.trace_id,
                        edges=[LineageEdge(src=e.src, src_kind=e.src_kind, dst=e.dst, dst_kind=e.dst_kind,
                                           relation=e.relation) for e in edges])


def releases_named(event: LineageEvent) -> list[str]:
    """The releases an event's edges name, whose bindings the recorder records as it meets them."""
    edges = edges_for(event)
    return sorted({e.src for e in edges if e.src_kind == "release"} | {e.dst for e in edges if e.dst_kind == "release"})


def claim_problem(claimed: datetime, now: datetime) -> str | None:
    """Why a first sighting's claimed registration time is refused, or None (a time without a zone is UTC's)."""
    if claimed.tzinfo is None:
        claimed = claimed.replace(tzinfo=UTC)
    if abs(claimed - now) > MAX_CLAIM_SKEW:
        return (f"its time {claimed.isoformat()} is more than {int(MAX_CLAIM_SKEW.total_seconds() // 60)} minutes "
                f"from the recorder's clock ({now.isoformat()}); a registration is recorded at the time it is "
                "bound, not at a time it claims")
    return None


def bound_release(bundle: dict[str, Any], at: datetime, *, description: str = "", trace_id: str = "",
                  span_id: str = "") -> ReleaseRegistered:
    """The `release_bound` fact of a binding: its id is the binding's (`announcement_id`, so every announcement of
    one binding, honest or forged, re-sent or back-dated, is one row and one edge set), its time the binding's, and
    its content the bundle's. Only the description (which no binding holds) and the trace come from an
    announcement. InvalidEvent when the bundle is not a release's (a value put in the bucket by hand)."""
    try:
        artifacts = msgspec.convert(bundle.get("artifacts"), dict[str, str])
        return ReleaseRegistered(
            id=announcement_id(bundle["release"], content_hash(bundle_content(bundle))), time=at,
            release=bundle["release"], app=bundle["app"], tenant=bundle.get("tenant", "default"),
            parent=bundle.get("parent", ""), artifacts=artifacts, description=description,
            trace_id=trace_id, span_id=span_id)
    except (KeyError, TypeError, ValueError, msgspec.ValidationError) as exc:
        raise InvalidEvent(f"the binding of release {bundle.get('release')!r} is not a release bundle: {exc}") from None
