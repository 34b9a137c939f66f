"""Lineage: where a release, artifact, run or decision came from and what followed from it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Literal

from lockgate.errors import AmbiguousReference, NotFound
from lockgate.services.query.registry import Limit
from lockgate.store import Store

# Edges point from consumer to dependency for these relations (release -uses-> artifact),
# and from cause to effect for every other one (release -evaluated_by-> run).
DEPENDS_ON = frozenset({"uses", "used"})
MAX_DEPTH = 16

Direction = Literal["upstream", "downstream"]
Neighbours = Callable[[set[str]], Iterable[Mapping[str, Any]]]

__all__ = ["AmbiguousReference", "lineage", "orient", "resolve", "traverse"]


def orient(edge: Mapping[str, Any]) -> tuple[str, str]:
    """(upstream node, downstream node) of an edge, whatever way it was recorded."""
    if edge["relation"] in DEPENDS_ON:
        return edge["dst"], edge["src"]
    return edge["src"], edge["dst"]


def traverse(start: str, depth: int, neighbours: Neighbours, direction: Direction) -> list[dict[str, Any]]:
    """Breadth-first walk from `start` up to `depth` hops; each edge once, cycles stop at visited nodes."""
    seen_nodes = {start}
    seen_edges: set[tuple[str, str, str]] = set()
    frontier = {start}
    out: list[dict[str, Any]] = []
    for level in range(1, max(0, depth) + 1):
        if not frontier:
            break
        nxt: set[str] = set()
        for edge in neighbours(frontier):
            up, down = orient(edge)
            here, there = (down, up) if direction == "upstream" else (up, down)
            key = (edge["src"], edge["relation"], edge["dst"])
            if here not in frontier or key in seen_edges:
                continue
            seen_edges.add(key)
            out.append({"src": edge["src"], "src_kind": edge.get("src_kind", ""), "relation": edge["relation"],
                        "dst": edge["dst"], "dst_kind": edge.get("dst_kind", ""), "depth": level})
            if there not in seen_nodes:
                seen_nodes.add(there)
                nxt.add(there)
        frontier = nxt
    out.sort(key=lambda e: (e["depth"], e["relation"], e["src"], e["dst"]))
    return out


def _edges_touching(store: Store, at: datetime | None = None) -> Neighbours:
    # An edge exists from the time of the event that implied it: as of `at`, later ones did not yet.
    cond = " AND time <= {at:DateTime64(6, 'UTC')}" if at is not None else ""

    def fetch(nodes: set[str]) -> list[dict[str, Any]]:
        return store.rows(
            "SELECT DISTINCT src, src_kind, dst, dst_kind, relation FROM lineage_edges "
            f"WHERE (src IN {{n:Array(String)}} OR dst IN {{n:Array(String)}}){cond}",
            {"n": sorted(nodes), "at": at},
        )

    return fetch


def resolve(store: Store, ref: str) -> tuple[str, str]:
    """(node id, kind) for a release name, artifact hash or unique hash prefix, run id or decision id."""
    kind = store.scalar("SELECT any(kind) FROM artifacts WHERE hash = {r:String}", {"r": ref})
    if kind:
        return ref, kind
    if store.scalar("SELECT count() FROM releases WHERE release = {r:String}", {"r": ref}):
        return ref, "release"
    row = store.rows(
        "SELECT if(src = {r:String}, src_kind, dst_kind) AS kind FROM lineage_edges "
        "WHERE src = {r:String} OR dst = {r:String} LIMIT 1",
        {"r": ref},
    )
    if row:
        return ref, row[0]["kind"]
    prefix = ref if ref.startswith("sha256:") else f"sha256:{ref}"
    if prefix == "sha256:":  # no digit of a hash: a prefix of every one, which names nothing
        raise NotFound(f"nothing in the lineage graph is named {ref!r}: give a release, an artifact hash (or its "
                       "first digits), a run or a decision id")
    matches = store.rows(
        "SELECT DISTINCT hash, kind FROM ("
        " SELECT hash, kind FROM artifacts WHERE startsWith(hash, {p:String})"
        " UNION ALL SELECT dst AS hash, dst_kind AS kind FROM lineage_edges WHERE startsWith(dst, {p:String})"
        ") ORDER BY hash LIMIT 20",
        {"p": prefix},
    )
    hashes = sorted({m["hash"] for m in matches})
    if len(hashes) > 1:
        raise AmbiguousReference(f"{ref!r} matches {len(hashes)} artifacts ({', '.join(hashes[:3])}, ...); "
                                 "give more of the hash")
    if not hashes:
        raise NotFound(f"nothing in the lineage graph is named {ref!r} (release, artifact hash, run or decision id)")
    # Prefer the artifacts table's kind over an edge label.
    kinds = [m["kind"] for m in matches if m["kind"] not in ("artifact", "node")]
    return hashes[0], (kinds[0] if kinds else matches[0]["kind"])


def _intervals(stored: str) -> dict[str, Any]:
    """A row's `intervals` (JSON text: metric -> {estimate, low, high, confidence, method, n}); {} for a row
    stored before migration 022, or text that is no such object."""
    try:
        found = json.loads(stored) if stored else {}
    except ValueError:
        return {}
    return {k: v for k, v in found.items() if isinstance(v, dict)} if isinstance(found, dict) else {}


def outcomes(store: Store, digest: str, at: datetime | None = None, limit: Limit = 200) -> list[dict[str, Any]]:
    """Every eval run that used an artifact version (as suite or dataset input, or through its release), with
    its metrics, their intervals and the gate's decision on it, newest first: data versions mapped to outcomes."""
    cond = " AND e.time <= {at:DateTime64(6, 'UTC')}" if at is not None else ""
    rows = store.rows(
        "SELECT e.run_id AS run_id, e.release AS release, e.status AS status, e.metrics AS metrics, "
        " e.intervals AS intervals, e.time AS time, d.decision AS decision, d.id AS decision_id "
        "FROM (SELECT * FROM eval_runs ORDER BY time DESC LIMIT 1 BY run_id) AS e "
        "LEFT JOIN (SELECT eval_run, argMax(decision, time) AS decision, argMax(id, time) AS id FROM gate_decisions "
        "           WHERE eval_run != '' GROUP BY eval_run) AS d ON d.eval_run = e.run_id "
        "WHERE (e.run_id IN (SELECT run_id FROM lineage_runs WHERE has(inputs, {h:String})) "
        "   OR e.suite = {h:String} "
        "   OR e.release IN (SELECT release FROM releases WHERE has(mapValues(artifacts), {h:String})))"
        f"{cond} ORDER BY e.time DESC LIMIT {{n:UInt32}}",
        {"h": digest, "at": at, "n": max(1, int(limit))},
    )
    return [{**r, "intervals": _intervals(r["intervals"])} for r in rows]


def lineage(store: Store, ref: str, depth: int = 4, at: datetime | None = None) -> dict[str, Any]:
    """The node named by `ref` with its upstream and downstream edges up to `depth` hops; with `at`, the
    graph as it was then (only edges recorded at or before it)."""
    node, kind = resolve(store, ref)
    depth = min(max(depth, 0), MAX_DEPTH)
    neighbours = _edges_touching(store, at)
    return {
        "node": node,
        "kind": kind,
        "at": at,
        "outcomes": outcomes(store, node, at) if node.startswith("sha256:") else [],
        "upstream": traverse(node, depth, neighbours, "upstream"),
        "downstream": traverse(node, depth, neighbours, "downstream"),
    }
