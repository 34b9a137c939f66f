"""Pure lineage logic: which graph edges each event implies."""

from __future__ import annotations

from typing import NamedTuple

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
from lockgate.ids import derived_id

LineageEvent = ArtifactRegistered | ReleaseRegistered | LineageRun | EvalCompleted | GateDecided | RolloutState

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
