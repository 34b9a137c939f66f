"""From the folder's documents to the desired resources, each with its content hash (pure: no I/O).

A content document becomes the canonical bytes of an artifact (the hash `lockgate artifact register`
would give the same content); a release becomes the bundle that `release create` binds; a deployment
or budget becomes its resolved spec. References are checked here: a release names artifacts of the
folder, a deployment names releases of the folder, a suite's `dataset:` may name a dataset document, and a
release's `parent:` names a release document of the folder or a release.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import msgspec

from lockgate.artifacts import canonical_bytes, check_line_name, line_version, release_bundle
from lockgate.documents import reroot
from lockgate.errors import ConfigError
from lockgate.gitops.documents import (
    Alias,
    Budget,
    ContentDoc,
    Deployment,
    GitopsError,
    Release,
    Source,
    Suite,
    kind_of,
)
from lockgate.identity import bundle_content
from lockgate.ids import content_hash

# The artifact kind each content document registers as (a suite is an `eval_suite` artifact).
ARTIFACT_KIND = {"dataset": "dataset", "prompt": "prompt", "model_config": "model_config", "tool": "tool",
                 "suite": "eval_suite", "policy": "policy"}
_MEDIA = {".json": "application/json", ".jsonl": "application/jsonl", ".yaml": "application/yaml",
          ".yml": "application/yaml", ".txt": "text/plain", ".md": "text/markdown"}


class Resource(msgspec.Struct, frozen=True, kw_only=True):
    """One desired resource: `kind/name`, its content hash, and what apply needs to create it."""

    kind: str
    name: str
    digest: str
    source: str
    content: bytes = b""  # an artifact's canonical bytes
    media_type: str = ""
    release: str = ""  # a release's immutable name
    bundle: dict[str, Any] = {}  # a release's bundle
    pinned: bool = False  # a release named by its document's `release:`, not a line's version
    spec: dict[str, Any] = {}  # a deployment's or budget's resolved spec
    labels: dict[str, str] = {}
    description: str = ""

    @property
    def key(self) -> str:
        """`kind/name`, unique in a folder."""
        return f"{self.kind}/{self.name}"


def _bad(src: Source, message: str, path: str) -> GitopsError:
    return GitopsError(f"document {src.path} is invalid: {message} - at `{path}`")


def _artifact(src: Source, datasets: dict[str, str]) -> Resource:
    doc = src.doc
    assert isinstance(doc, ContentDoc)
    if src.file_bytes is not None:
        media = _MEDIA.get(PurePosixPath(doc.file).suffix.lower(), "application/octet-stream")
        raw: Any = src.file_bytes
        where = "$.file"
    else:
        media, raw, where = "application/json", doc.spec, "$.spec"
    try:
        content = canonical_bytes(raw, media)
    except (ConfigError, ValueError) as exc:
        raise _bad(src, f"{doc.file or 'spec'}: {getattr(exc, 'message', exc)}", where) from None
    if isinstance(doc, Suite):
        content = _suite(src, content, media, datasets)
        media = "application/json"
    stored = "application/json" if media == "application/yaml" else media
    return Resource(kind=kind_of(doc), name=doc.name, digest=content_hash(content), source=src.path,
                    content=content, media_type=stored, labels=dict(doc.labels), description=doc.description)


def _suite(src: Source, content: bytes, media: str, datasets: dict[str, str]) -> bytes:
    """A suite whose `dataset:` names a dataset document gets that dataset's hash; then it is validated."""
    from lockgate.services.evaluator.domain import Suite as SuiteSpec

    base = "$.spec" if src.file_bytes is None else "$"
    if media not in ("application/json", "application/yaml"):
        raise _bad(src, "a suite is a YAML or JSON mapping", base)
    raw = msgspec.json.decode(content)
    if not isinstance(raw, dict):
        raise _bad(src, "a suite is a mapping", base)
    ref = raw.get("dataset")
    if isinstance(ref, str) and not ref.startswith("sha256:"):
        if ref not in datasets:
            raise _bad(src, f"no dataset document named {ref!r} in the folder", f"{base}.dataset")
        raw = {**raw, "dataset": datasets[ref]}
    try:
        msgspec.convert(raw, SuiteSpec)
    except msgspec.ValidationError as exc:
        if src.file_bytes is None:
            raise GitopsError(f"document {src.path} is invalid: {reroot(base, exc)}") from None
        raise GitopsError(f"document {src.path} is invalid: {src.doc.file}: {exc}") from None  # type: ignore[union-attr]
    return canonical_bytes(raw, "application/json")


def _policy(src: Source, res: Resource) -> None:
    from lockgate.services.gatekeeper.policy import Policy as PolicySpec

    try:
        msgspec.convert(msgspec.json.decode(res.content), PolicySpec)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        if src.file_bytes is None:
            raise GitopsError(f"document {src.path} is invalid: {reroot('$.spec', str(exc))}") from None
        raise GitopsError(f"document {src.path} is invalid: {src.doc.file}: {exc}") from None  # type: ignore[union-attr]


def _release(src: Source, doc: Release, artifacts: dict[str, Resource], parent: str) -> Resource:
    """A release document's bundle; `parent` is its `parent:` resolved to a release name."""
    hashes = {}
    for i, ref in enumerate(doc.artifacts):
        res = artifacts.get(ref)
        if res is None:
            raise _bad(src, f"no {ref.split('/', 1)[0]} document named {ref.split('/', 1)[1]!r} in the folder",
                       f"$.artifacts[{i}]")
        hashes[f"{ARTIFACT_KIND[res.kind]}/{res.name}"] = res.digest
    # Without an explicit name, the version is a function of the content: the same folder names the same
    # release on any stack, and an edited artifact names a new one. The parent counts as the release it
    # resolves to, so a line whose parent line gets a new version gets one too (its bundle names the parent).
    name = doc.release or f"{doc.name}@{line_version(doc.app, hashes, parent, doc.tenant)}"
    if parent and parent == name:
        raise _bad(src, f"release {name!r} cannot be its own parent", "$.parent")
    bundle = release_bundle(name, doc.app, hashes, parent=parent, tenant=doc.tenant)
    try:  # as binding it would be, so that `plan` names the file: a pin may not take a line's version name
        check_line_name(bundle)
    except ConfigError as exc:
        raise _bad(src, exc.message, "$.release") from None
    return Resource(kind="release", name=doc.name, digest=content_hash(bundle_content(bundle)), source=src.path,
                    release=name, bundle=bundle, pinned=bool(doc.release), labels=dict(doc.labels),
                    description=doc.description)


def _releases(sources: list[Source], artifacts: dict[str, Resource]) -> dict[str, Resource]:
    """The folder's release documents by name. A `parent:` names a release document of the folder, as a
    deployment's `stable:` does (then its release, resolved first: a release line's name depends on its
    parent's), or else a release by its name (bound already, or a document's `release:`), as before."""
    docs: dict[str, Source] = {s.doc.name: s for s in sources}
    pinned = {s.doc.release: s.doc.name for s in sources if isinstance(s.doc, Release) and s.doc.release}
    out: dict[str, Resource] = {}

    def build(src: Source, chain: list[str]) -> Resource:
        doc = src.doc
        assert isinstance(doc, Release)
        if doc.name in out:
            return out[doc.name]
        parent = doc.parent
        if parent in docs:
            if pinned.get(parent, parent) != parent:
                raise _bad(src, f"parent {parent!r} is both a release document's name and the release of "
                                f"document {pinned[parent]!r}: rename one of them", "$.parent")
            target = docs[parent].doc
            assert isinstance(target, Release)
            if target.release:
                parent = target.release  # a pinned name does not depend on its own parent
            elif parent == doc.name:
                raise _bad(src, f"release document {doc.name!r} cannot be its own parent", "$.parent")
            elif parent in chain:
                cycle = [doc.name, *chain[chain.index(parent):], doc.name]  # each one's parent follows it
                raise _bad(src, f"the parents of release document {doc.name!r} form a cycle "
                                f"({' -> '.join(cycle)})", "$.parent")
            else:
                parent = build(docs[parent], [*chain, doc.name]).release
        out[doc.name] = _release(src, doc, artifacts, parent)
        return out[doc.name]

    return {s.doc.name: build(s, []) for s in sources}


def _deployment(src: Source, doc: Deployment, releases: dict[str, Resource]) -> Resource:
    names = {}
    for field in ("stable", "canary"):
        ref = getattr(doc, field)
        if not ref:
            continue
        res = releases.get(ref)
        if res is None:
            raise _bad(src, f"no release document named {ref!r} in the folder", f"$.{field}")
        if res.bundle["app"] != doc.app:
            raise _bad(src, f"release {ref!r} is of app {res.bundle['app']!r}, not {doc.app!r}", f"$.{field}")
        names[field] = res.release
    spec = {"app": doc.app, "stable": names["stable"], "canary": names.get("canary", ""),
            "rollout": msgspec.to_builtins(doc.rollout)}
    if doc.online_eval is not None:  # only when given: the digest of a deployment without it is unchanged
        spec["online_eval"] = msgspec.to_builtins(doc.online_eval)
    return Resource(kind="deployment", name=doc.name, digest=content_hash(spec), source=src.path, spec=spec,
                    labels=dict(doc.labels), description=doc.description)


def _alias(src: Source, doc: Alias, releases: dict[str, Resource]) -> Resource:
    res = releases.get(doc.release)
    if res is None:
        raise _bad(src, f"no release document named {doc.release!r} in the folder", "$.release")
    if res.bundle["app"] != doc.app:
        raise _bad(src, f"release {doc.release!r} is of app {res.bundle['app']!r}, not {doc.app!r}", "$.release")
    spec = {"app": doc.app, "alias": doc.name, "release": res.release}
    return Resource(kind="alias", name=f"{doc.app}/{doc.name}", digest=content_hash(spec), source=src.path,
                    release=res.release, spec=spec, labels=dict(doc.labels), description=doc.description)


def _budget(src: Source, doc: Budget) -> Resource:
    spec = {"tenant": doc.tenant, "app": doc.app, "monthly_usd": doc.monthly_usd, "alert_at": list(doc.alert_at)}
    return Resource(kind="budget", name=doc.name, digest=content_hash(spec), source=src.path, spec=spec,
                    labels=dict(doc.labels), description=doc.description)


def resolve(sources: list[Source]) -> list[Resource]:
    """The desired resources of a folder, in dependency order; GitopsError naming the file and path."""
    seen: dict[str, str] = {}
    for src in sources:
        # an alias is named within its app: shop's production is not other's
        name = f"{src.doc.app}/{src.doc.name}" if isinstance(src.doc, Alias) else src.doc.name
        key = f"{kind_of(src.doc)}/{name}"
        if key in seen:
            raise _bad(src, f"{key} is already defined in {seen[key]}", "$.name")
        seen[key] = src.path
    by_kind = {k: [s for s in sources if kind_of(s.doc) == k] for k in
               ("dataset", "prompt", "model_config", "tool", "suite", "policy", "release", "alias", "deployment",
                "budget")}
    artifacts: dict[str, Resource] = {}
    for kind in ("dataset", "prompt", "model_config", "tool", "suite", "policy"):
        datasets = {r.name: r.digest for r in artifacts.values() if r.kind == "dataset"}
        for src in by_kind[kind]:
            res = _artifact(src, datasets)
            if kind == "policy":
                _policy(src, res)
            artifacts[res.key] = res
    releases = _releases(by_kind["release"], artifacts)
    out = [*artifacts.values(), *releases.values()]
    for src in by_kind["alias"]:
        assert isinstance(src.doc, Alias)
        out.append(_alias(src, src.doc, releases))
    for src in by_kind["deployment"]:
        assert isinstance(src.doc, Deployment)
        out.append(_deployment(src, src.doc, releases))
    for src in by_kind["budget"]:
        assert isinstance(src.doc, Budget)
        out.append(_budget(src, src.doc))
    return out
