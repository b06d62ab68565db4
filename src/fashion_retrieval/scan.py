"""The chunked scan behind :mod:`fashion_retrieval.metrics`: top-k and ranks without a [Q, M] matrix.

Scores are produced one (query chunk × gallery chunk) block at a time, so memory is
O(query_chunk × gallery_chunk) plus the outputs. What the scan computes is defined in
:mod:`fashion_retrieval.metrics` (ranking, tie rule, self exclusion, relevance); this module only
decides how: a torch scan (``mm`` + a grouped ``topk``, any device), FAISS's k-NN kernel for a
top-k-only scan on the CPU where a one-off timing finds it faster, and an int8 first pass with
exact re-scoring (:mod:`fashion_retrieval.scan_int8`).
Nothing here builds metrics; :func:`scan` returns a :class:`ScanOutput` that ``metrics`` wraps.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .topk import chunk_candidates as _chunk_candidates
from .topk import ordered_topk as _ordered_topk

ProgressCallback = Callable[[int, int], None]


def check_chunks(query_chunk: int, gallery_chunk: int) -> None:
    if query_chunk < 1 or gallery_chunk < 1:
        raise ValueError(f"chunk sizes must be ≥ 1, got query_chunk={query_chunk}, gallery_chunk={gallery_chunk}")


def labelled_rows(labels: np.ndarray) -> np.ndarray:
    """Rows with a label: a label ≥ 0, or for value sets ([N, W], -1 padded) at least one value."""
    return labels >= 0 if labels.ndim == 1 else (labels >= 0).any(axis=1)


def relevant_counts(query_labels: np.ndarray, gallery_labels: np.ndarray, self_index: np.ndarray) -> np.ndarray:
    """Relevant gallery items per query: same label (for value sets: at least one value in
    common), gallery label ≥ 0, own item not counted."""
    if query_labels.ndim == 2:
        return _shared_value_counts(query_labels, gallery_labels, self_index)
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

class EmbeddingScores:
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
        self._int8: object = None  # the int8 pass's packed gallery, made on first use (False: not usable)

    def int8_gallery(self):
        """The gallery packed for the int8 pass, or None where that pass does not apply."""
        from . import scan_int8

        if self._int8 is None:
            usable = (scan_int8.INT8_SCAN and self.device.type == "cpu" and self.num_gallery >= scan_int8.MIN_GALLERY
                      and self.queries.shape[0] >= scan_int8.MIN_QUERIES and scan_int8.available())
            self._int8 = scan_int8.Int8Gallery(self.gallery) if usable else False
        return self._int8 or None

    def query_block(self, rows: np.ndarray) -> torch.Tensor:
        return self.queries[torch.from_numpy(rows).to(self.queries.device)].to(self.device)

    def scores(self, block: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        return torch.mm(block, self.gallery[start:stop].T, out=out)


class MatrixScores:
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


def resolve_device(device: str | torch.device | None, *tensors: object) -> torch.device:
    """The device asked for, else that of the first torch tensor among ``tensors``, else the CPU."""
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


def _gallery_by_label(gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gallery index, label) of every labelled gallery entry, sorted by label (stable); a gallery
    item with a value set has one entry per value."""
    if gallery_labels.ndim == 1:
        labelled = np.flatnonzero(gallery_labels >= 0)
        order = labelled[np.argsort(gallery_labels[labelled], kind="stable")]
        return order, gallery_labels[order]
    rows, columns = np.nonzero(gallery_labels >= 0)
    values = gallery_labels[rows, columns]
    by_value = np.argsort(values, kind="stable")
    return rows[by_value], values[by_value]


def _shared_value_pairs(label_sets: np.ndarray, self_index: np.ndarray, gallery_order: np.ndarray,
                        sorted_gallery_labels: np.ndarray) -> _Positives:
    """:func:`_positive_pairs` for value sets ([n, W], -1 padded): the pairs of each of a query's
    values, a gallery item that shares several of them counted once."""
    rows, columns = np.nonzero(label_sets >= 0)
    per_value = _positive_pairs(label_sets[rows, columns], self_index[rows], gallery_order, sorted_gallery_labels)
    query_rows = rows[per_value.rows]
    n_rows = max(label_sets.shape[0], 1)
    # one key per (gallery, query row): unique drops the repeats and sorts by gallery index
    keys = np.unique(per_value.gallery * n_rows + query_rows)
    return _Positives(keys % n_rows, keys // n_rows)


def _positives(labels: np.ndarray, self_index: np.ndarray, gallery_order: np.ndarray,
               sorted_gallery_labels: np.ndarray) -> _Positives:
    if labels.ndim == 1:
        return _positive_pairs(labels, self_index, gallery_order, sorted_gallery_labels)
    return _shared_value_pairs(labels, self_index, gallery_order, sorted_gallery_labels)


SHARED_VALUE_PAIRS_PER_CHUNK = 1 << 22


def _shared_value_counts(query_labels: np.ndarray, gallery_labels: np.ndarray, self_index: np.ndarray) -> np.ndarray:
    """Relevant counts for value sets: per query the gallery items sharing a value, own item
    excluded. Pairs are listed a chunk of queries at a time, a chunk ending before its pairs
    (counted per value, before repeats are dropped) pass SHARED_VALUE_PAIRS_PER_CHUNK."""
    gallery_order, sorted_labels = _gallery_by_label(gallery_labels)
    rows, columns = np.nonzero(query_labels >= 0)
    values = query_labels[rows, columns]
    per_value = (np.searchsorted(sorted_labels, values, side="right")
                 - np.searchsorted(sorted_labels, values, side="left"))
    bound = np.bincount(rows, weights=per_value, minlength=query_labels.shape[0])
    counts = np.zeros(query_labels.shape[0], dtype=np.int64)
    start = 0
    while start < query_labels.shape[0]:
        cumulative = np.cumsum(bound[start:])
        stop = start + max(1, int(np.searchsorted(cumulative, SHARED_VALUE_PAIRS_PER_CHUNK, side="right")))
        pairs = _shared_value_pairs(query_labels[start:stop], self_index[start:stop], gallery_order, sorted_labels)
        counts[start:stop] = np.bincount(pairs.rows, minlength=stop - start)
        start = stop
    return counts


def _mask_self(scores: torch.Tensor, self_rows: torch.Tensor, self_columns: torch.Tensor) -> None:
    if self_rows.numel():
        scores[self_rows, self_columns] = -math.inf


def _self_in_chunk(self_index: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    inside = (self_index >= start) & (self_index < stop)
    rows = torch.nonzero(inside).squeeze(1)
    return rows, self_index[rows] - start


# "auto": FAISS's kernel where a one-off timing on this machine finds it faster than the torch
# scan (large scans only); True: wherever it applies; False: never (tests compare the paths)
FAISS_SCAN: bool | str = "auto"
CALIBRATE_ABOVE = 1 << 22  # query × gallery pairs of a chunk below which "auto" takes FAISS untimed
CALIBRATION_SHAPE = (1024, 8192)  # queries × gallery of the timed problem (about 0.3 s for both kernels)
_faiss_faster: dict[tuple[int, int, int], bool] = {}


def _best_of_two(run: Callable[[], object]) -> float:
    times = []
    for _ in range(2):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _faiss_is_faster(dim: int, k: int) -> bool:
    """Whether FAISS's k-NN kernel beats ``mm`` + :func:`chunk_candidates` at this dimension and
    k on this machine, timed once per process on random unit vectors (best of two each).

    Which one wins depends on the host: FAISS's fused product + heap took 2.72 CPU s against
    4.10 for ``mm`` + ``topk`` at 2·10⁴ × 2·10⁴ on an AMD EPYC, while on a Xeon with AMX the
    same FAISS call took twice as long as ``mm`` + the grouped top-k (docs/performance.md).
    """
    import faiss

    key = (dim, k, torch.get_num_threads())
    if key not in _faiss_faster:
        faiss.omp_set_num_threads(torch.get_num_threads())  # both kernels on the scan's threads
        generator = torch.Generator().manual_seed(0)
        n_queries, n_gallery = CALIBRATION_SHAPE
        queries = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=generator), dim=1)
        gallery = torch.nn.functional.normalize(torch.randn(n_gallery, dim, generator=generator), dim=1)
        buffer = torch.empty(n_queries, n_gallery)
        queries_np, gallery_np = queries.numpy(), gallery.numpy()

        torch_s = _best_of_two(lambda: _chunk_candidates(torch.mm(queries, gallery.T, out=buffer), k))
        faiss_s = _best_of_two(lambda: faiss.knn(queries_np, gallery_np, k + 2, faiss.METRIC_INNER_PRODUCT))
        _faiss_faster[key] = faiss_s < torch_s
    return _faiss_faster[key]


def _faiss_topk(source, rows: np.ndarray, self_index: np.ndarray, k: int):
    """The top-``k`` of a query chunk by FAISS's k-NN kernel, or None where it does not apply.

    FAISS fuses the matrix product with a heap per query, so it never writes the score block
    that ``torch.topk`` then reads again; whether that pays depends on the host
    (:func:`_faiss_is_faster`). It is asked for k+2 (the
    query's own item may be among them); its choice among equal scores is arbitrary, so the
    candidates are ordered by (score desc, index asc) and the rows where the k-th and
    (k+1)-th scores are equal are returned as ``ties`` for the exact scan, which applies the
    tie rule. Only for embeddings on the CPU, without the rank pass (which needs the scores).
    """
    if not FAISS_SCAN or not isinstance(source, EmbeddingScores) or source.device.type != "cpu" or k == 0 \
            or source.num_gallery < k + 2:
        return None
    try:
        import faiss
    except ImportError:
        return None
    if FAISS_SCAN == "auto" and rows.size * source.num_gallery >= CALIBRATE_ABOVE \
            and not _faiss_is_faster(source.gallery.shape[1], k):
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


@dataclass(frozen=True)
class ScanOutput:
    """What one scan found, for the evaluated queries (``evaluated``, ascending) only.

    ``topk_values`` / ``topk_indices`` are [E, k], ordered by (score desc, gallery index asc),
    padded with (-inf, -1); ``n_relevant_all`` counts relevant items of every query (own item
    excluded); ``relevant_ranks`` holds, query after query, the ascending 1-based ranks of the
    relevant items (None without the rank pass).
    """

    evaluated: np.ndarray
    topk_values: np.ndarray
    topk_indices: np.ndarray
    n_relevant_all: np.ndarray
    relevant_ranks: np.ndarray | None


def scan(source, query_labels: np.ndarray, gallery_labels: np.ndarray, self_index: np.ndarray, *,
         k: int, full_ranks: bool, query_chunk: int, gallery_chunk: int,
         progress: ProgressCallback | None = None) -> ScanOutput:
    """Rank the gallery for every labelled query with a relevant item: top-k, and (``full_ranks``)
    the rank of every relevant item, one query chunk at a time. Labels are [N] ids, or value sets
    [N, W] (-1 padded) on both sides, where relevant means sharing at least one value."""
    if k < 0:
        raise ValueError(f"k must be ≥ 0, got {k}")
    check_chunks(query_chunk, gallery_chunk)
    n_relevant_all = relevant_counts(query_labels, gallery_labels, self_index)
    labelled = labelled_rows(query_labels)
    evaluated = np.flatnonzero(labelled & (n_relevant_all > 0))
    gallery_order, sorted_gallery_labels = _gallery_by_label(gallery_labels)
    width = min(k, source.num_gallery)

    top_values, top_indices, rank_values = [], [], []
    workspace = _Workspace(source.device)
    bounds = (_rank_chunk_bounds(n_relevant_all[evaluated], query_chunk) if full_ranks
              else range(0, evaluated.size, query_chunk))
    for chunk_start, chunk_stop in itertools.pairwise([*bounds, evaluated.size]):
        rows = evaluated[chunk_start:chunk_stop]
        chunk_self = self_index[rows]
        if full_ranks:
            positives = _positives(query_labels[rows], chunk_self, gallery_order, sorted_gallery_labels)
            values, indices, positive_scores = _scan_query_chunk(source, rows, chunk_self, width, gallery_chunk,
                                                                 positives, workspace)
            rank_values.append(_count_ranks(source, rows, chunk_self, gallery_chunk, positives, positive_scores,
                                            workspace))
        else:
            values, indices = _topk_query_chunk(source, rows, chunk_self, width, gallery_chunk, workspace)
        top_values.append(values.cpu())
        top_indices.append(indices.cpu())
        if progress is not None:
            progress(chunk_stop, evaluated.size)

    topk_values = (torch.cat(top_values).numpy() if top_values else np.empty((0, width), dtype=np.float32))
    topk_indices = (torch.cat(top_indices).numpy() if top_indices else np.empty((0, width), dtype=np.int64))
    topk_values, topk_indices = _pad_topk(topk_values, topk_indices, self_index[evaluated], k)
    relevant_ranks = None
    if full_ranks:
        relevant_ranks = (np.concatenate(rank_values) if rank_values else np.empty(0, dtype=np.int64)).astype(np.int64)
    return ScanOutput(evaluated.astype(np.int64), topk_values, topk_indices, n_relevant_all, relevant_ranks)


def topk_scan(source, self_index: np.ndarray, k: int, *, query_chunk: int, gallery_chunk: int):
    """Scores [Q, k] float32 and gallery indices [Q, k] int64 of every query's k best items, in
    ranking order, own item skipped, padded with (-inf, -1)."""
    check_chunks(query_chunk, gallery_chunk)
    width = min(k, source.num_gallery)
    values_out, indices_out = [], []
    workspace = _Workspace(source.device)
    num_queries = self_index.shape[0]
    for start in range(0, num_queries, query_chunk):
        rows = np.arange(start, min(start + query_chunk, num_queries))
        values, indices = _topk_query_chunk(source, rows, self_index[rows], width, gallery_chunk, workspace)
        values_out.append(values.cpu())
        indices_out.append(indices.cpu())
    values = torch.cat(values_out).numpy() if values_out else np.empty((0, width), dtype=np.float32)
    indices = torch.cat(indices_out).numpy() if indices_out else np.empty((0, width), dtype=np.int64)
    return _pad_topk(values, indices, self_index, k)


def _topk_query_chunk(source, rows: np.ndarray, self_index: np.ndarray, k: int, gallery_chunk: int,
                      workspace: "_Workspace") -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of one query chunk by the fastest exact path that applies: the int8 pass with
    float32 re-scoring (:mod:`fashion_retrieval.scan_int8`; its unproven queries go on below),
    FAISS's k-NN kernel on the CPU (queries whose k-th place is tied go through the torch scan,
    which applies the tie rule), else the torch scan."""
    int8 = source.int8_gallery() if isinstance(source, EmbeddingScores) and k > 0 else None
    found = int8.topk(source.query_block(rows), self_index, k) if int8 is not None else None
    if found is not None:
        values, indices, redo = found
        if redo.size:
            exact_values, exact_indices = _exact_topk_query_chunk(source, rows[redo], self_index[redo], k,
                                                                  gallery_chunk, workspace)
            values[torch.from_numpy(redo)] = exact_values
            indices[torch.from_numpy(redo)] = exact_indices
        return values, indices
    return _exact_topk_query_chunk(source, rows, self_index, k, gallery_chunk, workspace)


def _exact_topk_query_chunk(source, rows: np.ndarray, self_index: np.ndarray, k: int, gallery_chunk: int,
                            workspace: "_Workspace") -> tuple[torch.Tensor, torch.Tensor]:
    faiss_topk = _faiss_topk(source, rows, self_index, k)
    if faiss_topk is None:
        values, indices, _ = _scan_query_chunk(source, rows, self_index, k, gallery_chunk, None, workspace)
        return values, indices
    values, indices, ties = faiss_topk
    if ties.size:
        exact_values, exact_indices, _ = _scan_query_chunk(source, rows[ties], self_index[ties], k,
                                                           gallery_chunk, None, workspace)
        values[torch.from_numpy(ties)] = exact_values
        indices[torch.from_numpy(ties)] = exact_indices
    return values, indices


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

