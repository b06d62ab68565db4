"""Exact top-k under the metrics' tie rule (score descending, then gallery index ascending), shared
by the scan engine (``scan.py``) and its int8 first pass (``scan_int8.py``), which re-scores its
candidates with them."""
from __future__ import annotations

import torch


def chunk_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
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
