"""Retrieval metrics of the fashion-retrieval papers, as pure functions that also run chunked.

A gallery of 10^6 items and 10^5 queries never needs the [Q, M] score matrix in memory: the
scores are produced one (query chunk × gallery chunk) block at a time, so memory is
O(query_chunk × gallery_chunk) plus the outputs.

Definitions (also in docs/metrics.md):

* similarity is the dot product of float32 embeddings (L2-normalise first for cosine); a
  precomputed similarity or distance matrix is accepted for small cases;
* the ranking of one query sorts the gallery by similarity, highest first; **ties are broken by
  gallery order** (lower gallery index first); the query's own gallery item
  (``query_gallery_index``) is removed from the ranking;
* a gallery item is relevant when its label equals the query's label; a gallery label < 0 is
  never relevant (the item stays in the ranking as a distractor); a query label < 0 means the
  query is not evaluated;
* ``top{k}``: fraction of queries with at least one relevant item in the first k;
* ``MAP@k``: sum of precision@i over relevant positions i ≤ k, divided by min(k, n_relevant);
* ``Recall@k``: relevant items in the first k divided by n_relevant;
* ``MAP@all``: mean over queries of AP = mean over the relevant items of precision at the
  item's rank, over the full ranking;
* a query without any relevant item is left out of every mean and counted in
  ``queries_without_relevant``; ``queries_evaluated`` counts the others.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
ProgressCallback = Callable[[int, int], None]

DEFAULT_TOP_KS: tuple[int, ...] = (1, 5, 10, 20, 30, 40, 50)
DEFAULT_QUERY_CHUNK = 1024
DEFAULT_GALLERY_CHUNK = 32768

__all__ = [
    "DEFAULT_TOP_KS",
    "RetrievalResult",
    "average_precision",
    "average_precision_from_ranks",
    "chunked_topk",
    "evaluate_attribute_retrieval",
    "evaluate_retrieval",
    "evaluate_retrieval_from_scores",
    "hit_at_k",
    "map_at_k",
    "ranking",
    "recall_at_k",
    "relevant_ranks",
    "retrieve",
    "retrieve_from_scores",
]


# ----------------------------------------------------------------------------------------------
# Single-query reference functions over an explicit ranking (small, exact, used by the tests)
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Validated container of one retrieval run
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetrievalResult:
    """What the metrics need from one retrieval run, for the evaluated queries only.

    Row ``e`` describes query ``query_indices[e]``. ``topk_indices`` holds gallery indices best
    first (-1 pads rows when fewer than k items can be ranked), ``topk_relevant`` whether each is
    relevant. ``relevant_ranks[rank_offsets[e]:rank_offsets[e+1]]`` are the 1-based ranks of
    query e's relevant items in the full ranking, ascending (present when full ranks were
    computed, needed for ``MAP@all``). Every evaluated query has ``n_relevant ≥ 1``.
    """

    query_indices: np.ndarray
    topk_indices: np.ndarray
    topk_scores: np.ndarray
    topk_relevant: np.ndarray
    n_relevant: np.ndarray
    queries_without_relevant: int
    queries_unlabelled: int
    relevant_ranks: np.ndarray | None = None
    rank_offsets: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.query_indices.shape[0] if self.query_indices.ndim == 1 else -1
        if n < 0:
            raise ValueError(f"query_indices must be 1-D, got shape {self.query_indices.shape}")
        if self.topk_indices.ndim != 2 or self.topk_indices.shape[0] != n:
            raise ValueError(f"topk_indices must be [{n}, k], got shape {self.topk_indices.shape}")
        for name in ("topk_scores", "topk_relevant"):
            value = getattr(self, name)
            if value.shape != self.topk_indices.shape:
                raise ValueError(f"{name} has shape {value.shape}, topk_indices has {self.topk_indices.shape}")
        if self.topk_indices.dtype != np.int64:
            raise ValueError(f"topk_indices must be int64, got {self.topk_indices.dtype}")
        if self.topk_relevant.dtype != np.bool_:
            raise ValueError(f"topk_relevant must be bool, got {self.topk_relevant.dtype}")
        if np.isnan(self.topk_scores).any():
            raise ValueError("topk_scores contains NaN")
        if np.any(self.topk_relevant & (self.topk_indices < 0)):
            raise ValueError("a padding entry (index -1) is marked relevant")
        if self.n_relevant.shape != (n,):
            raise ValueError(f"n_relevant must have shape ({n},), got {self.n_relevant.shape}")
        if n and self.n_relevant.min() < 1:
            raise ValueError("every evaluated query needs n_relevant ≥ 1 "
                             "(queries without relevant items are only counted)")
        if np.any(self.topk_relevant.sum(axis=1) > self.n_relevant):
            raise ValueError("a row of topk_relevant has more relevant items than its n_relevant")
        if self.queries_without_relevant < 0 or self.queries_unlabelled < 0:
            raise ValueError("query counts must be ≥ 0")
        if (self.relevant_ranks is None) != (self.rank_offsets is None):
            raise ValueError("relevant_ranks and rank_offsets come together")
        if self.relevant_ranks is not None and self.rank_offsets is not None:
            offsets, ranks = self.rank_offsets, self.relevant_ranks
            if offsets.shape != (n + 1,) or offsets[0] != 0:
                raise ValueError(f"rank_offsets must have shape ({n + 1},) and start at 0")
            if not np.array_equal(np.diff(offsets), self.n_relevant):
                raise ValueError("rank_offsets do not match n_relevant")
            if ranks.shape != (int(offsets[-1]),):
                raise ValueError(f"relevant_ranks must have {int(offsets[-1])} entries, got {ranks.shape}")
            if ranks.size and ranks.min() < 1:
                raise ValueError("ranks are 1-based")
            steps = np.diff(ranks)
            starts_of_query = np.zeros(ranks.size, dtype=bool)
            starts_of_query[offsets[:-1][offsets[:-1] < ranks.size]] = True
            if np.any((steps <= 0) & ~starts_of_query[1:]):
                raise ValueError("ranks of one query must be strictly increasing")

    @property
    def num_evaluated(self) -> int:
        return int(self.query_indices.shape[0])

    @property
    def k(self) -> int:
        return int(self.topk_indices.shape[1])

    def ranks_of(self, row: int) -> np.ndarray:
        """The 1-based ranks of the relevant items of evaluated row ``row``."""
        if self.relevant_ranks is None or self.rank_offsets is None:
            raise ValueError("full ranks were not computed (retrieve with full_ranks=True)")
        return self.relevant_ranks[self.rank_offsets[row]:self.rank_offsets[row + 1]]

    def per_query(
        self,
        ks: Iterable[int] = DEFAULT_TOP_KS,
        map_at: Iterable[int] = (100,),
        recall_at: Iterable[int] = (100,),
        full_map: bool = True,
    ) -> dict[str, np.ndarray]:
        """Per evaluated query values (float64 [E]) of every requested metric."""
        values: dict[str, np.ndarray] = {}
        for k in ks:
            values[f"top{k}"] = self._from_topk_or_ranks(k, _hits_from_topk, _hits_from_ranks)
        for k in map_at:
            values[f"MAP@{k}"] = self._from_topk_or_ranks(k, _map_from_topk, _map_from_ranks)
        for k in recall_at:
            values[f"Recall@{k}"] = self._from_topk_or_ranks(k, _recall_from_topk, _recall_from_ranks)
        if full_map:
            if self.relevant_ranks is None:
                raise ValueError("MAP@all needs the full ranks: retrieve with full_ranks=True")
            values["MAP@all"] = _ap_from_ranks(self.relevant_ranks, self.rank_offsets, self.n_relevant)
        return values

    def metrics(
        self,
        ks: Iterable[int] = DEFAULT_TOP_KS,
        map_at: Iterable[int] = (100,),
        recall_at: Iterable[int] = (100,),
        full_map: bool = True,
    ) -> dict[str, float | int]:
        """Means over evaluated queries plus the query counts (NaN means when none evaluated)."""
        out: dict[str, float | int] = {}
        for name, values in self.per_query(ks, map_at, recall_at, full_map).items():
            # float64 sum so 10^5 queries do not lose digits
            out[name] = float(values.sum(dtype=np.float64) / values.size) if values.size else math.nan
        out["queries_evaluated"] = self.num_evaluated
        out["queries_without_relevant"] = int(self.queries_without_relevant)
        out["queries_unlabelled"] = int(self.queries_unlabelled)
        return out

    def _from_topk_or_ranks(self, k: int, from_topk: Callable[..., np.ndarray],
                            from_ranks: Callable[..., np.ndarray]) -> np.ndarray:
        _check_k(k)
        if k <= self.k:
            return from_topk(self.topk_relevant, self.n_relevant, k)
        if self.relevant_ranks is not None:
            return from_ranks(self.relevant_ranks, self.rank_offsets, self.n_relevant, k)
        raise ValueError(
            f"the retrieval kept the top {self.k} items but a metric at k={k} was asked for; "
            f"retrieve with k ≥ {k} or with full_ranks=True"
        )


def _hits_from_topk(relevant: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    return relevant[:, :k].any(axis=1).astype(np.float64)


def _map_from_topk(relevant: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    head = relevant[:, :k]
    hits_so_far = np.cumsum(head, axis=1, dtype=np.float64)
    precision = hits_so_far / np.arange(1, head.shape[1] + 1, dtype=np.float64)
    return (precision * head).sum(axis=1) / np.minimum(k, n_relevant)


def _recall_from_topk(relevant: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    return relevant[:, :k].sum(axis=1, dtype=np.float64) / n_relevant


def _positions_in_query(offsets: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """1-based position of every flat rank entry inside its query (i-th relevant item)."""
    total = int(offsets[-1])
    return np.arange(1, total + 1, dtype=np.float64) - np.repeat(offsets[:-1], n_relevant)


def _per_query_sum(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    cumulative = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    return cumulative[offsets[1:]] - cumulative[offsets[:-1]]


def _hits_from_ranks(ranks, offsets, n_relevant, k: int) -> np.ndarray:
    # ranks are ascending per query, so the first entry is the best relevant rank
    return (ranks[offsets[:-1]] <= k).astype(np.float64)


def _map_from_ranks(ranks, offsets, n_relevant, k: int) -> np.ndarray:
    precision = _positions_in_query(offsets, n_relevant) / ranks
    return _per_query_sum(np.where(ranks <= k, precision, 0.0), offsets) / np.minimum(k, n_relevant)


def _recall_from_ranks(ranks, offsets, n_relevant, k: int) -> np.ndarray:
    return _per_query_sum((ranks <= k).astype(np.float64), offsets) / n_relevant


def _ap_from_ranks(ranks, offsets, n_relevant) -> np.ndarray:
    precision = _positions_in_query(offsets, n_relevant) / ranks
    return _per_query_sum(precision, offsets) / n_relevant


# ----------------------------------------------------------------------------------------------
# Input conversion and validation
# ----------------------------------------------------------------------------------------------

def _to_numpy(x: ArrayLike | Sequence) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _embeddings(x: ArrayLike, name: str) -> torch.Tensor:
    tensor = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {tensor.dtype}")
    if tensor.dtype != torch.float32:
        # scores are float32 dot products by definition; other precisions are converted once
        tensor = tensor.to(torch.float32)
    _check_finite(tensor, name)
    return tensor


def _check_finite(tensor: torch.Tensor, name: str) -> None:
    step = max(1, (1 << 24) // max(1, tensor.shape[1]))  # slices: no gallery-sized bool mask
    for start in range(0, tensor.shape[0], step):
        finite = torch.isfinite(tensor[start:start + step])
        if not bool(finite.all()):
            row, column = torch.nonzero(~finite)[0].tolist()
            raise ValueError(f"{name} contains NaN or infinite values (first at row {start + row}, column {column})")


def _labels(x: ArrayLike | Sequence[int], length: int, name: str) -> np.ndarray:
    labels = _to_numpy(x)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
    if labels.shape[0] != length:
        raise ValueError(f"{name} has {labels.shape[0]} entries but there are {length} embeddings/rows")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{name} must hold integers (label < 0 = unlabelled), got {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def _self_index(x: ArrayLike | Sequence[int] | None, num_queries: int, num_gallery: int) -> np.ndarray:
    if x is None:
        return np.full(num_queries, -1, dtype=np.int64)
    index = _labels(x, num_queries, "query_gallery_index")
    if index.size and (index.min() < -1 or index.max() >= num_gallery):
        raise ValueError(f"query_gallery_index values must lie in [-1, {num_gallery}), got "
                         f"[{index.min()}, {index.max()}]")
    return index


def _check_chunks(query_chunk: int, gallery_chunk: int) -> None:
    if query_chunk < 1 or gallery_chunk < 1:
        raise ValueError(f"chunk sizes must be ≥ 1, got query_chunk={query_chunk}, gallery_chunk={gallery_chunk}")


def _relevant_counts(query_labels: np.ndarray, gallery_labels: np.ndarray, self_index: np.ndarray) -> np.ndarray:
    """Relevant gallery items per query: same label, gallery label ≥ 0, own item not counted."""
    labels, counts = np.unique(gallery_labels[gallery_labels >= 0], return_counts=True)
    if labels.size == 0:
        return np.zeros(query_labels.shape[0], dtype=np.int64)
    slot = np.minimum(np.searchsorted(labels, query_labels), labels.size - 1)
    found = (labels[slot] == query_labels) & (query_labels >= 0)
    n_relevant = np.where(found, counts[slot], 0).astype(np.int64)
    has_self = self_index >= 0
    own_label = gallery_labels[np.where(has_self, self_index, 0)]
    self_is_relevant = has_self & (own_label == query_labels) & (query_labels >= 0)
    return n_relevant - self_is_relevant


# ----------------------------------------------------------------------------------------------
# Score blocks: embeddings (dot products) or a precomputed matrix
# ----------------------------------------------------------------------------------------------

class _EmbeddingScores:
    def __init__(self, queries: torch.Tensor, gallery: torch.Tensor, device: torch.device):
        if queries.shape[1] != gallery.shape[1]:
            raise ValueError(f"query and gallery embeddings differ in dimension: "
                             f"{queries.shape[1]} vs {gallery.shape[1]}")
        self.queries = queries
        # moved once, not per block: on a GPU the gallery then crosses the bus a single time
        self.gallery = gallery.to(device)
        self.device = device
        self.num_gallery = gallery.shape[0]
        self._gallery_np: np.ndarray | None = None  # FAISS's copy, made on first use

    def query_block(self, rows: np.ndarray) -> torch.Tensor:
        return self.queries[torch.from_numpy(rows).to(self.queries.device)].to(self.device)

    def scores(self, block: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        return torch.mm(block, self.gallery[start:stop].T, out=out)


class _MatrixScores:
    def __init__(self, matrix: torch.Tensor, higher_is_better: bool, device: torch.device):
        self.matrix = matrix
        self.sign = 1.0 if higher_is_better else -1.0
        self.device = device
        self.num_gallery = matrix.shape[1]

    def query_block(self, rows: np.ndarray) -> torch.Tensor:
        # negating distances turns "smaller is better" into the similarity order, ties kept
        return self.sign * self.matrix[torch.from_numpy(rows).to(self.matrix.device)].to(self.device)

    def scores(self, block: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(block[:, start:stop])


def _resolve_device(device: str | torch.device | None, *tensors: ArrayLike) -> torch.device:
    if device is not None:
        return torch.device(device)
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# The chunked scan
# ----------------------------------------------------------------------------------------------

class _Workspace:
    """Block-sized buffers reused across gallery chunks.

    A fresh [query_chunk, gallery_chunk] tensor per block is fresh memory from the OS, and its
    page faults cost a third of the matrix product on the CPU we measured; reusing one buffer
    per role removes them.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, role: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        size = rows * cols
        buffer = self._buffers.get(role)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
            buffer = torch.empty(size, dtype=dtype, device=self.device)
            self._buffers[role] = buffer
        return buffer[:size].view(rows, cols)  # a prefix of a flat buffer is contiguous


def _chunk_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-``k`` set of each row under the tie rule, in no particular order.

    ``torch.topk`` returns the right values but an arbitrary choice among equal scores, so it is
    asked for k+1: when the k-th and (k+1)-th values differ no tie crosses the cut; the rare rows
    where they are equal are redone with a stable sort, which keeps the lower columns.
    """
    width = scores.shape[1]
    if width <= k:
        columns = torch.arange(width, device=scores.device).expand(scores.shape[0], width)
        return scores.clone(), columns  # the scores live in a reused buffer
    values, columns = torch.topk(scores, k + 1, dim=1, sorted=True)
    tie_at_cut = values[:, k - 1] == values[:, k]
    values, columns = values[:, :k], columns[:, :k]
    if bool(tie_at_cut.any()):
        rows = torch.nonzero(tie_at_cut).squeeze(1)
        exact_values, exact_columns = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        values = values.clone()
        columns = columns.clone()
        values[rows] = exact_values[:, :k]
        columns[rows] = exact_columns[:, :k]
    return values, columns


def _ordered_topk(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates of each row, ordered by (score desc, gallery index asc).

    Sorting by index first and then stably by score is the tie rule; it runs once per query
    chunk (or when candidates pile up), not once per gallery chunk: on a shared CPU every small
    parallel op pays a thread wake-up, which made per-chunk merging cost more than the top-k.
    """
    indices, by_index = torch.sort(indices, dim=1)
    values = values.gather(1, by_index)
    values, by_score = torch.sort(values, dim=1, descending=True, stable=True)
    # copies, not views: a [:, :k] view would keep every candidate of the chunk alive
    return values[:, :k].clone(), indices.gather(1, by_score[:, :k])


@dataclass
class _Positives:
    """Relevant (query row, gallery index) pairs of one query chunk, sorted by gallery index."""

    rows: np.ndarray
    gallery: np.ndarray


def _positive_pairs(labels: np.ndarray, self_index: np.ndarray, gallery_order: np.ndarray,
                    sorted_gallery_labels: np.ndarray) -> _Positives:
    lo = np.searchsorted(sorted_gallery_labels, labels, side="left")
    hi = np.searchsorted(sorted_gallery_labels, labels, side="right")
    lengths = hi - lo
    starts = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.arange(starts[-1]) - np.repeat(starts[:-1] - lo, lengths)
    rows = np.repeat(np.arange(labels.size), lengths)
    gallery = gallery_order[flat]
    keep = gallery != self_index[rows]
    rows, gallery = rows[keep], gallery[keep]
    by_gallery = np.argsort(gallery, kind="stable")
    return _Positives(rows[by_gallery], gallery[by_gallery])


def _mask_self(scores: torch.Tensor, self_rows: torch.Tensor, self_columns: torch.Tensor) -> None:
    if self_rows.numel():
        scores[self_rows, self_columns] = -math.inf


def _self_in_chunk(self_index: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    inside = (self_index >= start) & (self_index < stop)
    rows = torch.nonzero(inside).squeeze(1)
    return rows, self_index[rows] - start


FAISS_SCAN = True  # False: always the torch scan (tests compare the two)


def _faiss_topk(source, rows: np.ndarray, self_index: np.ndarray, k: int):
    """The top-``k`` of a query chunk by FAISS's k-NN kernel, or None where it does not apply.

    FAISS fuses the matrix product with a heap per query, so it never writes the score block
    that ``torch.topk`` then reads again: on the 2-core CPU it took 2.72 CPU s against 4.10 for
    ``mm`` + ``topk`` at 2·10⁴ × 2·10⁴ × 256 (docs/performance.md). It is asked for k+2 (the
    query's own item may be among them); its choice among equal scores is arbitrary, so the
    candidates are ordered by (score desc, index asc) and the rows where the k-th and
    (k+1)-th scores are equal are returned as ``ties`` for the exact scan, which applies the
    tie rule. Only for embeddings on the CPU, without the rank pass (which needs the scores).
    """
    if not FAISS_SCAN or not isinstance(source, _EmbeddingScores) or source.device.type != "cpu" or k == 0 \
            or source.num_gallery < k + 2:
        return None
    try:
        import faiss
    except ImportError:
        return None
    if source._gallery_np is None:
        source._gallery_np = np.ascontiguousarray(source.gallery.numpy(), dtype=np.float32)
        faiss.omp_set_num_threads(torch.get_num_threads())
    block = np.ascontiguousarray(source.query_block(rows).numpy(), dtype=np.float32)
    values, indices = faiss.knn(block, source._gallery_np, k + 2, faiss.METRIC_INNER_PRODUCT)
    own = (indices == self_index[:, None]) | (indices < 0)
    values = np.where(own, -np.inf, values).astype(np.float32)
    # per row: by score descending, equal scores by gallery index ascending (own item last)
    order = np.lexsort((np.where(own, np.iinfo(np.int64).max, indices), -values), axis=1)
    values = np.take_along_axis(values, order, axis=1)
    indices = np.take_along_axis(indices, order, axis=1)
    ties = np.flatnonzero(values[:, k - 1] == values[:, k])
    return torch.from_numpy(values[:, :k].copy()), torch.from_numpy(indices[:, :k].copy()), ties


def _scan_query_chunk(source, rows: np.ndarray, self_index: np.ndarray, k: int, gallery_chunk: int,
                      positives: _Positives | None, workspace: _Workspace):
    """Pass 1 over the gallery: the top-k and the scores of the relevant items."""
    device = source.device
    block = source.query_block(rows)
    self_tensor = torch.from_numpy(self_index).to(device)
    n_rows = rows.size
    candidate_values = [torch.empty((n_rows, 0), dtype=block.dtype, device=device)]
    candidate_indices = [torch.empty((n_rows, 0), dtype=torch.int64, device=device)]
    pending = 0
    positive_scores = None
    if positives is not None:
        positive_scores = torch.empty(positives.gallery.size, dtype=block.dtype, device=device)
        pos_rows = torch.from_numpy(positives.rows).to(device)
        pos_gallery = torch.from_numpy(positives.gallery).to(device)
    for start in range(0, source.num_gallery, gallery_chunk):
        stop = min(start + gallery_chunk, source.num_gallery)
        scores = source.scores(block, start, stop, workspace.get("scores", n_rows, stop - start, block.dtype))
        _mask_self(scores, *_self_in_chunk(self_tensor, start, stop))
        if positives is not None:
            lo, hi = np.searchsorted(positives.gallery, [start, stop])
            positive_scores[lo:hi] = scores[pos_rows[lo:hi], pos_gallery[lo:hi] - start]
        if k:
            values, columns = _chunk_candidates(scores, k)
            candidate_values.append(values)
            candidate_indices.append(columns + start)
            pending += values.shape[1]
            if pending > max(8 * k, 4096):  # bounds the candidates kept, whatever the chunk size
                merged = _ordered_topk(torch.cat(candidate_values, 1), torch.cat(candidate_indices, 1), k)
                candidate_values, candidate_indices = [merged[0]], [merged[1]]
                pending = merged[0].shape[1]
    values, indices = _ordered_topk(torch.cat(candidate_values, 1), torch.cat(candidate_indices, 1), k)
    return values, indices, positive_scores


def _count_ranks(source, rows: np.ndarray, self_index: np.ndarray, gallery_chunk: int,
                 positives: _Positives, positive_scores: torch.Tensor, workspace: _Workspace) -> np.ndarray:
    """Pass 2: the 1-based ranks of the relevant items, grouped by query row, ascending.

    Rank = 1 + #(items with a higher score) + #(items with an equal score and a lower index).
    Per query the relevant items are sorted worst first, i.e. by (score asc, index desc); a
    gallery item g then outranks exactly a prefix of them, of length n_below(g). A histogram of
    n_below over the gallery gives, for the p-th relevant item, the number of items above it.
    ``searchsorted`` on the scores gives n_below when g's score equals no relevant score; the
    few items that tie a relevant score (the relevant items themselves included) get the exact
    count from a second, sparse lookup that adds the tied relevant items with a higher index.
    """
    device = source.device
    num_gallery = source.num_gallery
    n_rows = rows.size
    scores_host = positive_scores.cpu().numpy()
    order = np.lexsort((-positives.gallery, scores_host, positives.rows))
    pos_rows, pos_gallery, pos_scores = positives.rows[order], positives.gallery[order], scores_host[order]
    per_row = np.bincount(pos_rows, minlength=n_rows)
    row_offsets = np.concatenate([[0], np.cumsum(per_row)])
    slot = np.arange(pos_rows.size) - row_offsets[pos_rows]
    width = int(per_row.max()) + 1
    # +inf padding: searchsorted never goes past a row's real relevant items
    padded = np.full((n_rows, width), np.inf, dtype=pos_scores.dtype)
    padded[pos_rows, slot] = pos_scores
    # tie groups = runs of equal (row, score); a key that sorts by group, then by index desc
    new_group = np.ones(pos_rows.size, dtype=bool)
    new_group[1:] = (pos_rows[1:] != pos_rows[:-1]) | (pos_scores[1:] != pos_scores[:-1])
    group_id = np.cumsum(new_group) - 1
    group_start = np.flatnonzero(new_group)
    tie_key = group_id * (num_gallery + 1) + (num_gallery - pos_gallery)
    # a relevant item has exactly `slot` relevant items below it; setting that by index rather
    # than by comparing scores keeps the count exact even if a BLAS gave pass 2 other last bits
    slot_by_gallery = np.empty_like(slot)
    slot_by_gallery[order] = slot

    padded_t = torch.from_numpy(padded).to(device)
    row_offsets_t = torch.from_numpy(row_offsets).to(device)
    group_id_t = torch.from_numpy(group_id).to(device)
    group_start_t = torch.from_numpy(group_start).to(device)
    tie_key_t = torch.from_numpy(tie_key).to(device)
    self_tensor = torch.from_numpy(self_index).to(device)
    own_rows = torch.from_numpy(positives.rows).to(device)
    own_gallery = torch.from_numpy(positives.gallery).to(device)
    own_slot = torch.from_numpy(slot_by_gallery).to(device)
    histogram = torch.zeros((n_rows, width), dtype=torch.int64, device=device)
    block = source.query_block(rows)
    for start in range(0, num_gallery, gallery_chunk):
        stop = min(start + gallery_chunk, num_gallery)
        shape = (n_rows, stop - start)
        scores = source.scores(block, start, stop, workspace.get("scores", *shape, block.dtype))
        _mask_self(scores, *_self_in_chunk(self_tensor, start, stop))
        below = torch.searchsorted(padded_t, scores, out=workspace.get("below", *shape, torch.int64))
        nearest = torch.gather(padded_t, 1, below, out=workspace.get("nearest", *shape, scores.dtype))
        ties = torch.eq(nearest, scores, out=workspace.get("ties", *shape, torch.bool))
        tie_rows, tie_columns = torch.nonzero(ties, as_tuple=True)
        if tie_rows.numel():
            flat = row_offsets_t[tie_rows] + below[tie_rows, tie_columns]
            group = group_id_t[flat]
            query_key = group * (num_gallery + 1) + (num_gallery - (tie_columns + start))
            # members of the group with key < query_key are those with a higher gallery index
            higher_index = torch.searchsorted(tie_key_t, query_key) - group_start_t[group]
            below[tie_rows, tie_columns] += higher_index
        lo, hi = np.searchsorted(positives.gallery, [start, stop])
        below[own_rows[lo:hi], own_gallery[lo:hi] - start] = own_slot[lo:hi]
        histogram.scatter_add_(1, below, torch.ones(1, dtype=torch.int64, device=device).expand_as(below))
    # items above the p-th worst relevant item = items whose n_below exceeds p
    above = num_gallery - torch.cumsum(histogram, dim=1)
    # the excluded own item sits in the histogram at n_below = 0, so it outranks nobody
    ranks = 1 + above.cpu().numpy()[pos_rows, slot]
    best_first = np.lexsort((ranks, pos_rows))
    return ranks[best_first]


def _retrieve(source, query_labels: np.ndarray, gallery_labels: np.ndarray, self_index: np.ndarray, *,
              k: int, full_ranks: bool, query_chunk: int, gallery_chunk: int,
              progress: ProgressCallback | None) -> RetrievalResult:
    if k < 0:
        raise ValueError(f"k must be ≥ 0, got {k}")
    _check_chunks(query_chunk, gallery_chunk)
    n_relevant_all = _relevant_counts(query_labels, gallery_labels, self_index)
    labelled = query_labels >= 0
    evaluated = np.flatnonzero(labelled & (n_relevant_all > 0))
    labelled_gallery = np.flatnonzero(gallery_labels >= 0)
    gallery_order = labelled_gallery[np.argsort(gallery_labels[labelled_gallery], kind="stable")]
    sorted_gallery_labels = gallery_labels[gallery_order]
    width = min(k, source.num_gallery)

    top_values, top_indices, rank_values = [], [], []
    workspace = _Workspace(source.device)
    bounds = (_rank_chunk_bounds(n_relevant_all[evaluated], query_chunk) if full_ranks
              else range(0, evaluated.size, query_chunk))
    for chunk_start, chunk_stop in itertools.pairwise([*bounds, evaluated.size]):
        rows = evaluated[chunk_start:chunk_stop]
        chunk_self = self_index[rows]
        positives = (_positive_pairs(query_labels[rows], chunk_self, gallery_order, sorted_gallery_labels)
                     if full_ranks else None)
        faiss_topk = None if full_ranks else _faiss_topk(source, rows, chunk_self, width)
        if faiss_topk is not None:
            values, indices, ties = faiss_topk
            positive_scores = None
            if ties.size:  # a tie across the k-th place: the exact scan applies the tie rule
                exact_values, exact_indices, _ = _scan_query_chunk(source, rows[ties], chunk_self[ties], width,
                                                                   gallery_chunk, None, workspace)
                values[torch.from_numpy(ties)] = exact_values
                indices[torch.from_numpy(ties)] = exact_indices
        else:
            values, indices, positive_scores = _scan_query_chunk(source, rows, chunk_self, width, gallery_chunk,
                                                                 positives, workspace)
        top_values.append(values.cpu())
        top_indices.append(indices.cpu())
        if full_ranks:
            rank_values.append(_count_ranks(source, rows, chunk_self, gallery_chunk, positives, positive_scores,
                                            workspace))
        if progress is not None:
            progress(chunk_stop, evaluated.size)

    topk_values = (torch.cat(top_values).numpy() if top_values else np.empty((0, width), dtype=np.float32))
    topk_indices = (torch.cat(top_indices).numpy() if top_indices else np.empty((0, width), dtype=np.int64))
    topk_values, topk_indices = _pad_topk(topk_values, topk_indices, self_index[evaluated], k)
    n_relevant = n_relevant_all[evaluated]
    safe = np.maximum(topk_indices, 0)
    topk_relevant = (topk_indices >= 0) & (gallery_labels[safe] == query_labels[evaluated][:, None])

    relevant_ranks = rank_offsets = None
    if full_ranks:
        relevant_ranks = (np.concatenate(rank_values) if rank_values else np.empty(0, dtype=np.int64)).astype(np.int64)
        rank_offsets = np.concatenate([[0], np.cumsum(n_relevant)]).astype(np.int64)
    return RetrievalResult(
        query_indices=evaluated.astype(np.int64),
        topk_indices=topk_indices,
        topk_scores=topk_values,
        topk_relevant=topk_relevant,
        n_relevant=n_relevant,
        queries_without_relevant=int(np.sum(labelled & (n_relevant_all == 0))),
        queries_unlabelled=int(np.sum(~labelled)),
        relevant_ranks=relevant_ranks,
        rank_offsets=rank_offsets,
    )


RANK_WORKSPACE_ENTRIES = 1 << 22


def _rank_chunk_bounds(n_relevant: np.ndarray, query_chunk: int) -> list[int]:
    """Start of each query chunk for the rank pass.

    The rank pass keeps [rows, most relevant items of a row] tables, so a query chunk also ends
    before rows × that maximum passes RANK_WORKSPACE_ENTRIES: a label shared by 10^5 gallery
    items then shrinks its chunk instead of allocating gigabytes.
    """
    starts = [0] if n_relevant.size else []
    rows_in_chunk, widest = 0, 0
    for position, count in enumerate(n_relevant.tolist()):
        wider = max(widest, count + 1)
        if rows_in_chunk and (rows_in_chunk == query_chunk or (rows_in_chunk + 1) * wider > RANK_WORKSPACE_ENTRIES):
            starts.append(position)
            rows_in_chunk, wider = 0, count + 1
        rows_in_chunk += 1
        widest = wider
    return starts


def _pad_topk(values: np.ndarray, indices: np.ndarray, self_index: np.ndarray, k: int):
    """Mark the excluded own item (only ever reached when fewer than k items remain) and pad to k."""
    own = (indices == self_index[:, None]) & (self_index[:, None] >= 0)
    indices = np.where(own, -1, indices)
    values = np.where(own, -np.inf, values)
    missing = k - indices.shape[1]
    if missing > 0:
        indices = np.pad(indices, ((0, 0), (0, missing)), constant_values=-1)
        values = np.pad(values, ((0, 0), (0, missing)), constant_values=-np.inf)
    return values, indices.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def retrieve(
    query_embeddings: ArrayLike,
    gallery_embeddings: ArrayLike,
    query_labels: ArrayLike | Sequence[int],
    gallery_labels: ArrayLike | Sequence[int],
    *,
    k: int = 100,
    full_ranks: bool = True,
    query_gallery_index: ArrayLike | Sequence[int] | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
) -> RetrievalResult:
    """Rank the gallery for every evaluated query, chunk by chunk, keeping what metrics need.

    Similarity = float32 dot product. ``query_gallery_index[q]`` is the gallery index of query
    q itself (-1 = none), removed from its ranking. ``full_ranks`` also computes the rank of
    every relevant item (for MAP@all); it costs a second pass over the gallery. Memory is
    O(query_chunk × gallery_chunk) besides the inputs, the [E, k] top-k and the relevant ranks.
    ``device`` defaults to the device of the embeddings (CPU for numpy).
    """
    queries = _embeddings(query_embeddings, "query_embeddings")
    gallery = _embeddings(gallery_embeddings, "gallery_embeddings")
    q_labels = _labels(query_labels, queries.shape[0], "query_labels")
    g_labels = _labels(gallery_labels, gallery.shape[0], "gallery_labels")
    self_index = _self_index(query_gallery_index, queries.shape[0], gallery.shape[0])
    source = _EmbeddingScores(queries, gallery, _resolve_device(device, query_embeddings, gallery_embeddings))
    with torch.inference_mode():
        return _retrieve(source, q_labels, g_labels, self_index, k=k, full_ranks=full_ranks,
                         query_chunk=query_chunk, gallery_chunk=gallery_chunk, progress=progress)


def retrieve_from_scores(
    scores: ArrayLike,
    query_labels: ArrayLike | Sequence[int],
    gallery_labels: ArrayLike | Sequence[int],
    *,
    higher_is_better: bool = True,
    k: int = 100,
    full_ranks: bool = True,
    query_gallery_index: ArrayLike | Sequence[int] | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    device: str | torch.device | None = None,
) -> RetrievalResult:
    """Like :func:`retrieve` from a precomputed [Q, M] similarity (or distance) matrix.

    Pass ``higher_is_better=False`` for distances. The matrix keeps its float dtype.
    """
    matrix = scores.detach() if isinstance(scores, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(scores))
    if matrix.ndim != 2:
        raise ValueError(f"scores must be 2-D [Q, M], got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        matrix = matrix.to(torch.float64)
    _check_finite(matrix, "scores")
    q_labels = _labels(query_labels, matrix.shape[0], "query_labels")
    g_labels = _labels(gallery_labels, matrix.shape[1], "gallery_labels")
    self_index = _self_index(query_gallery_index, matrix.shape[0], matrix.shape[1])
    source = _MatrixScores(matrix, higher_is_better, _resolve_device(device, scores))
    with torch.inference_mode():
        return _retrieve(source, q_labels, g_labels, self_index, k=k, full_ranks=full_ranks,
                         query_chunk=query_chunk, gallery_chunk=gallery_chunk, progress=None)


def _needed_k(ks: Iterable[int], map_at: Iterable[int], recall_at: Iterable[int]) -> int:
    values = [*ks, *map_at, *recall_at]
    for value in values:
        _check_k(value)
    return max(values, default=0)


def evaluate_retrieval(
    query_embeddings: ArrayLike,
    gallery_embeddings: ArrayLike,
    query_labels: ArrayLike | Sequence[int],
    gallery_labels: ArrayLike | Sequence[int],
    *,
    ks: Sequence[int] = DEFAULT_TOP_KS,
    map_at: Sequence[int] = (100,),
    recall_at: Sequence[int] = (100,),
    full_map: bool = True,
    query_gallery_index: ArrayLike | Sequence[int] | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, float | int]:
    """Top-k accuracy, MAP@k, Recall@k and (``full_map``) MAP@all, as a flat dict.

    Keys: ``top1``, ``top5``, … (fractions 0..1), ``MAP@100``, ``Recall@100``, ``MAP@all``,
    ``queries_evaluated``, ``queries_without_relevant``, ``queries_unlabelled``.
    """
    result = retrieve(query_embeddings, gallery_embeddings, query_labels, gallery_labels,
                      k=_needed_k(ks, map_at, recall_at), full_ranks=full_map,
                      query_gallery_index=query_gallery_index, query_chunk=query_chunk,
                      gallery_chunk=gallery_chunk, device=device, progress=progress)
    return result.metrics(ks, map_at, recall_at, full_map)


def evaluate_retrieval_from_scores(
    scores: ArrayLike,
    query_labels: ArrayLike | Sequence[int],
    gallery_labels: ArrayLike | Sequence[int],
    *,
    higher_is_better: bool = True,
    ks: Sequence[int] = DEFAULT_TOP_KS,
    map_at: Sequence[int] = (100,),
    recall_at: Sequence[int] = (100,),
    full_map: bool = True,
    query_gallery_index: ArrayLike | Sequence[int] | None = None,
) -> dict[str, float | int]:
    """:func:`evaluate_retrieval` from a precomputed similarity (or distance) matrix."""
    result = retrieve_from_scores(scores, query_labels, gallery_labels, higher_is_better=higher_is_better,
                                  k=_needed_k(ks, map_at, recall_at), full_ranks=full_map,
                                  query_gallery_index=query_gallery_index)
    return result.metrics(ks, map_at, recall_at, full_map)


def chunked_topk(
    query_embeddings: ArrayLike,
    gallery_embeddings: ArrayLike,
    k: int,
    *,
    query_gallery_index: ArrayLike | Sequence[int] | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores [Q, k] float32 and gallery indices [Q, k] int64 of the k most similar items.

    Ordered by (score desc, gallery index asc); the own item of each query is skipped; rows are
    padded with (-inf, -1) when fewer than k items can be ranked. Memory O(query_chunk ×
    gallery_chunk).
    """
    _check_k(k)
    queries = _embeddings(query_embeddings, "query_embeddings")
    gallery = _embeddings(gallery_embeddings, "gallery_embeddings")
    self_index = _self_index(query_gallery_index, queries.shape[0], gallery.shape[0])
    _check_chunks(query_chunk, gallery_chunk)
    source = _EmbeddingScores(queries, gallery, _resolve_device(device, query_embeddings, gallery_embeddings))
    width = min(k, gallery.shape[0])
    values_out, indices_out = [], []
    workspace = _Workspace(source.device)
    with torch.inference_mode():
        for start in range(0, queries.shape[0], query_chunk):
            rows = np.arange(start, min(start + query_chunk, queries.shape[0]))
            values, indices, _ = _scan_query_chunk(source, rows, self_index[rows], width, gallery_chunk, None,
                                                   workspace)
            values_out.append(values.cpu())
            indices_out.append(indices.cpu())
    values = torch.cat(values_out).numpy() if values_out else np.empty((0, width), dtype=np.float32)
    indices = torch.cat(indices_out).numpy() if indices_out else np.empty((0, width), dtype=np.int64)
    return _pad_topk(values, indices, self_index, k)


def relevant_ranks(
    query_embeddings: ArrayLike,
    gallery_embeddings: ArrayLike,
    query_labels: ArrayLike | Sequence[int],
    gallery_labels: ArrayLike | Sequence[int],
    *,
    query_gallery_index: ArrayLike | Sequence[int] | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    device: str | torch.device | None = None,
) -> list[np.ndarray]:
    """For every query, the ascending 1-based ranks of its relevant items in the full ranking.

    rank = 1 + #(items with a higher score) + #(items with an equal score and a lower gallery
    index), own item excluded. Unlabelled queries and queries without relevant items get an
    empty array.
    """
    result = retrieve(query_embeddings, gallery_embeddings, query_labels, gallery_labels, k=0,
                      full_ranks=True, query_gallery_index=query_gallery_index,
                      query_chunk=query_chunk, gallery_chunk=gallery_chunk, device=device)
    num_queries = len(_to_numpy(query_labels))
    out = [np.empty(0, dtype=np.int64) for _ in range(num_queries)]
    for row, query in enumerate(result.query_indices):
        out[int(query)] = result.ranks_of(row)
    return out


def evaluate_attribute_retrieval(
    query_embeddings: Mapping[str, ArrayLike],
    gallery_embeddings: Mapping[str, ArrayLike],
    query_labels: Mapping[str, ArrayLike | Sequence[int]],
    gallery_labels: Mapping[str, ArrayLike | Sequence[int]],
    *,
    ks: Sequence[int] = DEFAULT_TOP_KS,
    map_at: Sequence[int] = (100,),
    recall_at: Sequence[int] = (100,),
    full_map: bool = True,
    query_gallery_index: Mapping[str, ArrayLike | Sequence[int]] | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    device: str | torch.device | None = None,
) -> dict[str, dict]:
    """Attribute-specific retrieval (ASEN / M3-Net protocol): one retrieval per attribute.

    Each attribute has its own (attribute-conditioned) query and gallery embeddings and labels
    = that attribute's value. Returns ``{"per_attribute": {attr: metrics}, "overall": metrics}``;
    ``overall`` is the query-weighted mean, i.e. the mean over all evaluated queries of all
    attributes (as ASEN++ averages), and sums the query counts.
    """
    names = list(query_embeddings)
    for mapping, what in ((gallery_embeddings, "gallery_embeddings"), (query_labels, "query_labels"),
                          (gallery_labels, "gallery_labels")):
        if set(mapping) != set(names):
            raise ValueError(f"{what} has attributes {sorted(mapping)}, query_embeddings has {sorted(names)}")
    if query_gallery_index is not None and not set(query_gallery_index) <= set(names):
        raise ValueError(f"query_gallery_index names unknown attributes "
                         f"{sorted(set(query_gallery_index) - set(names))}")
    k = _needed_k(ks, map_at, recall_at)
    per_attribute: dict[str, dict[str, float | int]] = {}
    pooled: dict[str, list[np.ndarray]] = {}
    counts = {"queries_evaluated": 0, "queries_without_relevant": 0, "queries_unlabelled": 0}
    for name in names:
        result = retrieve(query_embeddings[name], gallery_embeddings[name], query_labels[name], gallery_labels[name],
                          k=k, full_ranks=full_map,
                          query_gallery_index=None if query_gallery_index is None else query_gallery_index.get(name),
                          query_chunk=query_chunk, gallery_chunk=gallery_chunk, device=device)
        per_attribute[name] = result.metrics(ks, map_at, recall_at, full_map)
        for metric, values in result.per_query(ks, map_at, recall_at, full_map).items():
            pooled.setdefault(metric, []).append(values)
        for key in counts:
            counts[key] += int(per_attribute[name][key])
    overall: dict[str, float | int] = {}
    for metric, parts in pooled.items():
        values = np.concatenate(parts)
        overall[metric] = float(values.sum(dtype=np.float64) / values.size) if values.size else math.nan
    overall.update(counts)
    return {"per_attribute": per_attribute, "overall": overall}
