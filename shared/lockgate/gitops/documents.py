"""The folder's documents: one YAML file per resource, its type given by `kind:`.

Any `*.yaml` / `*.yml` file under the folder (any case of the suffix) is one document, but for hidden files and
files in hidden folders (`.github/`, `.pre-commit-config.yaml`: other tools' files), which `hidden_documents` lists
for `plan` to name (a `file:` or a symbolic link to one is refused, so what `plan` names is never read); how the
folder is arranged into sub-folders is the team's choice. Nothing is read from outside the
folder: a symbolic link out of it, like a `file:` out of it, is refused. Content kinds (dataset, prompt,
model_config, tool, suite, policy) become content-addressed artifacts: their content is `spec:`
inline (a mapping or a list) or `file:` beside the document (a dataset may be a JSONL file). A release names artifacts of
the folder by `kind/name`; a deployment names releases of the folder; a budget is a spending limit.
Every error names the file and the path inside it (`... - at `$.rollout.steps[0]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from lockgate.contracts.bounds import Labels, Text
from lockgate.contracts.names import Name, OptName, check_names
from lockgate.documents import NonNegative, at, load_yaml
from lockgate.errors import ConfigError
from lockgate.onlineeval import OnlineEvalSpec

# Version control's own folders: nothing in them is a document, nor worth naming as skipped.
VCS_FOLDERS = frozenset({".git", ".hg", ".svn", ".bzr", ".jj"})

# A reference to an artifact document of the folder, `kind/name`.
ArtifactRef = Annotated[str, msgspec.Meta(pattern=r"^(dataset|prompt|model_config|tool|suite|policy)/.+$")]
Percent = Annotated[float, msgspec.Meta(gt=0, le=100)]


class GitopsError(ConfigError):
    """A folder document is unreadable, malformed, or refers to something the folder does not hold."""

    exit_code = 1  # `plan` and `apply` keep 2 for "changes planned"


class _Doc(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"):
    name: Name
    # The bounds the registrations they become carry (contracts.bounds): refused at `plan`, naming the file and the
    # field, not half-way through an `apply`.
    description: Text = ""
    labels: Labels = {}

    def __post_init__(self) -> None:
        check_names(self)


class ContentDoc(_Doc, frozen=True, kw_only=True):
    """An artifact: `spec:` (the content, inline) or `file:` (a path relative to the document)."""

    spec: Any = None
    file: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.spec is None) == (not self.file):
            raise at("$.spec", "give exactly one of `spec` (inline content) and `file` (a path beside the document)")
        if self.spec is not None and not isinstance(self.spec, dict | list):
            raise at("$.spec", f"inline content is a mapping or a list, not {type(self.spec).__name__} "
                               f"{self.spec!r:.40} (put text in a file named by `file:`)")


class Dataset(ContentDoc, frozen=True, kw_only=True, tag="dataset"):
    """Eval cases: `spec:` a list of cases, or `file:` a JSONL (or JSON/YAML) file."""


class Prompt(ContentDoc, frozen=True, kw_only=True, tag="prompt"):
    """A prompt: `spec: {system, template}` (either or both; `template` is str.format over a case's vars), or `file:` a text
    file, a system message alone. An eval renders every case with it (see the evaluator's PromptArtifact)."""


class ModelConfig(ContentDoc, frozen=True, kw_only=True, tag="model_config"):
    """A model configuration: `spec: {model, endpoint, ...}` as the router reads it from a release."""


class Tool(ContentDoc, frozen=True, kw_only=True, tag="tool"):
    """A tool definition (e.g. a JSON Schema function)."""


class Suite(ContentDoc, frozen=True, kw_only=True, tag="suite"):
    """An eval suite; its `dataset:` may name a dataset document of the folder instead of a hash."""


class Policy(ContentDoc, frozen=True, kw_only=True, tag="policy"):
    """A gate policy."""


class Release(_Doc, frozen=True, kw_only=True, tag="release"):
    """A release line of an app. Without `release:`, each distinct content is a new immutable release
    named `<name>@<12 hex of its bundle hash>`; with `release:`, that one name, which can never change."""

    app: Name
    artifacts: Annotated[list[ArtifactRef], msgspec.Meta(min_length=1)]
    release: OptName = ""
    parent: OptName = ""
    tenant: Name = "default"  # whose release it is: recorded tasks and gRPC decision reads keep to its tenant


class Rollout(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a canary advances: weights in percent and the time between steps."""

    strategy: Literal["canary", "blue_green", "shadow"] = "canary"
    steps: Annotated[tuple[Percent, ...], msgspec.Meta(min_length=1)] = (10.0, 25.0, 50.0, 100.0)
    interval_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0


class Deployment(_Doc, frozen=True, kw_only=True, tag="deployment"):
    """Desired serving: the stable release and, optionally, a canary, by release documents' names."""

    app: Name
    stable: Name
    canary: OptName = ""
    rollout: Rollout = Rollout()
    online_eval: OnlineEvalSpec | None = None  # the evaluator's sampling and scorers (lockgate.onlineeval)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.canary == self.stable:
            raise at("$.canary", "the canary must be another release than the stable one")


class Alias(_Doc, frozen=True, kw_only=True, tag="alias"):
    """An alias of an app (`name`: production, staging ...) pointing to a release document of the folder;
    apply moves it with a signed record (so it needs a personal identity, `--as NAME`)."""

    app: Name
    release: Name


class Budget(_Doc, frozen=True, kw_only=True, tag="budget"):
    """A spending limit in USD per month for a tenant (and optionally one app)."""

    tenant: Name = "default"
    app: OptName = ""
    monthly_usd: NonNegative
    alert_at: tuple[Annotated[float, msgspec.Meta(gt=0, le=1)], ...] = (0.8,)


Document = Dataset | Prompt | ModelConfig | Tool | Suite | Policy | Release | Alias | Deployment | Budget
CONTENT_KINDS = ("dataset", "prompt", "model_config", "tool", "suite", "policy")
# Dependency order: what a document refers to is applied before it.
ORDER = (*CONTENT_KINDS, "release", "alias", "deployment", "budget")


class Source(msgspec.Struct, frozen=True, kw_only=True):
    """One document as read: its file relative to the folder, the bytes of its `file:` if any, and every
    path (relative to the folder) whose bytes it read, symbolic links and their targets alike."""

    path: str
    doc: Document
    file_bytes: bytes | None = None
    reads: tuple[str, ...] = ()


def kind_of(doc: Document) -> str:
    """The `kind:` tag of a document."""
    return type(doc).__struct_config__.tag  # type: ignore[return-value]


def _is_yaml(path: Path) -> bool:
    # Before (probe p20 F8), `new.YAML` was skipped without a word while a reviewer took it for a document.
    return path.suffix.lower() in (".yaml", ".yml")


def _hidden(rel: str | Path) -> bool:
    """Whether a path relative to the folder is a hidden file or in a hidden folder."""
    return any(part.startswith(".") for part in Path(rel).parts)


def hidden_documents(folder: str | Path) -> list[str]:
    """YAML files under `folder` that `load_folder` does not read, being hidden or in a hidden folder (relative paths,
    sorted; none from version control's own folders): `plan` names them, so a hidden file added in a pull request is
    not taken for an applied document (probe p20 F8)."""
    root = Path(folder).expanduser()
    found = []
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in VCS_FOLDERS]
        rel = Path(top).relative_to(root)
        hidden_here = any(part.startswith(".") for part in rel.parts)
        found += [(rel / f).as_posix() for f in files
                  if _is_yaml(Path(f)) and (hidden_here or f.startswith(".")) and (Path(top) / f).is_file()]
    return sorted(found)


def _refuse_hidden(rel: str, named: str, target: str) -> None:
    """GitopsError if the `file:` of document `rel` (`named`, relative to the folder, read at `target`) is a hidden
    file or in a hidden folder. Before (probe p51 F3), its content was applied while `plan` listed it as a hidden YAML
    file lockgate does not read; refused, the rule a reviewer relies on (hidden files are other tools') holds."""
    hidden = next((p for p in (named, target) if not p.startswith("..") and _hidden(p)), None)
    if hidden is not None:
        raise GitopsError(f"document {rel} is invalid: `file` reaches {hidden}, a hidden file, which lockgate does not "
                          "read (give the content in `spec:`, or in a visible `.json`, `.jsonl`, `.txt` or `.md` file: "
                          "a visible `.yaml` file is a document) - at `$.file`")


def load_folder(folder: str | Path) -> list[Source]:
    """Every document under `folder`, sorted by path; GitopsError naming the file (and path) if one is bad."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise GitopsError(f"{root} is not a folder")
    files = sorted(p for p in root.rglob("*") if _is_yaml(p) and p.is_file() and not _hidden(p.relative_to(root)))
    real = root.resolve()
    sources = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        # A symbolic link out of the folder would bring content that no commit of it holds (and that can change
        # under an unchanged commit), so it is refused as `file:` outside the folder is.
        if not path.resolve().is_relative_to(real):
            raise GitopsError(f"document {rel} is refused: it is a symbolic link to {path.resolve()}, outside the "
                              "folder (a commit of the folder does not hold that content)")
        resolved = path.resolve().relative_to(real).as_posix()
        if _hidden(resolved):  # a link to a hidden file would apply one `plan` lists as not read (probe p51 F3)
            raise GitopsError(f"document {rel} is refused: it is a symbolic link to {resolved}, a hidden file, which "
                              "lockgate does not read")
        doc = load_yaml(path, Document, name="document", error=GitopsError, shown=rel)  # type: ignore[arg-type]
        data = None
        reads = {rel, resolved}
        if isinstance(doc, ContentDoc) and doc.file:
            target = (path.parent / doc.file).resolve()
            if not target.is_relative_to(real):
                raise GitopsError(f"document {rel} is invalid: `file` must stay inside the folder - at `$.file`")
            named = os.path.relpath(os.path.normpath(path.parent / doc.file), root)  # a link named by `file:`
            _refuse_hidden(rel, named, target.relative_to(real).as_posix())
            try:
                data = target.read_bytes()
            except OSError as exc:
                raise GitopsError(f"document {rel} is invalid: cannot read {doc.file}: "
                                  f"{exc.strerror or exc} - at `$.file`") from None
            reads |= {target.relative_to(real).as_posix(), *([Path(named).as_posix()] if not
                                                              named.startswith("..") else [])}
        sources.append(Source(path=rel, doc=doc, file_bytes=data, reads=tuple(sorted(reads))))
    return sources
