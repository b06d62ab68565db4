"""Retrieval metrics of the fashion-retrieval papers: definitions, the result container, the API.

A gallery of 10^6 items and 10^5 queries never needs the [Q, M] score matrix in memory: the
chunked scan in :mod:`fashion_retrieval.scan` produces the top-k and the ranks block by block
(memory O(query_chunk × gallery_chunk) plus the outputs); this module says what is computed.

Definitions (also in docs/metrics.md):

* similarity is the dot product of float32 embeddings (L2-normalise first for cosine); a
  precomputed similarity or distance matrix is accepted for small cases;
* the ranking of one query sorts the gallery by similarity, highest first; **ties are broken by
  gallery order** (lower gallery index first); the query's own gallery item
  (``query_gallery_index``) is removed from the ranking;
* a gallery item is relevant when its label equals the query's label; a gallery label < 0 is
  never relevant (the item stays in the ranking as a distractor); a query label < 0 means the
  query is not evaluated;
* labels may instead be value sets, an int array [N, W] whose row lists an item's values padded
  with -1 (a multi-label attribute: DeepFashion's texture, fabric, …): a gallery item is then
  relevant when it shares at least one value with the query, and a row without a value is
  unlabelled. 1-D labels take the single-label path, unchanged;
* ``top{k}``: fraction of queries with at least one relevant item in the first k;
* ``MAP@k``: sum of precision@i over relevant positions i ≤ k, divided by min(k, n_relevant);
* ``Recall@k``: relevant items in the first k divided by n_relevant;
* ``MAP@all``: mean over queries of AP = mean over the relevant items of precision at the
  item's rank, over the full ranking;
* a query without any relevant item is left out of every mean and counted in
  ``queries_without_relevant``; ``queries_evaluated`` counts the others.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from . import scan as _scan

ArrayLike = np.ndarray | torch.Tensor
ProgressCallback = Callable[[int, int], None]

DEFAULT_TOP_KS: tuple[int, ...] = (1, 5, 10, 20, 30, 40, 50)
DEFAULT_QUERY_CHUNK = 1024
DEFAULT_GALLERY_CHUNK = 32768

__all__ = [
    "DEFAULT_TOP_KS",
    "MetricSpec",
    "RetrievalResult",
    "attribute_metrics",
    "chunked_topk",
    "evaluate_attribute_retrieval",
    "evaluate_retrieval",
    "evaluate_retrieval_from_scores",
    "relevant_ranks",
    "retrieve",
    "retrieve_attributes",
    "retrieve_from_scores",
]


def _check_k(k: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


@dataclass(frozen=True)
class MetricSpec:
    """Which metrics to compute: ``top{k}`` for k in ``top_k``, ``MAP@k`` for k in ``map_at``,
    ``Recall@k`` for k in ``recall_at`` and, with ``full_map``, ``MAP@all`` (which needs the
    rank of every relevant item: a second pass over the gallery)."""

    top_k: tuple[int, ...] = DEFAULT_TOP_KS
    map_at: tuple[int, ...] = (100,)
    recall_at: tuple[int, ...] = (100,)
    full_map: bool = True

    def __post_init__(self) -> None:
        for name in ("top_k", "map_at", "recall_at"):
            values = tuple(getattr(self, name))
            for value in values:
                _check_k(value)
            object.__setattr__(self, name, tuple(int(value) for value in values))

    @property
    def needed_k(self) -> int:
        """How many top items a retrieval must keep for the cut-off metrics (0: none)."""
        return max((*self.top_k, *self.map_at, *self.recall_at), default=0)


DEFAULT_SPEC = MetricSpec()


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

    def per_query(self, spec: MetricSpec = DEFAULT_SPEC) -> dict[str, np.ndarray]:
        """Per evaluated query values (float64 [E]) of every metric of ``spec``."""
        values: dict[str, np.ndarray] = {}
        for k in spec.top_k:
            values[f"top{k}"] = self._from_topk_or_ranks(k, _hits_from_topk, _hits_from_ranks)
        for k in spec.map_at:
            values[f"MAP@{k}"] = self._from_topk_or_ranks(k, _map_from_topk, _map_from_ranks)
        for k in spec.recall_at:
            values[f"Recall@{k}"] = self._from_topk_or_ranks(k, _recall_from_topk, _recall_from_ranks)
        if spec.full_map:
            if self.relevant_ranks is None:
                raise ValueError("MAP@all needs the full ranks: retrieve with full_ranks=True")
            values["MAP@all"] = _ap_from_ranks(self.relevant_ranks, self.rank_offsets, self.n_relevant)
        return values

    def metrics(self, spec: MetricSpec = DEFAULT_SPEC) -> dict[str, float | int]:
        """Means over evaluated queries plus the query counts (NaN means when none evaluated)."""
        out: dict[str, float | int] = {}
        for name, values in self.per_query(spec).items():
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


def _labels(x: ArrayLike | Sequence[int], length: int, name: str, sets: bool = False) -> np.ndarray:
    """[N] integer labels; with ``sets`` also value sets [N, W] (-1 padded)."""
    labels = _to_numpy(x)
    if labels.ndim != 1 and not (sets and labels.ndim == 2):
        expected = "1-D [N] or value sets [N, W]" if sets else "1-D"
        raise ValueError(f"{name} must be {expected}, got shape {labels.shape}")
    if labels.shape[0] != length:
        raise ValueError(f"{name} has {labels.shape[0]} entries but there are {length} embeddings/rows")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{name} must hold integers (label < 0 = unlabelled), got {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def _label_pair(query_labels, gallery_labels, num_queries: int, num_gallery: int) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' labels, checked; when one side holds value sets the other becomes sets too."""
    q = _labels(query_labels, num_queries, "query_labels", sets=True)
    g = _labels(gallery_labels, num_gallery, "gallery_labels", sets=True)
    if q.ndim != g.ndim:
        q, g = (q if q.ndim == 2 else q[:, None]), (g if g.ndim == 2 else g[:, None])
    return q, g


def _shares_value(query_sets: np.ndarray, gallery_sets: np.ndarray, gallery_index: np.ndarray) -> np.ndarray:
    """[E, k] bool: gallery item ``gallery_index[e, j]`` has a value of query set ``query_sets[e]``
    (one query column at a time, so memory stays E × k × W)."""
    candidates = gallery_sets[gallery_index]  # [E, k, W]
    shares = np.zeros(gallery_index.shape, dtype=bool)
    for column in range(query_sets.shape[1]):
        value = query_sets[:, column][:, None, None]
        shares |= ((candidates == value) & (value >= 0)).any(axis=2)
    return shares


def _self_index(x: ArrayLike | Sequence[int] | None, num_queries: int, num_gallery: int) -> np.ndarray:
    if x is None:
        return np.full(num_queries, -1, dtype=np.int64)
    index = _labels(x, num_queries, "query_gallery_index")
    if index.size and (index.min() < -1 or index.max() >= num_gallery):
        raise ValueError(f"query_gallery_index values must lie in [-1, {num_gallery}), got "
                         f"[{index.min()}, {index.max()}]")
    return index


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def _result(output: _scan.ScanOutput, query_labels: np.ndarray, gallery_labels: np.ndarray) -> RetrievalResult:
    evaluated = output.evaluated
    n_relevant = output.n_relevant_all[evaluated]
    labelled = _scan.labelled_rows(query_labels)
    safe = np.maximum(output.topk_indices, 0)
    if query_labels.ndim == 1:
        same = gallery_labels[safe] == query_labels[evaluated][:, None]
    else:
        same = _shares_value(query_labels[evaluated], gallery_labels, safe)
    topk_relevant = (output.topk_indices >= 0) & same
    rank_offsets = None
    if output.relevant_ranks is not None:
        rank_offsets = np.concatenate([[0], np.cumsum(n_relevant)]).astype(np.int64)
    return RetrievalResult(
        query_indices=evaluated,
        topk_indices=output.topk_indices,
        topk_scores=output.topk_values,
        topk_relevant=topk_relevant,
        n_relevant=n_relevant,
        queries_without_relevant=int(np.sum(labelled & (output.n_relevant_all == 0))),
        queries_unlabelled=int(np.sum(~labelled)),
        relevant_ranks=output.relevant_ranks,
        rank_offsets=rank_offsets,
    )


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
    q itself (-1 = none), removed from its ranking. Labels are [N] ids or value sets [N, W]
    (-1 padded; relevant = shares a value, see the module docstring). ``full_ranks`` also computes the rank of
    every relevant item (for MAP@all); it costs a second pass over the gallery. Memory is
    O(query_chunk × gallery_chunk) besides the inputs, the [E, k] top-k and the relevant ranks.
    ``device`` defaults to the device of the embeddings (CPU for numpy).
    """
    queries = _embeddings(query_embeddings, "query_embeddings")
    gallery = _embeddings(gallery_embeddings, "gallery_embeddings")
    q_labels, g_labels = _label_pair(query_labels, gallery_labels, queries.shape[0], gallery.shape[0])
    self_index = _self_index(query_gallery_index, queries.shape[0], gallery.shape[0])
    source = _scan.EmbeddingScores(queries, gallery,
                                   _scan.resolve_device(device, query_embeddings, gallery_embeddings))
    with torch.inference_mode():
        output = _scan.scan(source, q_labels, g_labels, self_index, k=k, full_ranks=full_ranks,
                            query_chunk=query_chunk, gallery_chunk=gallery_chunk, progress=progress)
    return _result(output, q_labels, g_labels)


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
    q_labels, g_labels = _label_pair(query_labels, gallery_labels, matrix.shape[0], matrix.shape[1])
    self_index = _self_index(query_gallery_index, matrix.shape[0], matrix.shape[1])
    source = _scan.MatrixScores(matrix, higher_is_better, _scan.resolve_device(device, scores))
    with torch.inference_mode():
        output = _scan.scan(source, q_labels, g_labels, self_index, k=k, full_ranks=full_ranks,
                            query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    return _result(output, q_labels, g_labels)


def evaluate_retrieval(
    query_embeddings: ArrayLike,
    gallery_embeddings: ArrayLike,
    query_labels: ArrayLike | Sequence[int],
    gallery_labels: ArrayLike | Sequence[int],
    *,
    spec: MetricSpec = DEFAULT_SPEC,
    query_gallery_index: ArrayLike | Sequence[int] | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, float | int]:
    """The metrics of ``spec`` (top-k accuracy, MAP@k, Recall@k, MAP@all) as a flat dict.

    Keys: ``top1``, ``top5``, … (fractions 0..1), ``MAP@100``, ``Recall@100``, ``MAP@all``,
    ``queries_evaluated``, ``queries_without_relevant``, ``queries_unlabelled``.
    """
    result = retrieve(query_embeddings, gallery_embeddings, query_labels, gallery_labels,
                      k=spec.needed_k, full_ranks=spec.full_map, query_gallery_index=query_gallery_index,
                      query_chunk=query_chunk, gallery_chunk=gallery_chunk, device=device, progress=progress)
    return result.metrics(spec)


def evaluate_retrieval_from_scores(
    scores: ArrayLike,
    query_labels: ArrayLike | Sequence[int],
    gallery_labels: ArrayLike | Sequence[int],
    *,
    higher_is_better: bool = True,
    spec: MetricSpec = DEFAULT_SPEC,
    query_gallery_index: ArrayLike | Sequence[int] | None = None,
) -> dict[str, float | int]:
    """:func:`evaluate_retrieval` from a precomputed similarity (or distance) matrix."""
    result = retrieve_from_scores(scores, query_labels, gallery_labels, higher_is_better=higher_is_better,
                                  k=spec.needed_k, full_ranks=spec.full_map, query_gallery_index=query_gallery_index)
    return result.metrics(spec)


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
    source = _scan.EmbeddingScores(queries, gallery,
                                   _scan.resolve_device(device, query_embeddings, gallery_embeddings))
    with torch.inference_mode():
        return _scan.topk_scan(source, self_index, k, query_chunk=query_chunk, gallery_chunk=gallery_chunk)


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


def retrieve_attributes(
    query_embeddings: Mapping[str, ArrayLike],
    gallery_embeddings: Mapping[str, ArrayLike],
    query_labels: Mapping[str, ArrayLike | Sequence[int]],
    gallery_labels: Mapping[str, ArrayLike | Sequence[int]],
    *,
    spec: MetricSpec = DEFAULT_SPEC,
    k: int | None = None,
    query_gallery_index: Mapping[str, ArrayLike | Sequence[int]] | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    device: str | torch.device | None = None,
) -> dict[str, RetrievalResult]:
    """One :func:`retrieve` per attribute (ASEN / M3-Net protocol), keeping what ``spec`` needs
    (``k`` keeps more top items, e.g. for plots). Each attribute has its own (attribute-conditioned)
    query and gallery embeddings and labels = that attribute's value, or value sets [N, W] for a
    multi-label attribute (relevant = shares a value)."""
    names = list(query_embeddings)
    for mapping, what in ((gallery_embeddings, "gallery_embeddings"), (query_labels, "query_labels"),
                          (gallery_labels, "gallery_labels")):
        if set(mapping) != set(names):
            raise ValueError(f"{what} has attributes {sorted(mapping)}, query_embeddings has {sorted(names)}")
    if query_gallery_index is not None and not set(query_gallery_index) <= set(names):
        raise ValueError(f"query_gallery_index names unknown attributes "
                         f"{sorted(set(query_gallery_index) - set(names))}")
    keep = max(spec.needed_k, k or 0)
    return {
        name: retrieve(query_embeddings[name], gallery_embeddings[name], query_labels[name], gallery_labels[name],
                       k=keep, full_ranks=spec.full_map,
                       query_gallery_index=None if query_gallery_index is None else query_gallery_index.get(name),
                       query_chunk=query_chunk, gallery_chunk=gallery_chunk, device=device)
        for name in names
    }


def attribute_metrics(results: Mapping[str, RetrievalResult], spec: MetricSpec = DEFAULT_SPEC) -> dict[str, dict]:
    """``{"per_attribute": {attr: metrics}, "overall": metrics}`` of per-attribute retrievals;
    ``overall`` is the query-weighted mean, i.e. the mean over all evaluated queries of all
    attributes (as ASEN++ averages), and sums the query counts."""
    per_attribute: dict[str, dict[str, float | int]] = {}
    pooled: dict[str, list[np.ndarray]] = {}
    counts = {"queries_evaluated": 0, "queries_without_relevant": 0, "queries_unlabelled": 0}
    for name, result in results.items():
        per_attribute[name] = result.metrics(spec)
        for metric, values in result.per_query(spec).items():
            pooled.setdefault(metric, []).append(values)
        for key in counts:
            counts[key] += int(per_attribute[name][key])
    overall: dict[str, float | int] = {}
    for metric, parts in pooled.items():
        values = np.concatenate(parts)
        overall[metric] = float(values.sum(dtype=np.float64) / values.size) if values.size else math.nan
    overall.update(counts)
    return {"per_attribute": per_attribute, "overall": overall}


def evaluate_attribute_retrieval(
    query_embeddings: Mapping[str, ArrayLike],
    gallery_embeddings: Mapping[str, ArrayLike],
    query_labels: Mapping[str, ArrayLike | Sequence[int]],
    gallery_labels: Mapping[str, ArrayLike | Sequence[int]],
    *,
    spec: MetricSpec = DEFAULT_SPEC,
    query_gallery_index: Mapping[str, ArrayLike | Sequence[int]] | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    device: str | torch.device | None = None,
) -> dict[str, dict]:
    """Attribute-specific retrieval: :func:`retrieve_attributes` then :func:`attribute_metrics`.

    Returns ``{"per_attribute": {attr: metrics}, "overall": metrics}``, overall query-weighted.
    """
    results = retrieve_attributes(query_embeddings, gallery_embeddings, query_labels, gallery_labels, spec=spec,
                                  query_gallery_index=query_gallery_index, query_chunk=query_chunk,
                                  gallery_chunk=gallery_chunk, device=device)
    return attribute_metrics(results, spec)
