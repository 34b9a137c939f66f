"""Retrieval quality from retrieved-context ids against relevant ids (binary or graded)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

Relevance = Mapping[str, float] | Iterable[str]


def _grades(relevant: Relevance) -> dict[str, float]:
    if isinstance(relevant, Mapping):
        return {str(k): float(v) for k, v in relevant.items() if float(v) > 0}
    return {str(r): 1.0 for r in relevant}


def _dedup(retrieved: Sequence[str]) -> list[str]:
    # A retriever returning the same chunk twice must not earn credit twice.
    seen: set[str] = set()
    out = []
    for r in retrieved:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def _cut(retrieved: Sequence[str], k: int | None) -> list[str]:
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranked = _dedup([str(r) for r in retrieved])
    return ranked if k is None else ranked[:k]


def recall_at_k(retrieved: Sequence[str], relevant: Relevance, k: int | None = None) -> float:
    """Fraction of relevant ids found in the top k (1.0 when nothing is relevant)."""
    rel = _grades(relevant)
    if not rel:
        return 1.0
    return sum(r in rel for r in _cut(retrieved, k)) / len(rel)


def precision_at_k(retrieved: Sequence[str], relevant: Relevance, k: int | None = None) -> float:
    """Fraction of the top k that is relevant; a short list is divided by k, not its length."""
    top = _cut(retrieved, k)
    denom = k if k is not None else len(top)
    if denom == 0:
        return 0.0
    rel = _grades(relevant)
    return sum(r in rel for r in top) / denom


def mrr(retrieved: Sequence[str], relevant: Relevance, k: int | None = None) -> float:
    """Reciprocal rank of the first relevant id in the top k (0 when none)."""
    rel = _grades(relevant)
    for rank, r in enumerate(_cut(retrieved, k), 1):
        if r in rel:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(retrieved: Sequence[str], relevant: Relevance, k: int | None = None) -> float:
    """nDCG@k with linear gains (rel / log2(rank + 1)); 1.0 when nothing is relevant."""
    rel = _grades(relevant)
    if not rel:
        return 1.0
    top = _cut(retrieved, k)
    dcg = sum(rel.get(r, 0.0) / math.log2(i + 2) for i, r in enumerate(top))
    n_ideal = len(rel) if k is None else min(k, len(rel))
    ideal = sorted(rel.values(), reverse=True)[:n_ideal]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg
