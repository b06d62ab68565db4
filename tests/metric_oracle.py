"""One-query reference functions over an explicit ranking: the oracle the chunked metrics are
tested against (small, exact, written straight from the definitions in docs/metrics.md)."""
from __future__ import annotations

import math

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def ranking(scores: ArrayLike, ignore: int | None = None) -> np.ndarray:
    """Gallery indices of one query, best first: score descending, ties by lower gallery index.

    ``ignore`` is a gallery index removed from the ranking (the query itself).
    """
    row = _to_numpy(scores)
    if row.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {row.shape}")
    # lexsort sorts by the last key first: score descending, then gallery index ascending.
    order = np.lexsort((np.arange(row.shape[0]), -row.astype(np.float64)))
    if ignore is not None and ignore >= 0:
        order = order[order != ignore]
    return order


def _relevance_row(relevance: ArrayLike) -> np.ndarray:
    row = np.asarray(_to_numpy(relevance)).astype(bool)
    if row.ndim != 1:
        raise ValueError(f"relevance must be 1-D (one ranked list), got shape {row.shape}")
    return row


def _n_relevant(row: np.ndarray, n_relevant: int | None) -> int:
    found = int(row.sum())
    if n_relevant is None:
        return found
    if n_relevant < found:
        raise ValueError(f"n_relevant={n_relevant} is smaller than the {found} relevant items in the row")
    return int(n_relevant)


def hit_at_k(relevance: ArrayLike, k: int) -> float:
    """1.0 when any of the first ``k`` ranked items is relevant, else 0.0."""
    _check_k(k)
    return float(_relevance_row(relevance)[:k].any())


def average_precision(relevance: ArrayLike, n_relevant: int | None = None) -> float:
    """AP of one ranked list: mean over relevant items of precision at that item's rank.

    ``relevance`` is the full ranking as booleans (best first). ``n_relevant`` defaults to the
    relevant items in the row; pass it when the row is truncated. A query with no relevant item
    has no AP: NaN is returned (the aggregate functions leave such queries out).
    """
    row = _relevance_row(relevance)
    total = _n_relevant(row, n_relevant)
    if total == 0:
        return math.nan
    positions = np.flatnonzero(row) + 1  # 1-based ranks of the relevant items
    precision_at_hits = np.arange(1, positions.size + 1) / positions
    return float(precision_at_hits.sum() / total)


def map_at_k(relevance: ArrayLike, k: int, n_relevant: int | None = None) -> float:
    """MAP@k of one ranked list: sum of precision@i over relevant i ≤ k, / min(k, n_relevant).

    NaN when the query has no relevant item.
    """
    _check_k(k)
    row = _relevance_row(relevance)
    total = _n_relevant(row, n_relevant)
    if total == 0:
        return math.nan
    positions = np.flatnonzero(row[:k]) + 1
    precision_at_hits = np.arange(1, positions.size + 1) / positions
    return float(precision_at_hits.sum() / min(k, total))


def recall_at_k(relevance: ArrayLike, k: int, n_relevant: int | None = None) -> float:
    """Relevant items among the first ``k`` divided by all relevant items (NaN if none)."""
    _check_k(k)
    row = _relevance_row(relevance)
    total = _n_relevant(row, n_relevant)
    if total == 0:
        return math.nan
    return float(row[:k].sum() / total)


def average_precision_from_ranks(ranks: ArrayLike) -> float:
    """AP from the 1-based ranks of one query's relevant items (any order). NaN if empty."""
    values = np.sort(np.asarray(_to_numpy(ranks), dtype=np.int64).ravel())
    if values.size == 0:
        return math.nan
    if values[0] < 1 or np.any(np.diff(values) <= 0):
        raise ValueError("ranks must be distinct and ≥ 1")
    return float(np.mean(np.arange(1, values.size + 1) / values))


def _check_k(k: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")

