"""Artifacts, releases and lineage runs."""

from __future__ import annotations

from typing import Literal, get_args

import msgspec

from lockgate.contracts.bounds import Artifacts, Id, Labels, Short, Signature, Text, check_bounds
from lockgate.contracts.envelope import Event
from lockgate.contracts.names import Name, OptName

ArtifactKind = Literal["dataset", "prompt", "model_config", "tool", "environment", "eval_suite", "policy"]
ARTIFACT_KINDS: tuple[str, ...] = get_args(ArtifactKind)


class ArtifactRegistered(Event, frozen=True, kw_only=True, tag="lockgate.artifact.registered"):
    """An artifact version, addressed by the sha256 of its canonical content."""

    kind: ArtifactKind
    name: Name
    hash: Id
    size: int = 0
    media_type: Short = "application/json"
    labels: Labels = {}
    signature: Signature = ""
    key_id: Id = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bounds(self)


class ReleaseRegistered(Event, frozen=True, kw_only=True, tag="lockgate.release.registered"):
    """A release: a named set of artifact versions (`kind/name` -> hash)."""

    release: Name
    app: Name
    artifacts: Artifacts
    parent: OptName = ""
    description: Text = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bounds(self)


class LineageRun(Event, frozen=True, kw_only=True, tag="lockgate.lineage.run"):
    """A run (eval, gate, rollout) and what it used and produced."""

    run_id: str
    kind: str
    release: str = ""
    inputs: list[str] = []
    outputs: list[str] = []


class LineageEdge(msgspec.Struct, frozen=True, kw_only=True):
    """A directed, labelled edge between two typed nodes of the lineage graph."""

    src: str
    src_kind: str
    dst: str
    dst_kind: str
    relation: str


class LineageEdges(Event, frozen=True, kw_only=True, tag="lockgate.lineage.edges"):
    """The edges one event adds to the lineage graph; `time` is that event's time."""

    event_id: str
    edges: list[LineageEdge]
