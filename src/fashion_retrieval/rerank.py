"""Test-time re-ranking over embedding matrices: α-query expansion and k-reciprocal re-ranking.

Pure functions: float embeddings in (numpy or torch, rows L2-normalised as every embedding of
this project is), numpy out; no model, no index. ``fashion-retrieval evaluate`` applies them with
``--query-expansion k,alpha`` and ``--rerank k1,k2,lambda`` (docs/metrics.md, "Test-time
options", has what each gains on the shared benchmarks).

* :func:`query_expansion` — α-QE of Radenović, Tolias and Chum ("Fine-tuning CNN image retrieval
  with no human annotation", TPAMI 2018): each query is replaced by the normalised sum of itself
  and its k nearest gallery items weighted by their similarity to the power α; the gallery is
  then searched again with the new queries.
* :func:`k_reciprocal_distances` — k-reciprocal re-ranking of Zhong, Zheng, Cao and Li
  ("Re-ranking person re-identification with k-reciprocal encoding", CVPR 2017): a Jaccard
  distance between k-reciprocal neighbourhoods, blended with the original distance.

Memory: neither ever holds an [N, N] matrix of the pool. Nearest neighbours come from the chunked
scan of :mod:`fashion_retrieval.metrics`; the k-reciprocal sets are sparse (at most a few
times k1 entries per image); the only dense output is the [Q, G] distance matrix the metrics
rank, refused above :data:`MAX_RERANK_ENTRIES` entries.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from . import metrics

ArrayLike = np.ndarray | torch.Tensor

# The re-ranked [queries, gallery] distance matrix is dense (float32): 2^28 entries = 1 GiB.
MAX_RERANK_ENTRIES = 1 << 28
# Pairs expanded at once while intersecting neighbourhoods (each costs ~24 bytes of temporaries).
PAIR_BUDGET = 1 << 23
# Query rows re-ranked at once: their [rows, G] temporaries stay near 2^22 entries.
BLOCK_ENTRIES = 1 << 22


class RerankError(ValueError):
    """A test-time option that is malformed, out of range, or a re-ranking too large to hold."""


# ---- options ----------------------------------------------------------------------------------
def _number_list(text: str, count: int, option: str, form: str) -> list[str]:
    parts = [part.strip() for part in str(text).split(",")]
    if len(parts) != count or not all(parts):
        raise RerankError(f"{option} {text!r}: expected {form}")
    return parts


def _integer(value: str, option: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise RerankError(f"{option}: {name} must be an integer, got {value!r}") from None


def _real(value: str, option: str, name: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise RerankError(f"{option}: {name} must be a number, got {value!r}") from None
    return number


@dataclass(frozen=True)
class QueryExpansion:
    """α-QE over the ``k`` nearest gallery items, weights similarity^``alpha`` (k = 0: no change)."""

    k: int
    alpha: float

    OPTION = "--query-expansion"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 0:
            raise RerankError(f"{self.OPTION}: k must be an integer ≥ 0, got {self.k!r}")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise RerankError(f"{self.OPTION}: alpha must be a finite number ≥ 0, got {self.alpha!r}")

    @classmethod
    def parse(cls, text: str) -> "QueryExpansion":
        """``"k,alpha"``, e.g. ``"2,3"``."""
        k, alpha = _number_list(text, 2, cls.OPTION, "k,alpha (e.g. 2,3)")
        return cls(_integer(k, cls.OPTION, "k"), _real(alpha, cls.OPTION, "alpha"))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class KReciprocal:
    """k-reciprocal re-ranking: neighbourhood size ``k1``, local expansion over ``k2`` images,
    final distance ``(1 - lam) * Jaccard + lam * original``."""

    k1: int
    k2: int
    lam: float

    OPTION = "--rerank"

    def __post_init__(self) -> None:
        for name in ("k1", "k2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise RerankError(f"{self.OPTION}: {name} must be an integer ≥ 1, got {value!r}")
        if not (math.isfinite(self.lam) and 0.0 <= self.lam <= 1.0):
            raise RerankError(f"{self.OPTION}: lambda must lie in [0, 1], got {self.lam!r}")

    @classmethod
    def parse(cls, text: str) -> "KReciprocal":
        """``"k1,k2,lambda"``, e.g. ``"20,6,0.3"`` (the paper's values)."""
        k1, k2, lam = _number_list(text, 3, cls.OPTION, "k1,k2,lambda (e.g. 20,6,0.3)")
        return cls(_integer(k1, cls.OPTION, "k1"), _integer(k2, cls.OPTION, "k2"), _real(lam, cls.OPTION, "lambda"))

    def to_dict(self) -> dict[str, float]:
        return {"k1": self.k1, "k2": self.k2, "lambda": self.lam}


# ---- inputs -----------------------------------------------------------------------------------
def _matrix(x: ArrayLike, name: str) -> np.ndarray:
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _pair(queries: ArrayLike, gallery: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    q, g = _matrix(queries, "query_embeddings"), _matrix(gallery, "gallery_embeddings")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query and gallery embeddings differ in dimension: {q.shape[1]} vs {g.shape[1]}")
    return q, g


def _self_index(index: ArrayLike | Sequence[int] | None, num_queries: int, num_gallery: int) -> np.ndarray:
    if index is None:
        return np.full(num_queries, -1, dtype=np.int64)
    index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
    if index.shape != (num_queries,) or (index.size and not np.issubdtype(index.dtype, np.integer)):
        raise ValueError(f"query_gallery_index must hold one integer per query ({num_queries}), "
                         f"got shape {index.shape} of {index.dtype}")
    if index.size and (index.min() < -1 or index.max() >= num_gallery):
        raise ValueError(f"query_gallery_index values must lie in [-1, {num_gallery})")
    return index.astype(np.int64)


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---- α-query expansion ------------------------------------------------------------------------
def query_expansion(queries: ArrayLike, gallery: ArrayLike, k: int, alpha: float, *,
                    query_gallery_index: ArrayLike | Sequence[int] | None = None,
                    query_chunk: int = 1024) -> np.ndarray:
    """α-QE: ``q' = normalise(q + Σ_{i ≤ k} max(s_i, 0)^α · g_i)`` for every query row.

    ``g_1 … g_k`` are the query's k most similar gallery rows (dot product, the metrics' ranking
    and tie rule; ``query_gallery_index[q]``, the query's own gallery row, is not one of them)
    and ``s_i`` their similarities. Negative similarities weigh 0 (a negative number has no real
    α-th power; the paper's neighbours are all positive); ``alpha = 0`` is plain average query
    expansion. ``k = 0`` returns the queries, L2-normalised. Returns float32 [Q, D] unit rows;
    memory O(query_chunk × k × D) besides the chunked scan's blocks.
    """
    options = QueryExpansion(k, alpha)
    q, g = _pair(queries, gallery)
    self_index = _self_index(query_gallery_index, q.shape[0], g.shape[0])
    if options.k == 0 or g.shape[0] == 0:
        return _normalise_rows(q).astype(np.float32)
    scores, neighbours = metrics.chunked_topk(q, g, options.k, query_gallery_index=self_index,
                                              query_chunk=query_chunk)
    out = np.empty_like(q)
    for start in range(0, q.shape[0], query_chunk):
        rows = slice(start, start + query_chunk)
        found = neighbours[rows] >= 0  # fewer than k gallery rows: padding weighs nothing
        out[rows] = expand_queries(q[rows], g[np.maximum(neighbours[rows], 0)], scores[rows], options.alpha, found)
    return out


def expand_queries(queries: np.ndarray, neighbour_vectors: np.ndarray, neighbour_scores: np.ndarray, alpha: float,
                   found: np.ndarray | None = None) -> np.ndarray:
    """The α-QE formula on neighbours already found: ``queries`` [Q, D], their neighbours'
    vectors [Q, k, D] and similarities [Q, k] (``found`` [Q, k]: False where a row has fewer
    than k). Returns normalise(q + Σ max(s, 0)^α g), float32 unit rows."""
    scores = np.asarray(neighbour_scores, dtype=np.float64)
    found = np.ones(scores.shape, dtype=bool) if found is None else found
    weights = np.where(found, np.power(np.maximum(np.where(found, scores, 0.0), 0.0), alpha), 0.0)
    expanded = queries + np.einsum("qk,qkd->qd", weights.astype(np.float32), neighbour_vectors.astype(np.float32))
    return _normalise_rows(expanded).astype(np.float32)


# ---- k-reciprocal re-ranking ------------------------------------------------------------------
def _reciprocal_sets(neighbours: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """R(i, k) of every pool item as a CSR pair (indptr, members sorted within each row):
    j ∈ R(i, k) ⇔ j is among the k+1 nearest of i (i itself included) and i among those of j."""
    n = neighbours.shape[0]
    near = neighbours[:, :k + 1]
    rows = np.repeat(np.arange(n, dtype=np.int64), near.shape[1])
    cols = near.ravel()
    keep = cols >= 0
    rows, cols = rows[keep], cols[keep]
    forward = np.unique(rows * n + cols)
    backward = cols * n + rows
    slot = np.minimum(np.searchsorted(forward, backward), forward.size - 1)
    mutual = forward[slot] == backward
    pairs = np.unique(rows[mutual] * n + cols[mutual])
    return _csr(pairs // n, pairs % n, n)


def _csr(rows: np.ndarray, cols: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, cols) of pairs already sorted by (row, col)."""
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return indptr, cols.astype(np.int64)


def _expanded_sets(full: tuple[np.ndarray, np.ndarray], half: tuple[np.ndarray, np.ndarray],
                   n: int) -> tuple[np.ndarray, np.ndarray]:
    """R*(i, k) = R(i, k) ∪ R(j, k/2) for every j ∈ R(i, k) with
    |R(i, k) ∩ R(j, k/2)| ≥ 2/3 |R(j, k/2)| (the paper's eq. 6), as sorted (row, col) pairs."""
    full_ptr, full_cols = full
    half_ptr, half_cols = half
    full_rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(full_ptr))
    full_keys = full_rows * n + full_cols  # sorted: rows ascending, columns sorted within a row
    half_size = np.diff(half_ptr)
    added_rows, added_cols = [], []
    # (i, j) candidate pairs in blocks whose expansion (|R(j, k/2)| entries each) stays bounded
    sizes = half_size[full_cols]
    ends = np.cumsum(sizes)
    start = 0
    while start < full_cols.size:
        stop = int(np.searchsorted(ends, (ends[start - 1] if start else 0) + PAIR_BUDGET, side="right"))
        stop = max(stop, start + 1)
        i, j = full_rows[start:stop], full_cols[start:stop]
        lengths = half_size[j]
        owner = np.repeat(np.arange(i.size), lengths)
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        members = half_cols[np.repeat(half_ptr[j], lengths) + offsets]
        keys = i[owner] * n + members
        slot = np.minimum(np.searchsorted(full_keys, keys), full_keys.size - 1)
        inside = np.bincount(owner, weights=(full_keys[slot] == keys), minlength=i.size)
        accepted = 3 * inside >= 2 * lengths  # integer form of ≥ 2/3
        take = accepted[owner]
        added_rows.append(i[owner][take])
        added_cols.append(members[take])
        start = stop
    keys = np.unique(np.concatenate([full_keys, *(r * n + c for r, c in zip(added_rows, added_cols))]))
    return keys // n, keys % n


def _pair_distances(pool: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances of the pairs (rows[p], cols[p]), a bounded block at a time."""
    out = np.empty(rows.size, dtype=np.float32)
    step = max(1, PAIR_BUDGET // max(1, pool.shape[1]))
    squared = np.einsum("nd,nd->n", pool, pool)
    for start in range(0, rows.size, step):
        r, c = rows[start:start + step], cols[start:start + step]
        dots = np.einsum("pd,pd->p", pool[r], pool[c])
        out[start:start + step] = squared[r] + squared[c] - 2.0 * dots
    return np.maximum(out, 0.0)


def _sparse_rows(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n: int):
    import scipy.sparse

    return scipy.sparse.csr_matrix((values, (rows, cols)), shape=(n, n), dtype=np.float64)


def _jaccard_overlap(by_column, query_part, num_gallery: int) -> np.ndarray:
    """Σ_m min(V[q, m], V[g, m]) for the rows q of ``query_part`` (CSR) and every gallery item
    g, where ``by_column`` holds the gallery rows of V by column: for each column m a query row
    uses, the pairs of its entry with the gallery's entries of m."""
    col_ptr, col_rows, col_values = by_column.indptr, by_column.indices, by_column.data
    q_ptr, q_cols, q_values = query_part.indptr, query_part.indices, query_part.data
    overlap = np.zeros(query_part.shape[0] * num_gallery, dtype=np.float64)
    q_rows = np.repeat(np.arange(query_part.shape[0]), np.diff(q_ptr))
    counts = (col_ptr[q_cols + 1] - col_ptr[q_cols]).astype(np.int64)
    ends = np.cumsum(counts)
    start = 0
    while start < q_cols.size:
        stop = int(np.searchsorted(ends, (ends[start - 1] if start else 0) + PAIR_BUDGET, side="right"))
        stop = max(stop, start + 1)
        lengths = counts[start:stop]
        owner = np.repeat(np.arange(start, stop), lengths)
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        entries = np.repeat(col_ptr[q_cols[start:stop]], lengths) + offsets
        contribution = np.minimum(q_values[owner], col_values[entries])
        # the block's entries cover consecutive query rows: count only over their span
        first = int(q_rows[start]) * num_gallery
        flat = q_rows[owner] * num_gallery + col_rows[entries] - first
        span = (int(q_rows[stop - 1]) + 1) * num_gallery - first
        overlap[first:first + span] += np.bincount(flat, weights=contribution, minlength=span)
        start = stop
    return overlap.reshape(query_part.shape[0], num_gallery)


def k_reciprocal_distances(queries: ArrayLike, gallery: ArrayLike, k1: int = 20, k2: int = 6, lam: float = 0.3, *,
                           query_gallery_index: ArrayLike | Sequence[int] | None = None,
                           max_entries: int = MAX_RERANK_ENTRIES) -> np.ndarray:
    """Re-ranked distances [Q, G] (float32, smaller = better) by k-reciprocal encoding.

    Reconstructed from Zhong et al., CVPR 2017, over the pool P = gallery ∪ queries (a query
    with ``query_gallery_index[q] ≥ 0`` *is* that gallery row and appears once):

    1. original distance d(i, j) = squared Euclidean distance, divided by the largest d(i, ·)
       over the pool (per row, as the authors' released code scales it; this keeps the paper's
       λ = 0.3 meaningful whatever the embedding's scale);
    2. N(i, k) = i and its k nearest pool items; R(i, k) = {j ∈ N(i, k) : i ∈ N(j, k)};
    3. R*(i, k1) = R(i, k1) ∪ R(j, ⌈k1/2⌉) for each j ∈ R(i, k1) whose half set lies at least
       two-thirds inside R(i, k1);
    4. V[i, j] = exp(-d(i, j)) for j ∈ R*(i, k1), 0 elsewhere, each row scaled to sum 1 (so
       |A ∪ B| = 2 − |A ∩ B| below);
    5. local query expansion: row i of V replaced by the mean of the rows of i and its k2 − 1
       nearest pool items (k2 = 1: none);
    6. Jaccard distance d_J(q, g) = 1 − Σ min(V_q, V_g) / Σ max(V_q, V_g);
    7. result = (1 − λ) d_J + λ d.

    Nearest neighbours come from the chunked scan (ties by pool order); everything else is
    sparse, O(|P| · k1 · k2) entries. The dense result is refused above ``max_entries``
    (Q × G; default 2^28, 1 GiB).
    """
    options = KReciprocal(k1, k2, lam)
    q, g = _pair(queries, gallery)
    num_queries, num_gallery = q.shape[0], g.shape[0]
    if num_queries * num_gallery > max_entries:
        raise RerankError(f"k-reciprocal re-ranking of {num_queries} queries × {num_gallery} gallery items needs a "
                         f"dense {num_queries}×{num_gallery} distance matrix ({num_queries * num_gallery:,} entries), "
                         f"more than the {max_entries:,} allowed; re-rank fewer queries at a time or a smaller gallery")
    self_index = _self_index(query_gallery_index, num_queries, num_gallery)
    outside = np.flatnonzero(self_index < 0)
    pool = np.concatenate([g, q[outside]]) if outside.size else g
    n = pool.shape[0]
    query_rows = self_index.copy()
    query_rows[outside] = num_gallery + np.arange(outside.size)
    if num_queries == 0 or num_gallery == 0:
        return np.zeros((num_queries, num_gallery), dtype=np.float32)

    # 1-2: nearest pool items of every pool item (its own row excluded, then put first)
    width = max(options.k1, options.k2 - 1)
    _, nearest = metrics.chunked_topk(pool, pool, width, query_gallery_index=np.arange(n))
    neighbours = np.concatenate([np.arange(n, dtype=np.int64)[:, None], nearest], axis=1)
    farthest_scores, farthest = metrics.chunked_topk(-pool, pool, 1)
    squared = np.einsum("nd,nd->n", pool, pool)
    largest = np.maximum(squared + squared[farthest[:, 0]] + 2.0 * farthest_scores[:, 0], 1e-12)

    # 3: k-reciprocal sets and their expansion
    full = _reciprocal_sets(neighbours, options.k1)
    half = _reciprocal_sets(neighbours, (options.k1 + 1) // 2)
    rows, cols = _expanded_sets(full, half, n)

    # 4: the Gaussian encoding, rows summing to 1
    weights = np.exp(-_pair_distances(pool, rows, cols) / largest[rows])
    weights /= np.bincount(rows, weights=weights, minlength=n)[rows]
    encoding = _sparse_rows(rows, cols, weights, n)

    # 5: local query expansion over k2 nearest (i itself first)
    if options.k2 > 1:
        near = neighbours[:, :options.k2]
        valid = near >= 0
        share = (1.0 / valid.sum(axis=1))[:, None].repeat(near.shape[1], axis=1)
        averaging = _sparse_rows(np.repeat(np.arange(n), near.shape[1])[valid.ravel()], near[valid],
                                 share[valid], n)
        encoding = (averaging @ encoding).tocsr()

    # 6-7: Jaccard distance, blended with the original distance, a block of queries at a time
    by_column = encoding[:num_gallery].tocsc()
    by_column.sort_indices()
    out = np.empty((num_queries, num_gallery), dtype=np.float32)
    step = max(1, BLOCK_ENTRIES // num_gallery)
    for start in range(0, num_queries, step):
        rows_here = query_rows[start:start + step]
        overlap = _jaccard_overlap(by_column, encoding[rows_here].tocsr(), num_gallery)
        jaccard = 1.0 - overlap / (2.0 - overlap)
        original = squared[rows_here][:, None] + squared[None, :num_gallery] - 2.0 * (pool[rows_here] @ g.T)
        original = np.maximum(original, 0.0) / largest[rows_here][:, None]
        out[start:start + step] = (1.0 - options.lam) * jaccard + options.lam * original
    return out


__all__ = ["KReciprocal", "MAX_RERANK_ENTRIES", "QueryExpansion", "RerankError", "expand_queries",
           "k_reciprocal_distances", "query_expansion"]
