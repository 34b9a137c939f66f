"""Content-addressed artifacts: bytes in the NATS object store, announced on the bus."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.js.errors

from lockgate import documents
from lockgate.bus import Bus
from lockgate.contracts import ArtifactKind, ArtifactRegistered, ReleaseRegistered
from lockgate.contracts.artifacts import ARTIFACT_KINDS
from lockgate.contracts.names import NAME_RULE, check_name, is_name
from lockgate.credentials import NotAllowed
from lockgate.errors import ArtifactCorrupt, BusUnavailable, ConfigError, NotFound, ReleaseConflict
from lockgate.identity import Identity, bundle_content, sign_bundle
from lockgate.ids import canonical_json, content_hash, derived_id
from lockgate.subjects import token

_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_MEDIA = {".json": "application/json", ".jsonl": "application/jsonl", ".yaml": "application/yaml",
          ".yml": "application/yaml", ".txt": "text/plain", ".md": "text/markdown"}


def canonical_bytes(content: bytes | str | dict | list, media_type: str) -> bytes:
    """Canonical form for hashing: structured content is re-encoded with sorted keys. ConfigError for structured
    content holding a number JSON cannot carry (`_carried`)."""
    if isinstance(content, dict | list):
        return _carried(content, "artifact")
    raw = content.encode() if isinstance(content, str) else content
    if media_type in ("application/json", "application/yaml"):
        where = f"artifact ({media_type})"
        return _carried(documents.parse(raw, "json" if media_type == "application/json" else "yaml", where=where),
                        where)
    if media_type == "application/jsonl":
        return _canonical_jsonl(raw)
    return raw


def _canonical_jsonl(raw: bytes) -> bytes:
    """One canonical JSON value per line, ending in a newline (which tells a one-line JSONL from JSON)."""
    text = documents.parse(raw, "text", where="artifact is not valid application/jsonl")
    lines = []
    for number, ln in enumerate(text.splitlines(), 1):
        if not ln.strip():
            continue
        where = f"artifact is not valid application/jsonl: line {number}"
        lines.append(_carried(documents.parse(ln, "json", where=where), where))
    return b"\n".join(lines) + b"\n"


def _carried(value: Any, where: str) -> bytes:
    """`value`'s canonical JSON, or ConfigError naming the path of a float it holds that JSON cannot carry.

    Python's JSON and YAML readers take `1e999`, `Infinity`, `.inf` and `NaN` for floats JSON has no form for, and
    canonical JSON writes them `null`: the content hashed and stored would silently say other than the file (probe
    p68 F1), and read back (`parse`) they are refused."""
    stack: list[tuple[Any, str]] = [(value, "$")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"{where}: {node} is no number JSON can carry (only finite ones) - at `{path}`")
        if isinstance(node, dict):
            stack.extend((v, f"{path}.{k}") for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node))
    return canonical_json(value)


def parse(data: bytes, media_type: str) -> Any:
    """Decode stored artifact bytes (canonical JSON for structured kinds); ValueError (msgspec.DecodeError) for bytes
    that are not JSON, or hold a number past a float's range (`1e999`) or `Infinity`/`NaN`, which are not JSON."""
    if media_type in ("application/json", "application/yaml"):
        return _json(data)
    if media_type == "application/jsonl":
        return [_json(ln) for ln in data.splitlines() if ln.strip()]
    return data.decode()


def _json(data: bytes) -> Any:
    # By msgspec, never `json.loads`: that reads `1e999` and `Infinity` as inf, which canonical JSON writes as null.
    # A file of another suffix is stored as its bytes, and a policy's infinite margin read from it made a decision
    # whose threshold no reader could decode (probe p68 F1).
    return msgspec.json.decode(data)


def signed_bytes(event: ArtifactRegistered) -> bytes:
    """What an artifact's registrant signs: its kind, name, content hash, size, media type and tenant."""
    return canonical_json({"kind": event.kind, "name": event.name, "hash": event.hash, "size": event.size,
                           "media_type": event.media_type, "tenant": event.tenant})


async def register(
    bus: Bus,
    kind: ArtifactKind,
    name: str,
    content: bytes | str | dict | list,
    *,
    media_type: str = "application/json",
    tenant: str = "default",
    labels: dict[str, str] | None = None,
    signer: Identity | None = None,
    once: bool = False,
) -> ArtifactRegistered:
    """Store the canonical bytes under their sha256 and publish `artifact.registered` (signed by `signer`,
    a personal identity, when given: `signature` and `key_id` then say who vouched for this version).

    `once`: for content registered each time it is used (an eval run's environment), the event's id derives from
    the tenant, kind, name and hash, so every registration after the first is the same event, stored once."""
    if not is_name(name):
        raise ConfigError(f"invalid artifact name {name!r}: {NAME_RULE}")
    data = canonical_bytes(content, media_type)
    digest = content_hash(data)
    # Put unless the store holds these very bytes under the hash, read back (`Bus.holds`), so registering the
    # content again repairs whatever else is there; never purges (`Bus.put_object`): replaced chunks stay, unread.
    await bus.put_unless_held(bus.subjects.object_store, digest, data)
    stored_type = "application/json" if media_type == "application/yaml" else media_type
    fixed = {"id": derived_id("artifact", tenant, kind, name, digest)} if once else {}
    event = ArtifactRegistered(
        kind=kind, name=name, hash=digest, size=len(data), media_type=stored_type,
        tenant=tenant, labels=labels or {}, **fixed,
    )
    if signer is not None:
        event = msgspec.structs.replace(event, key_id=signer.key_id, signature=signer.sign(signed_bytes(event)))
    msg_id = f"artifact-{event.id}" if once else f"artifact-{digest}-{kind}-{name}"
    await bus.publish(bus.subjects.artifact_registered, event, msg_id=msg_id)
    return event


async def register_file(bus: Bus, kind: ArtifactKind, path: str | Path, *, name: str | None = None,
                        tenant: str = "default", signer: Identity | None = None) -> ArtifactRegistered:
    """Register a file; the media type follows the extension."""
    p = Path(path)
    try:
        data = await asyncio.to_thread(p.read_bytes)
    except OSError as exc:
        raise ConfigError(f"cannot read artifact file {p}: {exc.strerror}") from None
    media = _MEDIA.get(p.suffix.lower(), "application/octet-stream")
    try:
        return await register(bus, kind, name or p.stem, data, media_type=media, tenant=tenant, signer=signer)
    except NotAllowed:
        # The identity's refusal (a ConfigError too), not the file's: it keeps its own exit code and words. The
        # store's look-up is a message get (`Bus.holds`), which the server refuses at once to an identity without it.
        raise
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc.message}") from None


async def require(bus: Bus, digest: str) -> None:
    """NotFound unless an artifact is stored under `digest`, ArtifactCorrupt if other bytes are (`load`).

    Its bytes are read and hashed, never taken from the store's metadata, which whoever may write the store writes
    (probe p82 F1: metadata claiming the real digest over other bytes passed for the artifact). Made where a record
    is written about an artifact for good (a lifecycle, a release binding: `check_references`), not on each read of
    it: every reader reads and checks the bytes it uses anyway (`load`)."""
    await load(bus, digest)


async def load(bus: Bus, digest: str) -> bytes:
    """The bytes of an artifact by hash, only if they are that hash's content (ArtifactCorrupt otherwise).

    The hash is the artifact's identity everywhere (a pinned policy, a gated release's model config), and
    whoever may register artifacts may also write any bytes under any name in the object store: every reader
    goes through here, so none acts on content other than the hash it was given."""
    # By message gets, not the object store's `get` (an ordered consumer): the operator role may create none, and
    # `eval run`'s check of what a release ships read nothing and let a mistyped flag through (probe p10, F11).
    data = await bus.object_bytes(bus.subjects.object_store, digest, ArtifactCorrupt, f"artifact {digest}")
    if data is None:
        raise NotFound(f"artifact {digest} is not in the object store")
    stored = content_hash(data)
    if stored != digest:
        raise ArtifactCorrupt(f"artifact {digest} is corrupt: the object store holds other bytes under its hash "
                              f"(their hash is {stored}), written by another writer of the store; it is refused "
                              "wherever it is used: register its content again to repair it")
    return data


async def load_structured(bus: Bus, digest: str) -> Any:
    """An artifact parsed as JSON (YAML and JSON artifacts are stored as canonical JSON), or a JSONL artifact's
    rows: canonical JSONL ends in a newline and canonical JSON never does, so a one-line dataset is one row.
    ValueError (`parse`) for one that is neither: the error reading it as one document, when it does not end in a
    newline (as what was stored as other bytes, a file of another suffix, was most likely meant)."""
    data = await load(bus, digest)
    if data.endswith(b"\n"):
        return parse(data, "application/jsonl")
    try:
        return _json(data)
    except msgspec.DecodeError as exc:
        try:
            return parse(data, "application/jsonl")
        except msgspec.DecodeError:
            raise exc from None


def release_bundle(release: str, app: str, artifacts: dict[str, str], *, parent: str = "",
                   tenant: str = "default") -> dict[str, Any]:
    """What a release name is bound to: its artifact hashes and identity (the description may differ)."""
    return {"release": release, "app": app, "tenant": tenant, "parent": parent, "artifacts": dict(artifacts)}


# `<line>@<12 hex>`: the name a release line (a GitOps release document without `release:`) gives its content.
_LINE_NAME = re.compile(r"^(?P<line>.+)@(?P<version>[0-9a-f]{12})$")


def line_version(app: str, artifacts: dict[str, str], parent: str = "", tenant: str = "default") -> str:
    """The 12 hex a release line names this content's version with (`<line>@<12 hex>`)."""
    # The tenant only when it is not the default one, so the versions of existing folders keep their names.
    owner = {"tenant": tenant} if tenant != "default" else {}
    return content_hash({"app": app, "artifacts": artifacts, "parent": parent, **owner})[7:19]


def check_line_name(bundle: dict[str, Any]) -> None:
    """ConfigError if the bundle's name has a release line's form but another content's 12 hex.

    A line's next version name is known before it is bound (`plan` prints it), and a name binds once: were
    such a name open to any content, whoever bound it first would keep the line from ever binding its own.
    With its own content's 12 hex, the name is the very bundle the line would bind, so nothing is taken."""
    match = _LINE_NAME.match(bundle["release"])
    if match is None:
        return
    own = line_version(bundle["app"], bundle["artifacts"], bundle["parent"], bundle["tenant"])
    if match["version"] != own:
        raise ConfigError(
            f"release name {bundle['release']!r} has the form of a release line's version (`<line>@<12 hex of its "
            f"content>`) but names other content (this content's would be '{match['line']}@{own}'): a line's "
            "version name is kept for that line's content; choose a name without `@<12 hex>`")


class Binding(msgspec.Struct, frozen=True, kw_only=True):
    """What `bind_release` found: the bundle the name is bound to (with its author), its hash, and whether this
    call bound it (False: the same content was bound already, by its first registration). `register_release`
    adds whether its announcement was new to the bus (False: the stream held it already)."""

    digest: str
    bundle: dict[str, Any]
    created: bool
    announced: bool = False


def announcement_id(release: str, digest: str) -> str:
    """The id of the ReleaseRegistered that announces `release` bound to the content hashed `digest`.

    A function of the binding alone, so every announcement of one binding is the same event: JetStream drops a
    repeat within its duplicate window, and the lineage recorder and the sink store one per id after it."""
    return derived_id("release-registered", release, digest)


async def bind_release(bus: Bus, bundle: dict[str, Any]) -> Binding:
    """Bind a release name to its bundle, once: the KV create is the authority.

    The same content again is accepted (idempotent; the first registration's author stays, and is what the
    Binding returns); other content under a bound name raises ReleaseConflict, however the request reached the
    bus; a name of a release line's form with another content's 12 hex, ConfigError (`check_line_name`) while
    it is not bound (bound, it is judged as any bound name).
    """
    release = bundle["release"]
    value = canonical_json(bundle)
    content = canonical_json(bundle_content(bundle))
    kv = await bus.kv(bus.subjects.kv_releases)
    try:
        check_line_name(bundle)
        await kv.create(token(release), value)
        return Binding(digest=content_hash(content), bundle=dict(bundle), created=True)
    except ConfigError as refused:
        # A line's name bound already (to the line's content) is refused as any bound name is: that it is taken
        # is the plainer reason. Not bound, the name is refused for its form, and nothing is bound.
        try:
            bound = (await kv.get(token(release))).value or b""
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            raise refused from None
        except nats.errors.Error as exc:
            raise BusUnavailable(f"cannot bind release {release!r}: {exc!r}") from None
    except nats.js.errors.KeyWrongLastSequenceError:
        try:  # already bound: to the same content?
            bound = canonical_json((await binding(bus, release))[0])
        except TakenUnbound as taken:  # by a value that binds nothing, for every reader: no registration of it
            raise ReleaseConflict(f"{taken.message}; its key is taken all the same: register the release under a "
                                  "new name") from None
    except nats.errors.Error as exc:
        raise BusUnavailable(f"cannot bind release {release!r}: {exc!r}") from None
    first = json.loads(bound) if bound else {}
    bound_content = canonical_json(bundle_content(first)) if bound else b""
    if bound_content != content:
        raise ReleaseConflict(
            f"release {release!r} is already registered with other content (bundle {content_hash(bound_content)}, "
            f"not {content_hash(content)}); releases are immutable: register the change under a new name")
    return Binding(digest=content_hash(content), bundle=first, created=False)


async def release_of(bus: Bus, release: str) -> dict[str, Any]:
    """The bundle a release name is bound to (NotFound if it was never registered)."""
    bundle, _ = await binding(bus, release)
    return bundle


async def binding(bus: Bus, release: str) -> tuple[dict[str, Any], datetime | None]:
    """(the bundle `release` is bound to, when the bucket stored it): NotFound if it was never registered,
    TakenUnbound if its key holds a value that binds nothing (`bound_bundle`), BusUnavailable if unread.

    Read by message get (a KV get's request, which returns the message's headers and stream time as well), so
    the headers a writer sent are seen: the bucket is write-once (one message per key, bus.WRITE_ONCE), and the
    message a key holds is the one that bound the name, stamped by the bus when it stored it."""
    bucket = bus.subjects.kv_releases
    unregistered = f"release {release!r} is not registered (`lockgate release create`, or `apply`)"
    try:
        msg = await bus.js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.{token(release)}")
    except nats.js.errors.NotFoundError:
        raise NotFound(unregistered) from None
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        # Retryable: the gatekeeper must not mistake an unreachable bucket for an unregistered release.
        raise BusUnavailable(f"cannot read release {release!r}: {exc!r}") from None
    if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
        raise NotFound(unregistered)
    bundle, why = bound_bundle(release, msg.data, msg.headers)
    if bundle is None:
        raise TakenUnbound(f"release {release!r} is not registered ({why})")
    return bundle, msg.time


# The header with which a message asks JetStream to remove it after that long (nats-server 2.11, ADR-43).
EXPIRES = "Nats-TTL"


class TakenUnbound(NotFound):
    """A release name whose key holds a value that binds nothing (`bound_bundle`): not registered, for every
    reader, and never to be registered either (the bucket is write-once)."""


def bound_bundle(release: str, value: bytes | None,
                 headers: Mapping[str, str] | None) -> tuple[dict[str, Any] | None, str]:
    """(the bundle a releases-bucket message (`value`, its `headers`) binds `release` to, "") or (None, why it binds
    nothing), for every reader of the bucket alike. The operator identity may create any key of the bucket (it is
    how `release create` binds), so the checks `bind_release` makes are made again here: a value that is no
    bundle, or a bundle of a differently spelled name sharing the key, or a line's version name bound to other
    content than its 12 hex derive from (probe p14: bound by a raw KV create, then gated and served under that
    name); and a message written to expire."""
    if (headers or {}).get(EXPIRES):
        # A name binds for good, and `release create` never sends a TTL. But the bucket honours a message's own
        # (nats-py makes every bucket with allow_msg_ttl, which nats-server will not turn off), and once it ran out
        # the name bound again: to other content (probe p32 F1), or to the same content under another app or tenant,
        # where a PASS decided under the first app's lax policy, or before a person's reject in the other tenant,
        # admitted it (probe p33 F1, F2). Such a binding binds nothing from the start, so nothing is decided on it.
        return None, "its binding was written to expire (Nats-TTL): a release name is bound for good"
    try:
        bundle = json.loads(value or b"")
    except ValueError:  # not JSON (`release create` writes only bundles, but the bucket takes any bytes)
        bundle = None
    if not isinstance(bundle, dict) or bundle.get("release") != release:
        held = bundle.get("release") if isinstance(bundle, dict) else "no bundle"
        return None, f"its key holds {held!r}"
    try:
        check_line_name(bundle)
    except ConfigError:
        return None, "its key binds a release line's version name to other content than the name derives from"
    except (KeyError, TypeError, ValueError):  # hand-made: a line's name without the fields its version hashes
        return None, "its key holds no complete bundle"
    return bundle, ""


async def check_references(bus: Bus, artifacts: dict[str, str]) -> None:
    """Refuse a release's artifact map unless each entry is `kind/name` -> the hash of a registered
    artifact: a release name binds once, so a mistyped hash would otherwise take the name for ever with
    a release that can never be evaluated or served. Nor to unreadable content (`require` reads the bytes): one
    whose hash was claimed before it was ever registered (probe p82 F1) is refused until its content is."""
    for ref, digest in artifacts.items():
        kind, _, name = ref.partition("/")
        if kind not in ARTIFACT_KINDS:
            raise ConfigError(f"artifact {ref!r}: the kind must be one of {', '.join(ARTIFACT_KINDS)} (kind/name)")
        if not is_name(name):
            raise ConfigError(f"invalid artifact name in {ref!r}: {NAME_RULE}")
        if not isinstance(digest, str) or not _HASH.match(digest):
            raise ConfigError(f"artifact {ref!r}: {digest!r} is not a content hash (sha256: and 64 hex digits)")
        try:
            await require(bus, digest)
        except ArtifactCorrupt as exc:
            raise ArtifactCorrupt(f"release artifact {ref}: {exc.message}") from None
        except NotFound:
            raise NotFound(f"artifact {ref}={digest} is not registered: register it first "
                           "(`lockgate artifact register`)") from None


async def check_parent(bus: Bus, release: str, parent: str) -> None:
    """Refuse a parent that is the release itself or not a registered release: the parent is part of the
    binding, so a mistyped one would take the name for ever (and could close a cycle in the lineage)."""
    if not parent:
        return
    if parent == release:
        raise ConfigError(f"release {release!r} cannot be its own parent")
    try:
        await release_of(bus, parent)
    except NotFound:
        raise NotFound(f"parent release {parent!r} of {release!r} is not registered: register it first "
                       "(`lockgate release create`, or `apply`)") from None


async def register_release(bus: Bus, release: str, app: str, artifacts: dict[str, str], *,
                           parent: str = "", description: str = "", tenant: str = "default",
                           author: Identity | None = None) -> Binding:
    """Bind a release name to a set of artifact versions (`kind/name` -> hash), then announce it.

    With `author`, the binding carries the author's signature over the bundle, so a policy can refuse
    their approval of it. ReleaseConflict if the name is already bound to other artifacts. The same
    content bound already keeps its binding, author included (the first one's), and is announced again as the
    same event (`announcement_id`): the `releases` table keeps one row.
    """
    for value, kind in ((tenant, "tenant"), (release, "release"), (app, "app")):
        check_name(value, kind)  # before anything is bound under it
    if parent:
        check_name(parent, "parent")
    # Made before the name is bound, so a description or map over the contract's bounds (FieldTooLong) binds nothing.
    event = ReleaseRegistered(release=release, app=app, artifacts=artifacts, parent=parent, description=description,
                              tenant=tenant)
    await check_references(bus, artifacts)
    await check_parent(bus, release, parent)
    bundle = release_bundle(release, app, artifacts, parent=parent, tenant=tenant)
    binding = await bind_release(bus, sign_bundle(author, bundle) if author is not None else bundle)
    # Announced however the binding was found: a crash or a bus error between binding and announcing leaves the
    # name bound and unannounced (no `releases` row, no lineage), and only a registration of the same content
    # again can announce it. Nothing tells such a binding from one announced long ago without a race, and the
    # event's id being the binding's makes announcing it again harmless.
    event = msgspec.structs.replace(event, id=announcement_id(release, binding.digest))
    try:
        ack = await bus.publish(bus.subjects.release_registered, event)
    except BusUnavailable as exc:
        raise BusUnavailable(f"release {release!r} is bound but not announced: run the same `release create` (or "
                             f"`apply`) again once the bus acknowledges ({exc.message})") from None
    return msgspec.structs.replace(binding, announced=not ack.duplicate)
