"""Exact top-k under the metrics' tie rule (score descending, then gallery index ascending), shared
by the scan engine (``scan.py``) and its int8 first pass (``scan_int8.py``), which re-scores its
candidates with them."""
from __future__ import annotations

import torch


GROUP = 8  # columns per group of the prefilter in grouped_candidates
GROUPS_PER_K = 4  # the prefilter runs on rows with at least this many groups per k + 1


def chunk_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-``k`` set of each row under the tie rule, in no particular order.

    ``torch.topk`` returns the right values but an arbitrary choice among equal scores, so it is
    asked for k+1: when the k-th and (k+1)-th values differ no tie crosses the cut; the rare rows
    where they are equal are redone with a stable sort, which keeps the lower columns. Wide rows
    first go through :func:`grouped_candidates`, which narrows them to a few groups.
    """
    width = scores.shape[1]
    if width <= k:
        columns = torch.arange(width, device=scores.device).expand(scores.shape[0], width)
        return scores.clone(), columns  # the scores live in a reused buffer
    if k and width // GROUP >= GROUPS_PER_K * (k + 1):
        return grouped_candidates(scores, k)
    return _full_row_candidates(scores, k)


def grouped_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`chunk_candidates` through a prefilter over groups of GROUP adjacent columns.

    ``torch.topk`` over a whole row costs as much as the matrix product that made it (measured in
    docs/performance.md); the maximum of each group is one cheap pass, and the k best items lie
    in the k groups with the highest maxima unless a tie says otherwise. The proof per row:
    every column outside the kept groups scores at most the (k+1)-th group maximum, so when that
    is below the k-th kept score (and no tie sits at the cut among the kept ones) the kept
    columns hold the exact top-k. Rows without that proof (ties, -inf or NaN scores) take the
    full-row path.
    """
    rows, width = scores.shape
    groups = width // GROUP
    grouped = scores[:, :groups * GROUP].unflatten(1, (groups, GROUP))
    group_max, group_index = torch.topk(grouped.amax(dim=2), k + 1, dim=1)
    offsets = torch.arange(GROUP, device=scores.device)
    columns = (group_index[:, :k, None] * GROUP + offsets).flatten(1)
    if groups * GROUP < width:  # the last, partial group is always kept
        tail = torch.arange(groups * GROUP, width, device=scores.device)
        columns = torch.cat([columns, tail.expand(rows, -1)], dim=1)
    best, where = torch.topk(scores.gather(1, columns), k + 1, dim=1, sorted=True)
    kth = best[:, k - 1]
    proven = (group_max[:, k] < kth) & (best[:, k] < kth)
    values, columns = best[:, :k], columns.gather(1, where[:, :k])
    if not bool(proven.all()):
        redo = torch.nonzero(~proven).squeeze(1)
        values, columns = values.clone(), columns.clone()
        values[redo], columns[redo] = _full_row_candidates(scores[redo], k)
    return values, columns


def _full_row_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def ordered_topk(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
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
