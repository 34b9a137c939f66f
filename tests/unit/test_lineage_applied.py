"""What the lineage recorder accepts as an apply (pure: services/lineage/applied.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from lockgate.contracts import AppliedChange, ApplyRequest, StateEntry
from lockgate.ids import content_hash
from lockgate.services.lineage import applied

SPEC = {"app": "shop", "stable": "r1", "canary": "r2", "rollout": {"strategy": "canary", "steps": [10.0, 100.0],
                                                                   "interval_s": 60.0},
        "online_eval": {"sample": {"canary": 1.0}, "scorers": ["json_valid"]}}
DIGEST = content_hash(SPEC)


def _change(action: str = "add", kind: str = "deployment", name: str = "chat", digest: str = DIGEST) -> AppliedChange:
    return AppliedChange(action=action, kind=kind, name=name, digest=digest)  # type: ignore[arg-type]


def _entry(kind: str = "deployment", name: str = "chat", spec: dict | None = None, **kw: object) -> StateEntry:
    spec = SPEC if spec is None else spec
    return StateEntry(kind=kind, name=name, digest=content_hash(spec), spec=spec, **kw)  # type: ignore[arg-type]


def test_an_apply_that_holds_together_is_recorded_with_the_recorders_time() -> None:
    request = ApplyRequest(directory="d", commit="c1", applied_by="ann",
                           changes=[_change(), _change("remove", "prompt", "old", "")],
                           entries=[_entry(commit="c1", applied_by="ann", applied_at="1999-01-01T00:00:00")])
    assert applied.problem(request) is None
    at = datetime(2026, 12, 4, tzinfo=UTC)
    assert applied.stamped(request.entries[0], at).applied_at == at.isoformat()
    event = applied.recorded(request)
    assert (event.directory, event.commit, event.applied_by, event.changes) == ("d", "c1", "ann", request.changes)


@pytest.mark.parametrize(("request_", "why"), [
    (ApplyRequest(directory="d", changes=[_change()], entries=[_entry(), _entry()]), "sent twice"),
    (ApplyRequest(directory="d", changes=[_change(), _change()], entries=[_entry()]), "sent twice"),
    (ApplyRequest(directory="d", changes=[_change(kind="secret")]), "kind 'secret' is none of"),
    (ApplyRequest(directory="d", changes=[_change("remove")], entries=[_entry()]), "removes the resource but"),
    (ApplyRequest(directory="d", changes=[_change("change")]), "sends no entry"),
    (ApplyRequest(directory="d", changes=[_change(digest="sha256:0")], entries=[_entry()]), "is not the change's"),
    (ApplyRequest(directory="d", changes=[_change()], entries=[_entry(dirty=True)]), "Git provenance"),
    (ApplyRequest(directory="d", changes=[_change(digest=content_hash({**SPEC, "app": "a b"}))],
                  entries=[_entry(spec={**SPEC, "app": "a b"})]), "spec:"),
    (ApplyRequest(directory="d", changes=[_change(digest=content_hash({**SPEC, "extra": 1}))],
                  entries=[_entry(spec={**SPEC, "extra": 1})]), "spec:"),
    (ApplyRequest(directory="d", changes=[_change(digest="sha256:1")],
                  entries=[StateEntry(kind="deployment", name="chat", digest="sha256:1", spec=SPEC)]),
     "not the hash of its spec"),
])
def test_an_apply_that_does_not_hold_together_says_what_is_wrong(request_: ApplyRequest, why: str) -> None:
    problem = applied.problem(request_)
    assert problem is not None and why in problem, problem
