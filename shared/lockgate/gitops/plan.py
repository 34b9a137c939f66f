"""The plan: desired resources against the applied state -> what apply would add, change, leave or
remove (pure: no I/O, unit-tested).

The applied state is what earlier applies recorded (one entry per `kind/name`). A resource whose
content hash equals its entry's is unchanged, so applying the same folder twice changes nothing. A
release name already bound to other content is an error, not a change: releases are immutable.
Entries no longer in the folder are `orphan` (kept) unless pruning, when they are `remove`.
An alias moved outside Git (`lockgate alias set`) has drifted: the live alias names another release than
the folder, so the plan changes it back (a `change` with `drift` set), whatever the applied state says.
A deployment whose live route (the router's record) differs from its document on any field both hold has drifted
too (`rollout start`, `set-weight`, `abort`, `promote`, a PATCH or a break-glass override outside Git): its step
keeps its action, has `drift` set and lists each `Difference` (field, live value, the folder's), since apply never
moves traffic; the plan exits 2 all the same, so a CI check "the plan is clean" fails until the two agree. The
rollout of the document's own canary stepping through the document's steps is the rollout working, not drift.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from lockgate.contracts.gitops import StateEntry
from lockgate.gitops.documents import ORDER
from lockgate.gitops.resolve import Resource

Action = Literal["add", "change", "unchanged", "remove", "orphan"]
CHANGES = ("add", "change", "remove")


class Difference(msgspec.Struct, frozen=True, kw_only=True):
    """One field on which a deployment's live route differs from its document: the live value and the folder's."""

    field: str
    live: str
    folder: str


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
    # differs from its document (`differences`; its stable release in previous_release, release: the folder's, and
    # its app in live_app, app: the folder's).
    drift: bool = False
    app: str = ""
    live_app: str = ""
    unread: str = ""  # a deployment's: why its live route could not be read (compared with nothing)
    differences: list[Difference] = []


class Serving(msgspec.Struct, frozen=True, kw_only=True):
    """What a deployment's live route holds, from the router's record, or why it could not be read (`unread`)."""

    stable: str = ""
    app: str = ""  # "" in routes the router stored before it recorded the app
    unread: str = ""
    canary: str = ""  # the release in the route's canary slot ("" none), live or finished as `phase` says
    phase: str = ""  # idle, progressing, promoted, aborted
    weight: float = 0.0
    # The route's own strategy: its kind (canary, blue_green, shadow), steps as text ("10", "pause 60s") and interval;
    # "", () and 0 where it has none of its own (the router's configured steps and interval run it then).
    strategy: str = ""
    steps: tuple[str, ...] = ()
    interval_s: float = 0.0
    override: str = ""  # a break-glass override in force, said ("" none)
    reason: str = ""  # the router's account of the route's last change


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
    """A deployment's step with what its live route holds: drift, naming every field that differs from the
    document (`differences`); none when the route is the document's, or its rollout under way."""
    if now.unread:
        return msgspec.structs.replace(step, unread=now.unread)
    found = differences(res.spec, now)
    if not found:
        return step
    return msgspec.structs.replace(step, drift=True, release=res.spec["stable"], previous_release=now.stable,
                                   app=res.spec["app"], live_app=now.app, differences=found)


def differences(spec: dict[str, Any], now: Serving) -> list[Difference]:
    """Every field on which a live route differs from a deployment document's resolved spec, in document order.

    The document asks for its stable release to serve and, when it names a canary, for that canary to be rolled out
    from it by the document's `rollout:`. So its canary serving as stable (promoted by its steps) is no drift, nor is
    a live rollout of it whose weight moves along the document's steps: that is the rollout working. A canary the
    document does not name, one aborted or promoted by hand, or a rollout on other steps, interval, strategy or
    weight is drift, as is any break-glass override (no document declares one). A route with no strategy of its own
    runs the router's configured steps and interval, which the route does not hold: they are not compared."""
    app, stable, canary, rollout = spec["app"], spec["stable"], spec["canary"], spec["rollout"]
    out = []
    if now.app not in ("", app):  # an app the router did not record is not compared
        out.append(Difference(field="app", live=now.app, folder=app))
    if now.stable not in (stable, canary or stable):
        out.append(Difference(field="stable", live=now.stable, folder=stable))
    live = bool(now.canary) and now.phase in ("idle", "progressing")
    if live and now.canary != canary:
        out.append(Difference(field="canary", live=f"{now.canary} ({now.phase} at {now.weight:g}%)",
                              folder=canary or "none"))
    elif live:
        out += _rollout(rollout, now)
    elif canary and now.canary == canary and now.phase == "aborted" and now.stable != canary:
        # Whoever aborted it (an operator, the gate, the analysis), the document still asks for it rolled out.
        out.append(Difference(field="canary", live=f"{canary} aborted: {now.reason}", folder=f"{canary} rolled out"))
    elif (canary and now.stable == canary and now.phase == "promoted" and rollout["strategy"] == "canary"
          and now.reason.startswith(tuple(f"promoted {canary}: {by}" for by in BY_HAND))):
        # A canary's steps promote it on their own; a blue-green preview or a shadow-only rollout is promoted by
        # hand by design. Only the route's reason says who promoted it (the router writes BY_HAND's prefixes).
        out.append(Difference(field="canary", live=f"{canary} promoted by hand: {now.reason}",
                              folder=f"{canary} promoted by its steps"))
    if now.override:
        out.append(Difference(field="break-glass", live=now.override, folder="none"))
    return out


# How the router's reason for a promotion by a person begins (domain.manual_promote: an operator, an admin's
# break-glass); its automatic promotions say what promoted them instead (a step, a decision, an analysis).
BY_HAND = ("by operator", "BREAK-GLASS by ")


def _rollout(rollout: dict[str, Any], now: Serving) -> list[Difference]:
    """How a live rollout of the document's canary differs from the document's `rollout:`."""
    if not now.strategy:  # the router's configured steps and interval: the route holds none to compare
        return []
    if now.strategy != rollout["strategy"]:  # steps of one kind say nothing of another's
        return [Difference(field="strategy", live=now.strategy, folder=rollout["strategy"])]
    out = []
    steps = normalized(rollout["steps"])
    if rollout["strategy"] == "canary" and now.steps and now.steps != steps:
        out.append(Difference(field="steps", live=", ".join(now.steps), folder=", ".join(steps)))
    elif rollout["strategy"] == "canary" and now.steps and f"{now.weight:g}" not in ("0", *steps):
        out.append(Difference(field="weight", live=f"{now.weight:g}%", folder=f"0% or a step: {', '.join(steps)}"))
    if now.interval_s and now.interval_s != rollout["interval_s"]:
        out.append(Difference(field="interval_s", live=f"{now.interval_s:g}", folder=f"{rollout['interval_s']:g}"))
    return out


def normalized(weights: list[float] | tuple[float, ...]) -> tuple[str, ...]:
    """Canary weights as the router runs them (sorted, distinct, ending at 100), as text."""
    from lockgate.services.router.domain import normalize_steps  # the router's own rule, not a copy of it

    return tuple(f"{w:g}" for w in normalize_steps(weights))


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
