"""Pure checks of an apply the lineage recorder is asked to record (no I/O, unit-tested).

The recorder is the applied state's only writer, so what it accepts is what the evaluator (a
deployment's `online_eval`) and the next `plan` read: each change must come with its entry, every
entry must carry the request's provenance, and a deployment's spec must be one the folder could have
produced (its digest the hash of its spec, its `online_eval` one the evaluator can use)."""

from __future__ import annotations

from datetime import datetime

import msgspec

from lockgate.contracts import ApplyRecorded, ApplyRequest, StateEntry
from lockgate.contracts.names import Name, OptName, check_names
from lockgate.gitops.documents import ORDER, Rollout
from lockgate.ids import content_hash
from lockgate.onlineeval import OnlineEvalSpec


class DeploymentSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A deployment's resolved spec, as `lockgate.gitops.resolve` writes it."""

    app: Name
    stable: Name
    canary: OptName = ""
    rollout: Rollout = Rollout()
    online_eval: OnlineEvalSpec | None = None

    def __post_init__(self) -> None:
        check_names(self)


def problem(request: ApplyRequest) -> str | None:
    """Why the request cannot be recorded as it stands, or None."""
    entries: dict[str, StateEntry] = {}
    for entry in request.entries:
        if entry.key in entries:
            return f"entry {entry.key} is sent twice"
        entries[entry.key] = entry
    changed: set[str] = set()
    for change in request.changes:
        key = f"{change.kind}/{change.name}"
        if change.kind not in ORDER:
            return f"change {key}: kind {change.kind!r} is none of {', '.join(ORDER)}"
        if key in changed:
            return f"change {key} is sent twice"
        changed.add(key)
        entry = entries.get(key)
        if change.action == "remove":
            if entry is not None:
                return f"change {key} removes the resource but sends an entry for it"
            continue
        if entry is None:
            return f"change {key} ({change.action}) sends no entry"
        if entry.digest != change.digest:
            return f"entry {key}: digest {entry.digest} is not the change's {change.digest}"
        if (entry.commit, entry.author, entry.dirty, entry.applied_by) != (
                request.commit, request.author, request.dirty, request.applied_by):
            return f"entry {key}: its Git provenance or author is not the apply's"
        if entry.kind == "deployment":
            why = _deployment_problem(entry)
            if why:
                return f"entry {key}: {why}"
    extra = sorted(set(entries) - changed)
    if extra:
        return f"entries {', '.join(extra)} belong to no change"
    return None


def _deployment_problem(entry: StateEntry) -> str | None:
    try:
        msgspec.convert(entry.spec, DeploymentSpec)
    except msgspec.ValidationError as exc:
        return f"spec: {exc}"
    if content_hash(entry.spec) != entry.digest:
        return f"digest {entry.digest} is not the hash of its spec"
    return None


def stamped(entry: StateEntry, at: datetime) -> StateEntry:
    """The entry as recorded: applied at the recorder's time, not the sender's."""
    return msgspec.structs.replace(entry, applied_at=at.isoformat())


def changes_digest(request: ApplyRequest) -> str:
    """The content hash of an apply's whole change list, as its audit row states it."""
    return content_hash(msgspec.to_builtins(request.changes))


def recorded(request: ApplyRequest) -> ApplyRecorded:
    """The announcement of an apply once its entries are recorded."""
    return ApplyRecorded(directory=request.directory, commit=request.commit, author=request.author,
                         dirty=request.dirty, applied_by=request.applied_by, changes=request.changes,
                         unchanged=request.unchanged)
