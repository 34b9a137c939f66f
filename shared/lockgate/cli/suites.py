"""What `lockgate eval run` judges with: a suite and a policy, each a plain file or a GitOps document.

A plain suite file is registered as it is (its `dataset:` a JSONL file beside it, or a hash), and so is a plain
policy file. A GitOps document (`kind: suite`, `kind: policy`, as `lockgate apply` reads it) is taken as its
folder applied it: the applied state names the document's file relative to the folder, which gives the folder;
the folder is read and resolved as `plan` does (so a suite's `dataset:` names a dataset document of the folder),
and the document must still hold what was applied, so the gate judges the very artifacts the releases bind.
Nothing is registered for a document: `apply` did that.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.documents import convert, load_yaml
from lockgate.errors import ConfigError
from lockgate.gitops.resolve import Resource, resolve
from lockgate.services.evaluator.domain import Suite


async def register(bus: Bus, suite_path: Path, policy_path: str | None) -> tuple[str, str, Suite]:
    """The artifact hashes of the suite and of the policy ("" without one), and the suite as the evaluator reads
    it. Every file is checked before anything is registered: the evaluator would refuse a bad suite only after the
    run began, and the CLI would have stored a suite no run can use; the gate would block on an unusable policy
    only once the eval is done."""
    from lockgate.services.gatekeeper.policy import Policy

    doc = load_yaml(suite_path, dict, name="eval suite")
    policy_doc = load_yaml(policy_path, dict, name="policy") if policy_path else {}
    # A `kind:` is what a folder document has and a plain suite or policy may not (both forbid unknown fields).
    suite, applied = await _applied(bus, suite_path, "suite") if "kind" in doc else ("", None)
    policy = (await _applied(bus, Path(policy_path), "policy"))[0] if policy_path and "kind" in policy_doc else ""
    ds_path = None
    if applied is not None:
        parsed = convert(applied, Suite, name=f"eval suite {suite_path}")
    else:
        dataset = doc.get("dataset")
        if isinstance(dataset, str) and not dataset.startswith("sha256:"):
            ds_path = suite_path.parent / dataset
        parsed = convert({**doc, "dataset": "sha256:"} if ds_path else doc, Suite, name=f"eval suite {suite_path}")
    if policy_path and not policy:
        load_yaml(policy_path, Policy, name="policy")
    if not suite:
        if ds_path is not None:
            doc["dataset"] = (await artifacts.register_file(bus, "dataset", ds_path)).hash
        suite = (await artifacts.register(bus, "eval_suite", doc.get("name", suite_path.stem), doc)).hash
    if policy_path and not policy:
        policy = (await artifacts.register_file(bus, "policy", policy_path)).hash
    return suite, policy, parsed


async def _applied(bus: Bus, path: Path, kind: str) -> tuple[str, Any]:
    """The hash `lockgate apply` registered for the `kind` document at `path`, and its content; ConfigError unless
    the folder that holds it was applied with this very content."""
    from lockgate.gitops.documents import Document, kind_of
    from lockgate.gitops.state import read_state

    doc = load_yaml(path, Document, name="document")  # type: ignore[arg-type]  # the folder loader's own types
    if kind_of(doc) != kind:
        raise ConfigError(f"{path} is a `kind: {kind_of(doc)}` document: `eval run` takes a `kind: {kind}` "
                          f"document (or a plain {kind} file) there")
    entry = (await read_state(bus)).get(f"{kind}/{doc.name}")
    if entry is None:
        raise ConfigError(f"{kind} {doc.name!r} of {path} is not applied: apply its folder first "
                          "(`lockgate apply DIR`), then gate the release it binds")
    folder, resource = _in_folder(path, kind, doc.name, entry.source)
    if resource.digest != entry.digest:
        raise ConfigError(f"{path} is not the {kind} its folder applied ({entry.digest[7:19]}; the folder now holds "
                          f"{resource.digest[7:19]}): apply {folder} first, so the gate judges what the releases bind")
    return resource.digest, artifacts.parse(resource.content, resource.media_type)


def _in_folder(path: Path, kind: str, name: str, source: str) -> tuple[Path, Resource]:
    """The folder apply read `path` from (`source` names it relative to the folder) and that document as the folder
    now gives it, resolved as `plan` resolves it."""
    from lockgate.gitops.documents import GitopsError, load_folder

    where = Path(os.path.abspath(path))
    parts = PurePosixPath(source).parts
    if not parts or where.parts[-len(parts):] != parts:
        raise ConfigError(f"{kind} {name!r} was applied from {source!r} of its folder, not from "
                          f"{path}: apply the folder that holds {path} first")
    folder = where.parents[len(parts) - 1]
    try:
        resources = {r.key: r for r in resolve(load_folder(folder))}
    except GitopsError as exc:  # an input error here, as an invalid suite file is (exit 2)
        raise ConfigError(f"folder {folder}: {exc.message}") from None
    return folder, resources[f"{kind}/{name}"]
