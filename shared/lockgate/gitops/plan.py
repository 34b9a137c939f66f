"""The plan: desired resources against the applied state -> what apply would add, change, leave or
remove (pure: no I/O, unit-tested).

The applied state is what earlier applies recorded (one entry per `kind/name`). A resource whose
content hash equals its entry's is unchanged, so applying the same folder twice changes nothing. A
release name already bound to other content is an error, not a change: releases are immutable.
Entries no longer in the folder are `orphan` (kept) unless pruning, when they are `remove`.
An alias moved outside Git (`lockgate alias set`) has drifted: the live alias names another release than
the folder, so the plan changes it back (a `change` with `drift` set), whatever the applied state says.
A deployment whose live route (the router's record) serves another app, or another stable release than its
document's stable or (promoted) canary, has drifted too (`rollout start` outside Git): its step keeps its action and has `drift` set, since apply never moves
traffic; the plan exits 2 all the same, so a CI check "the plan is clean" fails until the two agree.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from lockgate.contracts.gitops import StateEntry
from lockgate.gitops.documents import ORDER
from lockgate.gitops.resolve import Resource

Action = Literal["add", "change", "unchanged", "remove", "orphan"]
CHANGES = ("add", "change", "remove")


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One line of the plan."""

    action: Action
    kind: str
    name: str
    digest: str = ""
    previous: str = ""
    release: str = ""
    previous_release: str = ""
    source: str = ""
    commit: str = ""  # for unchanged, orphan and remove: the commit that applied the current entry
    dirty: bool = False
    # An alias whose live release (previous_release) is not the folder's (release), or a deployment whose live route
    # serves another stable release (previous_release; release: the folder's) or app (live_app; app: the folder's).
    drift: bool = False
    app: str = ""
    live_app: str = ""
    unread: str = ""  # a deployment's: why its live route could not be read (compared with nothing)


class Serving(msgspec.Struct, frozen=True, kw_only=True):
    """What a deployment's live route serves, from the router's record, or why it could not be read (`unread`)."""

    stable: str = ""
    app: str = ""  # "" in routes the router stored before it recorded the app
    unread: str = ""


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """Every step, and the errors that stop an apply (release conflicts)."""

    steps: list[Step]
    errors: list[str] = []

    def count(self, action: Action) -> int:
        """How many steps have this action."""
        return sum(1 for s in self.steps if s.action == action)

    @property
    def changes(self) -> list[Step]:
        """The steps apply would carry out."""
        return [s for s in self.steps if s.action in CHANGES]

    @property
    def exit_code(self) -> int:
        """For CI: 1 errors, 2 changes planned or drift, 0 nothing to do."""
        return 1 if self.errors else 2 if self.changes or any(s.drift for s in self.steps) else 0


def _rank(kind: str) -> int:
    return ORDER.index(kind) if kind in ORDER else len(ORDER)


def diff(desired: list[Resource], state: dict[str, StateEntry], bound: dict[str, str], *,
         prune: bool = False, live: dict[str, str] | None = None,
         serving: dict[str, Serving] | None = None) -> Plan:
    """The plan from the desired resources, the applied state (by `kind/name`), the content hash each
    desired release name is already bound to (absent: not bound), the release each alias points to
    now (`app/alias` -> release; absent: never set) and what each deployment's live route serves
    (by deployment name; absent: it has none)."""
    live, serving = live or {}, serving or {}
    steps: list[Step] = []
    errors: list[str] = _parent_errors(desired, bound)
    for res in desired:
        if res.kind == "release" and res.release in bound and bound[res.release] != res.digest:
            errors.append(_conflict(res, bound[res.release]))
            continue
        entry = state.get(res.key)
        if entry is None:
            action: Action = "add"
        elif entry.digest == res.digest:
            action = "unchanged"
        else:
            action = "change"
        if res.kind == "alias" and action == "unchanged" and live.get(res.name, res.release) != res.release:
            steps.append(Step(action="change", kind=res.kind, name=res.name, digest=res.digest, previous=entry.digest,
                              release=res.release, previous_release=live[res.name], source=res.source, drift=True))
            continue
        step = Step(action=action, kind=res.kind, name=res.name, digest=res.digest,
                    previous=entry.digest if entry and action == "change" else "", release=res.release,
                    previous_release=entry.release if entry and action == "change" else "",
                    source=res.source, commit=entry.commit if entry and action == "unchanged" else "",
                    dirty=entry.dirty if entry and action == "unchanged" else False)
        steps.append(_serving(step, res, serving[res.name]) if res.kind == "deployment" and res.name in serving
                     else step)
    wanted = {r.key for r in desired}
    for key, entry in sorted(state.items()):
        if key not in wanted:
            steps.append(Step(action="remove" if prune else "orphan", kind=entry.kind, name=entry.name,
                              previous=entry.digest, previous_release=entry.release, source=entry.source,
                              commit=entry.commit, dirty=entry.dirty))
    generation = _generations(desired)
    steps.sort(key=lambda s: (_rank(s.kind), generation.get(s.release, 0) if s.kind == "release" else 0, s.name))
    return Plan(steps=steps, errors=errors)


def _serving(step: Step, res: Resource, now: Serving) -> Step:
    """A deployment's step with what its live route serves: drift when the app or stable release is not the
    folder's (an app the router did not record is not compared). The folder's canary, promoted, serves as stable
    what the folder asked to roll out: no drift."""
    if now.unread:
        return msgspec.structs.replace(step, unread=now.unread)
    app, stable = res.spec["app"], res.spec["stable"]
    if now.stable in (stable, res.spec["canary"] or stable) and now.app in ("", app):
        return step
    return msgspec.structs.replace(step, drift=True, release=stable, previous_release=now.stable, app=app,
                                   live_app=now.app)


def _conflict(res: Resource, bound: str) -> str:
    """Why a release of the folder cannot be bound: its name is bound to other content (`bound`)."""
    if res.pinned:
        return (f"document {res.source}: release {res.release!r} is already bound to other content (bundle {bound}, "
                f"the folder's is {res.digest}); releases are immutable: give the change a new `release:` name, or "
                "drop `release:` to name versions by content - at `$.release`")
    # A line's name derives from its `name:` and its content, so there is no `release:` to rename: the name was
    # bound by a registration made before such names were kept for their line's content, or to a content whose
    # 12 hex happen to agree.
    return (f"document {res.source}: release line {res.name!r} names its content {res.release!r}, a name already "
            f"bound to other content (bundle {bound}, the line's is {res.digest}); releases are immutable, so the "
            "line cannot bind it: pin this content to a name of its own with `release:`, or rename the line "
            "- at `$.name`")


def _parent_errors(desired: list[Resource], bound: dict[str, str]) -> list[str]:
    """A release's parent must be bound already or be another release of the folder (applied before it); a
    parent naming a release document was resolved to its release already (resolve.py)."""
    parents = {r.release: r.bundle.get("parent", "") for r in desired if r.kind == "release"}
    errors = []
    for res in desired:
        parent = parents.get(res.release, "") if res.kind == "release" else ""
        if not parent or res.release in bound:
            continue
        if parent not in bound and parent not in parents:
            errors.append(f"document {res.source}: parent {parent!r} is neither a release document of the folder "
                          f"(by its `name:`), the `release:` of one, nor a registered release - at `$.parent`")
            continue
        seen = [res.release]
        while parent in parents and parent not in bound and parent not in seen:
            seen.append(parent)
            parent = parents[parent]
        if parent == res.release:
            errors.append(f"document {res.source}: the parents of release {res.release!r} form a cycle "
                          f"({' -> '.join([*seen, parent])}) - at `$.parent`")
    return errors


def _generations(desired: list[Resource]) -> dict[str, int]:
    """How many of the folder's releases stand above each release in its parent chain, so parents bind first."""
    parents = {r.release: r.bundle.get("parent", "") for r in desired if r.kind == "release"}
    out = {}
    for release in parents:
        seen, parent = {release}, parents[release]
        while parent in parents and parent not in seen:
            seen.add(parent)
            parent = parents[parent]
        out[release] = len(seen) - 1
    return out
