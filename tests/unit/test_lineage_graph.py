"""Lineage edges per event, and the pure breadth-first traversal (cycles, depth, direction)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from lockgate.contracts import EvalCompleted, GateDecided, LineageRun, ReleaseRegistered, RolloutState
from lockgate.services.lineage.domain import Edge, edges_for
from lockgate.services.query.lineage import traverse

pytestmark = pytest.mark.timeout(30)


def _graph(edges: list[tuple[str, str, str]]):
    rows = [{"src": s, "relation": r, "dst": d} for s, r, d in edges]
    calls: list[set[str]] = []

    def neighbours(nodes: set[str]) -> Iterable[dict]:
        calls.append(set(nodes))
        return [e for e in rows if e["src"] in nodes or e["dst"] in nodes]

    return neighbours, calls


CHAIN = [
    ("rel-1", "uses", "sha256:aa"),
    ("rel-1", "evaluated_by", "run-1"),
    ("run-1", "gated_by", "dec-1"),
    ("rel-1", "decided", "dec-1"),
    ("rel-1", "rolled_out", "checkout"),
    ("build-1", "produced", "sha256:aa"),
    ("build-1", "used", "sha256:raw"),
]


def test_upstream_follows_dependencies_and_producers() -> None:
    nb, _ = _graph(CHAIN)
    up = traverse("rel-1", 4, nb, "upstream")
    assert [(e["src"], e["relation"], e["dst"], e["depth"]) for e in up] == [
        ("rel-1", "uses", "sha256:aa", 1),
        ("build-1", "produced", "sha256:aa", 2),
        ("build-1", "used", "sha256:raw", 3),
    ]


def test_downstream_follows_effects() -> None:
    nb, _ = _graph(CHAIN)
    down = {(e["src"], e["relation"], e["dst"], e["depth"]) for e in traverse("rel-1", 4, nb, "downstream")}
    assert down == {
        ("rel-1", "decided", "dec-1", 1),
        ("rel-1", "evaluated_by", "run-1", 1),
        ("rel-1", "rolled_out", "checkout", 1),
        ("run-1", "gated_by", "dec-1", 2),
    }
    up_from_decision = traverse("dec-1", 4, nb, "upstream")
    assert {e["src"] for e in up_from_decision} >= {"rel-1", "run-1", "build-1"}


def test_depth_limits_the_walk() -> None:
    nb, calls = _graph(CHAIN)
    assert [e["depth"] for e in traverse("rel-1", 1, nb, "upstream")] == [1]
    assert traverse("rel-1", 0, nb, "upstream") == []
    assert len(calls) == 1


def test_cycles_terminate_and_each_edge_appears_once() -> None:
    nb, calls = _graph([("a", "parent_of", "b"), ("b", "parent_of", "c"), ("c", "parent_of", "a")])
    down = traverse("a", 10, nb, "downstream")
    assert [(e["src"], e["dst"], e["depth"]) for e in down] == [("a", "b", 1), ("b", "c", 2), ("c", "a", 3)]
    assert len(calls) == 3  # the walk stopped once every node was visited


def test_unknown_node_has_no_edges() -> None:
    nb, _ = _graph(CHAIN)
    assert traverse("nope", 4, nb, "downstream") == []


def test_edges_for_each_event_type() -> None:
    rel = ReleaseRegistered(release="r2", app="shop", artifacts={"prompt/greet": "sha256:p", "dataset/qa": "sha256:d"},
                            parent="r1")
    assert edges_for(rel) == [
        Edge("r2", "release", "sha256:d", "dataset", "uses"),
        Edge("r2", "release", "sha256:p", "prompt", "uses"),
        Edge("r1", "release", "r2", "release", "parent_of"),
    ]
    run = LineageRun(run_id="b1", kind="build", inputs=["sha256:x"], outputs=["sha256:y"])
    assert [(e.src_kind, e.relation, e.dst) for e in edges_for(run)] == [
        ("build_run", "used", "sha256:x"), ("build_run", "produced", "sha256:y")]
    ev = EvalCompleted(run_id="e1", release="r2", suite="sha256:s")
    assert edges_for(ev) == [Edge("r2", "release", "e1", "eval_run", "evaluated_by")]
    gate = GateDecided(release="r2", decision="PASS", rules=[], eval_run="e1")
    assert edges_for(gate) == [Edge("e1", "eval_run", gate.id, "decision", "gated_by"),
                               Edge("r2", "release", gate.id, "decision", "decided")]
    assert edges_for(GateDecided(release="r2", decision="BLOCK", rules=[]))[0].relation == "decided"
    roll = RolloutState(deployment="checkout", stable_release="r1", canary_release="r2", canary_weight=10)
    assert [(e.src, e.dst) for e in edges_for(roll)] == [("r1", "checkout"), ("r2", "checkout")]
