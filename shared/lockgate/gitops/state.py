"""The stack's side of GitOps: read the applied state and the release bindings, and carry out a plan.

The applied state lives in KV `{prefix}_gitops`, one entry per resource (`<kind>.<name token>`), with
history, so earlier applies stay visible. Artifacts go to the content-addressed object store and are
announced as `lockgate artifact register` does; releases are bound create-only as `release create`
does (signed by the personal identity when there is one). Deployments and budgets are recorded as
desired state only: apply never moves traffic, since the router admits a release only with a gate
decision that allows it (start a canary with the router's admin API once the gate has decided: `rollout start`
reads a deployment's entry here and sends its `rollout:` as the canary's strategy); `plan`
reads each deployment's live route (routes KV, read-only) to show every field on which it differs from its
document.
Pruning deletes a resource's state entry; the artifact and release stay (content-addressed and
immutable, lineage and audit keep naming them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats.errors
import nats.js.errors

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.codec import to_json
from lockgate.config import Settings
from lockgate.contracts import AppliedChange, ApplyRecorded, ApplyReply, ApplyRequest, StateEntry
from lockgate.errors import BusUnavailable, LockgateError, NotFound, UnreadableValue
from lockgate.gitops.documents import GitopsError
from lockgate.gitops.git import Provenance
from lockgate.gitops.plan import Plan, Serving, normalized
from lockgate.gitops.resolve import ARTIFACT_KIND, Resource
from lockgate.identity import Identity, bundle_content, sign_apply
from lockgate.ids import content_hash
from lockgate.provenance import aliases, chain, lifecycle
from lockgate.retry import RetryPolicy
from lockgate.subjects import token

_entry = msgspec.json.Decoder(StateEntry)
# Told of each alias an apply moved: app, alias, release, the deprecated artifacts found and the messages skipped.
AliasMoved = Callable[[str, str, str, list[lifecycle.Finding], list[chain.Skipped]], Awaitable[None]]
_replies = msgspec.json.Decoder(ApplyReply)


def state_key(kind: str, name: str) -> str:
    """The KV key of a resource's entry (names mapped one-to-one by `token`)."""
    return f"{kind}.{token(name)}"


async def read_state(bus: Bus) -> dict[str, StateEntry]:
    """Every resource the last applies recorded, by `kind/name`."""
    out = {}
    for key, value in (await bus.kv_entries(bus.subjects.kv_gitops)).items():
        if value:
            try:
                state = _entry.decode(value)
            except msgspec.DecodeError as exc:  # never "not applied": plan would show it as a change to make
                raise UnreadableValue(f"applied state {key} in KV {bus.subjects.kv_gitops} is unreadable ({exc}): "
                                      "apply the folder again to rewrite it") from None
            out[state.key] = state
    return out


async def read_entry(bus: Bus, kind: str, name: str) -> StateEntry | None:
    """One resource's entry as the last apply recorded it (`rollout start` reads its deployment's `rollout:`); None
    when no apply recorded it or a prune deleted it. Unreadable: UnreadableValue, never "not applied"."""
    bucket = bus.subjects.kv_gitops
    try:
        entry = await (await bus.kv(bucket)).get(state_key(kind, name))
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.BucketNotFoundError):
        return None
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(f"cannot read {kind} {name!r} from KV {bucket}: {exc!r}") from None
    if not entry.value:
        return None
    try:
        state = _entry.decode(entry.value)
    except msgspec.DecodeError as exc:
        raise UnreadableValue(f"applied state {state_key(kind, name)} in KV {bucket} is unreadable ({exc}): apply "
                              "the folder again to rewrite it") from None
    if state.key != f"{kind}/{name}":  # another resource's entry under this key is not this one's
        raise UnreadableValue(f"applied state {state_key(kind, name)} in KV {bucket} holds {state.key}, not "
                              f"{kind}/{name}: apply the folder again to rewrite it")
    return state


async def read_bindings(bus: Bus, names: list[str]) -> dict[str, str]:
    """The content hash each of these release names is bound to (unbound names are left out)."""
    out = {}
    for name in names:
        try:
            bundle = await artifacts.release_of(bus, name)
        except artifacts.TakenUnbound:
            out[name] = "none: its key binds nothing"  # taken all the same (write-once), by no content
            continue
        except NotFound:
            continue
        out[name] = content_hash(bundle_content(bundle))
    return out


async def read_aliases(bus: Bus, settings: Settings, desired: list[Resource]) -> dict[str, str]:
    """The release each of the folder's aliases points to now (`app/alias` -> release), from its verified
    history; aliases never set are left out."""
    out = {}
    for res in desired:
        if res.kind == "alias":
            current, _, _, _ = await aliases.pointed_at(bus, settings, res.spec["app"], res.spec["alias"])
            if current is not None:
                out[res.name] = current.release
    return out


class _Target(msgspec.Struct, frozen=True):
    release: str
    app: str = ""  # "" in routes the router stored before it recorded the app


class _Strategy(msgspec.Struct, frozen=True):
    steps: list[Any] | None = None  # weights, or step kinds as mappings (router.strategy.Step)
    interval_s: float | None = None
    blue_green: Any = None
    shadow: Any = None


class _Override(msgspec.Struct, frozen=True):
    release: str
    actor: str
    reason: str = ""
    action: str = ""
    weight: float = 100.0


class _Route(msgspec.Struct, frozen=True):
    """What `plan` reads of the router's route record: whose route it is, what its arms serve, where its rollout
    stands and by which strategy, and any break-glass override. Unknown fields stay allowed (a view of a record the
    router evolves); `deployment` and `stable` are required, so JSON that is no route is never read as one."""

    deployment: str
    stable: _Target
    canary: _Target | None = None
    weight: float = 0.0
    phase: str = "idle"
    reason: str = ""
    strategy: _Strategy | None = None
    override: _Override | None = None


def _serving(route: _Route) -> Serving:
    """The route as the plan compares it with a document."""
    s, glass = route.strategy, route.override
    kind = ("" if s is None else "blue_green" if s.blue_green is not None
            else "shadow" if s.shadow is not None and not s.steps else "canary")
    steps: tuple[str, ...] = ()
    if s is not None and s.steps:
        weights = [_weight(step) for step in s.steps]
        # Weights alone run as the router normalises them; a program with pauses or header routes runs as given.
        steps = normalized(weights) if None not in weights else tuple(_step(step) for step in s.steps)
    said = (f"override by {glass.actor} for {glass.release} ({glass.action or 'canary'}"
            f"{f' up to {glass.weight:g}%' if glass.action != 'promote' else ''}): {glass.reason}") if glass else ""
    return Serving(stable=route.stable.release, app=route.stable.app, canary=route.canary.release if route.canary
                   else "", phase=route.phase, weight=route.weight, strategy=kind, steps=steps,
                   interval_s=(s.interval_s or 0.0) if s is not None else 0.0, override=said, reason=route.reason)


def _weight(step: Any) -> float | None:
    """A step's weight: a plain number or a `set_weight` step; None for a pause or a header route."""
    if isinstance(step, int | float) and not isinstance(step, bool):
        return float(step)
    weight = step.get("set_weight") if isinstance(step, dict) else None
    return float(weight) if isinstance(weight, int | float) else None


def _step(step: Any) -> str:
    """One step of a program, as text."""
    weight = _weight(step)
    if weight is not None:
        return f"{weight:g}"
    if isinstance(step, dict) and isinstance(step.get("pause"), dict):
        duration = step["pause"].get("duration_s")
        return f"pause {duration:g}s" if isinstance(duration, int | float) else "pause until approved"
    return "header route" if isinstance(step, dict) and step.get("set_header_route") else "step"


_route = msgspec.json.Decoder(_Route)


async def read_serving(bus: Bus, desired: list[Resource]) -> dict[str, Serving]:
    """What the live route of each of the folder's deployments serves (deployments without a route are left out).

    A route that cannot be read is named so, with why: the plan says it and goes on, it never fails for it."""
    out: dict[str, Serving] = {}
    deployments = [r.name for r in desired if r.kind == "deployment"]
    if not deployments:
        return out
    bucket = bus.subjects.kv_routes
    try:
        kv = await bus.kv(bucket)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        return {name: Serving(unread=f"cannot open KV {bucket}: {exc!r}") for name in deployments}
    for name in deployments:
        try:
            entry = await kv.get(token(name))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            continue  # never started: it serves nothing to compare
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            out[name] = Serving(unread=f"cannot read KV {bucket}: {exc!r}")
            continue
        try:
            route = _route.decode(entry.value or b"")
        except msgspec.DecodeError as exc:
            out[name] = Serving(unread=f"its record in KV {bucket} is unreadable ({exc})")
            continue
        if route.deployment != name:
            out[name] = Serving(unread=f"its key in KV {bucket} holds the route of {route.deployment!r}")
            continue
        out[name] = _serving(route)
    return out


def _labels(res: Resource, prov: Provenance) -> dict[str, str]:
    # On the registration itself, so the artifacts table says which commit brought each version.
    return {**res.labels, "gitops.source": res.source, "git.commit": prov.commit, "git.author": prov.author,
            "git.dirty": str(prov.dirty).lower()}


async def apply(bus: Bus, plan: Plan, desired: list[Resource], prov: Provenance, *, directory: str,
                author: Identity | None = None, settings: Settings | None = None,
                audit_as: str = "operator", timeout_s: float = 30.0, moved: AliasMoved | None = None) -> ApplyRecorded:
    """Have the lineage recorder check the apply's signer, carry out the plan's changes in dependency order, then have
    the recorder record them.

    The recorder is the applied state's only writer: it records each entry, appends an audit row and
    announces the apply. What was carried out before a step failed is recorded all the same, so the next
    plan starts from it. An alias is moved with a record signed by `author` and checked against
    `settings`' trust file, so a folder with aliases needs both; apply refuses before changing anything if
    they are missing. `moved` is called after each alias move with what `aliases.set_alias` warns of."""
    if any(s.kind == "alias" and s.action != "remove" for s in plan.changes) and (author is None or settings is None):
        raise GitopsError("the folder moves aliases, and every alias change is signed: apply with a personal "
                          "identity (`--as NAME`, `lockgate identity create NAME`)")
    by_key = {r.key: r for r in desired}
    who = author.name if author else ""
    done: list[AppliedChange] = []
    entries: list[StateEntry] = []

    def request() -> ApplyRequest:
        unsigned = ApplyRequest(directory=directory, commit=prov.commit, author=prov.author, dirty=prov.dirty,
                                applied_by=who, changes=done, entries=entries, unchanged=plan.count("unchanged"))
        return sign_apply(author, unsigned) if author is not None else unsigned  # the recorder checks who

    if plan.changes:
        # The recorder is asked first, with nothing carried out (it records nothing then): it checks who signs the
        # apply, and that it answers at all, before anything is bound. A release name binds once, so a release bound
        # for an apply the recorder then refused stayed bound, unrecorded (probe p23 F3).
        await _record(bus, request(), audit_as, timeout_s)
    try:
        for step in plan.changes:
            if step.action == "remove":
                done.append(AppliedChange(action="remove", kind=step.kind, name=step.name, previous=step.previous,
                                          release=step.previous_release, source=step.source))
                continue
            res = by_key[f"{step.kind}/{step.name}"]
            await _carry_out(bus, res, prov, author=author, settings=settings, audit_as=audit_as, moved=moved)
            entries.append(StateEntry(kind=res.kind, name=res.name, digest=res.digest, release=res.release,
                                      source=res.source, spec=res.spec, commit=prov.commit, author=prov.author,
                                      dirty=prov.dirty, applied_by=who))
            done.append(AppliedChange(action=step.action, kind=res.kind, name=res.name,  # type: ignore[arg-type]
                                      digest=res.digest, previous=step.previous, release=res.release,
                                      source=res.source))
    except Exception:
        if done:  # what was carried out before the failure is recorded all the same; the failure is what is told
            with contextlib.suppress(LockgateError):
                await _record(bus, request(), audit_as, timeout_s)
        raise
    if not done:  # an apply that changed nothing leaves no trace: it did nothing
        return ApplyRecorded(directory=directory, commit=prov.commit, author=prov.author, dirty=prov.dirty,
                             applied_by=who, unchanged=plan.count("unchanged"))
    return await _record(bus, request(), audit_as, timeout_s)


async def _carry_out(bus: Bus, res: Resource, prov: Provenance, *, author: Identity | None,
                     settings: Settings | None, audit_as: str, moved: AliasMoved | None = None) -> None:
    """Register what one resource needs (deployments and budgets are desired state only: nothing)."""
    if res.kind == "release":
        b = res.bundle
        await artifacts.register_release(bus, res.release, b["app"], b["artifacts"], parent=b["parent"],
                                         description=res.description or f"applied from {res.source}",
                                         tenant=b["tenant"], author=author)
    elif res.kind == "alias":
        assert author is not None and settings is not None
        _, findings, skipped = await aliases.set_alias(
            bus, settings, author, res.spec["app"], res.spec["alias"], res.release,
            reason=res.description or f"applied from {res.source}", origin=f"gitops {prov.commit}".strip(),
            audit_as=audit_as)
        if moved is not None:  # its deprecated artifacts, as `alias set` says them (probe p29 F6: dropped here)
            await moved(res.spec["app"], res.spec["alias"], res.release, findings, skipped)
    elif res.kind in ARTIFACT_KIND:
        await artifacts.register(bus, ARTIFACT_KIND[res.kind], res.name, res.content,  # type: ignore[arg-type]
                                 media_type=res.media_type, labels=_labels(res, prov), signer=author)


# No responders is asked again for a moment before it is believed: a recorder restarting has none for an instant, and
# in a cluster a subscription reaches the other servers after its own has confirmed it. No one received the request,
# so asking again records nothing twice.
_RECORDER_WAIT = RetryPolicy(attempts=5, initial_s=0.1, max_s=1.0)


async def _record(bus: Bus, request: ApplyRequest, identity: str, timeout_s: float) -> ApplyRecorded:
    """Ask the lineage recorder to record the applied state (request/reply as `identity`)."""
    subject = bus.subjects.gitops_apply(identity)
    try:
        msg = await _RECORDER_WAIT.call(lambda: bus.request(subject, to_json(request), timeout_s=timeout_s),
                                        retry_on=nats.errors.NoRespondersError, what="asking the lineage recorder")
    except nats.errors.NoRespondersError:
        done = "what was registered stays" if request.changes else "nothing was registered"
        raise GitopsError("no lineage recorder answers applies (start the stack, or `lockgate serve lineage`): "
                          f"{done}, the applied state is unchanged") from None
    except nats.errors.TimeoutError:
        raise GitopsError(f"the lineage recorder did not record the apply within {timeout_s:g} s: run "
                          "`lockgate plan` to see what it recorded") from None
    except nats.errors.MaxPayloadError:
        raise GitopsError(f"the apply's {len(request.entries)} entries do not fit in one NATS message: apply the "
                          "folder in parts") from None
    reply = _replies.decode(msg.data)
    if reply.recorded is None:
        raise GitopsError(reply.error or "the lineage recorder recorded nothing and said not why")
    return reply.recorded
