"""The exact top-k of a query chunk from an int8 first pass and float32 re-scoring of a few candidates.

An int8 matrix product (oneDNN, VNNI) runs about 5× faster than the float32 one on the CPUs we
measured, but its scores are approximate. It is used only to pick candidates, with a rigorous
bound, and the candidates are re-scored in float32, so the result is the float32 ranking exactly:

* every vector is quantized per row (queries: to 127 / max |q|, gallery: scale ``c / E_g``), and
  the error of an approximate score is bounded by Cauchy–Schwarz:
  ``|s − ŝ| ≤ ‖e_q‖·max‖g‖ + ‖q̂‖·max‖e_g‖`` (+ float32 rounding of the re-scoring) =: B;
* with T̃ the k-th best approximate score, every item of the exact top-k (and every item tied
  with its k-th place) has ŝ ≥ T̃ − 2B; the pass keeps the items with ŝ ≥ t for a per-query
  threshold t that it then proves low enough (≥ k kept items with ŝ ≥ t + 2B, so T̃ ≥ t + 2B);
  a query whose proof fails goes to the exact scan;
* the threshold is applied inside the int8 product, which writes one byte per score
  (``round((ŝ − t) / step)`` clamped to 0..255): the per-query ``−t`` rides in extra columns of
  the query (the gallery side holds the same value ``c`` there for every item), so only a
  nonzero test over bytes remains;
* the kept pairs are pruned with the final T̃ bound, re-scored with ``torch.sparse.sampled_addmm``
  one cache-sized gallery block at a time, and ordered by (score desc, gallery index asc).

``available()`` checks once, on extreme values, that the int8 kernel computes exactly what this
relies on (int32 accumulation without the int16 saturation of pre-VNNI kernels, the rounding of
the byte output); where it does not, or where oneDNN is missing, the exact scans run instead.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .topk import chunk_candidates as _chunk_candidates
from .topk import ordered_topk as _ordered_topk

INT8_SCAN = True  # False: never use the int8 pass (tests compare with the exact scans)
MIN_GALLERY = 32768  # below this, or with fewer queries, FAISS's exact k-NN was as fast or faster
MIN_QUERIES = 16384  # (packing the gallery costs about as much as scanning it for a few thousand queries)
EXTRA_COLUMNS = 16  # int8 columns that carry the per-query threshold (|threshold| ≤ 16·c)
GALLERY_BLOCK = 4096  # rows per int8 block; also the re-scoring block (cache-sized)
SAMPLE_MIN, SAMPLE_MAX = 2048, 16384  # gallery sample that estimates each query's k-th score
TARGET_RANK = 2.0  # the threshold aims at the (TARGET_RANK·k)-th score: rarely too high, few extras
LEVELS = 255  # byte output: 1..255 above the threshold, 0 below
SLACK = 0.01  # output units allowed for the float rounding of the kernel's requantization
PAIR_BUDGET = 64  # kept pairs per query and per k before a chunk gives up (dense scores)…
PAIR_FLOOR = 4096  # …but never fewer than this many per query

_available: bool | None = None


def available() -> bool:
    """Whether oneDNN's int8 product computes exactly what the bound relies on (checked once)."""
    global _available
    if _available is None:
        try:
            _available = _probe()
        except Exception:  # a missing op or an unsupported CPU: the exact scans run
            _available = False
    return _available


def _probe() -> bool:
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return False
    rng = np.random.default_rng(0)
    n, m, d = 16, 24, 64
    x = rng.integers(1, 256, (n, d)).astype(np.int64)
    x[:4] = 255  # all-extreme rows: u8·s8 pairs that saturate int16 on pre-VNNI kernels
    w = rng.integers(-127, 128, (m, d)).astype(np.int64)
    w[:4] = 127
    w_scale = rng.uniform(0.5, 2.0, m) * 1e-3
    exact = ((x - 128) @ w.T) * (1 / 127) * w_scale[None, :]
    out_scale = float(np.abs(exact).max()) / 200
    packed = torch.ops.onednn.qlinear_prepack(torch.from_numpy(w).to(torch.int8), None)
    scales = torch.from_numpy(w_scale).float()
    zeros = torch.zeros(m, dtype=torch.int64)
    qx = torch.from_numpy(x).to(torch.uint8)
    as_float = torch.ops.onednn.qlinear_pointwise(qx, 1 / 127, 128, packed, scales, zeros, None, 1.0, 0,
                                                  torch.float32, "none", [], "").double().numpy()
    as_byte = torch.ops.onednn.qlinear_pointwise(qx, 1 / 127, 128, packed, scales, zeros, None, out_scale, 0,
                                                 torch.uint8, "none", [], "").double().numpy()
    expected_byte = np.clip(exact / out_scale, 0, LEVELS)
    return (np.allclose(as_float, exact, rtol=1e-5, atol=1e-9)
            and bool(np.all(np.abs(as_byte - expected_byte) <= 0.5 + SLACK)))


def _sparse_csr(crow: torch.Tensor, columns: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(crow, columns, torch.zeros(columns.numel()), size=shape,
                                       check_invariants=False)


class Int8Gallery:
    """The gallery quantized and packed once for the int8 pass (about M × (D + 16) bytes)."""

    def __init__(self, gallery: torch.Tensor):
        gallery = gallery.contiguous()
        self.gallery = gallery
        self.num_gallery, self.dim = gallery.shape
        row_max = gallery.abs().amax(dim=1).double()
        top = float(row_max.max()) if self.num_gallery else 0.0
        nonzero = row_max[row_max > 0]
        # c: the value every gallery row holds in the threshold columns, E_g · scale_g = c, E_g ≤ 127
        self.c = max(float(nonzero.min()), top / 32) if nonzero.numel() else 1.0
        levels = torch.where(row_max > 0, torch.floor(127 * self.c / row_max.clamp_min(1e-300)),
                             torch.full_like(row_max, 127)).clamp(1, 127)
        scale = (self.c / levels).float()
        # E_g · scale_g differs from c by float32 rounding only: relative, bounded in topk
        self.c_deviation = float(((levels * scale.double()) / self.c - 1).abs().max()) if self.num_gallery else 0.0
        sample_size = min(self.num_gallery, max(SAMPLE_MIN, min(SAMPLE_MAX, self.num_gallery // 16)))
        self.sample = torch.arange(sample_size, dtype=torch.int64) * self.num_gallery // sample_size
        self.sample_position = torch.full((self.num_gallery,), -1, dtype=torch.int64)
        self.sample_position[self.sample] = torch.arange(sample_size)
        sample_weights = torch.empty(sample_size, self.dim + EXTRA_COLUMNS, dtype=torch.int8)
        self.error_max = self.norm_max = 0.0
        self.blocks = []
        for start in range(0, self.num_gallery, GALLERY_BLOCK):  # block by block: float64 temporaries stay small
            stop = min(start + GALLERY_BLOCK, self.num_gallery)
            rows, block_scale = gallery[start:stop], scale[start:stop]
            quantized = torch.round(rows / block_scale[:, None]).clamp_(-127, 127)
            residual = rows.double() - block_scale.double()[:, None] * quantized.double()
            self.error_max = max(self.error_max, float(residual.norm(dim=1).max()))
            self.norm_max = max(self.norm_max, float(rows.double().norm(dim=1).max()))
            padded = -(-(stop - start) // 8) * 8  # byte output viewed as int64 words
            weights = torch.zeros(padded, self.dim + EXTRA_COLUMNS, dtype=torch.int8)
            weights[:stop - start, :self.dim] = quantized.to(torch.int8)
            weights[:stop - start, self.dim:] = levels[start:stop, None].to(torch.int8)
            padded_scale = torch.ones(padded)
            padded_scale[:stop - start] = block_scale
            in_sample = self.sample_position[start:stop]
            sample_weights[in_sample[in_sample >= 0]] = weights[:stop - start][in_sample >= 0]
            # padding rows are zero, threshold columns included: their byte is always 0
            self.blocks.append((start, stop, torch.ops.onednn.qlinear_prepack(weights, None), padded_scale,
                                torch.zeros(padded, dtype=torch.int64)))
        self.sample_packed = torch.ops.onednn.qlinear_prepack(sample_weights, None)
        self.sample_scale = scale[self.sample].contiguous()

    def topk(self, queries: torch.Tensor, self_index: np.ndarray, k: int):
        """``(values [n, k], gallery indices [n, k], rows to redo exactly)``, or None when the
        scores are too dense for the pass to pay (the caller then scans exactly)."""
        n, dim = queries.shape
        own = torch.from_numpy(self_index)
        row_max = queries.abs().amax(dim=1)
        redo = row_max == 0  # an all-zero query ties every item: the exact scan orders it
        query_scale = torch.where(redo, torch.ones_like(row_max), 1 / row_max)
        scaled = queries * query_scale[:, None]  # |scaled| ≤ 1: the activation step is 1/127
        quantized = torch.round(scaled * 127).clamp_(-127, 127)
        scaled64 = scaled.double()
        error = (scaled64 - quantized.double() / 127).norm(dim=1)
        # in scaled units (score × query_scale): quantization of both sides, the rounding of the
        # scaling itself, and the float32 re-scoring (γ_D ‖q‖‖g‖ with γ_D = D·2⁻²⁴ / (1 − D·2⁻²⁴))
        gamma = dim * 2.0**-24 / (1 - dim * 2.0**-24)
        scaled_norm = scaled64.norm(dim=1)
        bound = (error * self.norm_max + (quantized.double() / 127).norm(dim=1) * self.error_max
                 + (2.0**-23 + gamma) * scaled_norm * self.norm_max + 1e-12)

        activations = torch.empty(n, dim + EXTRA_COLUMNS, dtype=torch.uint8)
        activations[:, :dim] = (quantized + 128).to(torch.uint8)
        activations[:, dim:] = 128  # threshold columns off for the sample
        sample = torch.ops.onednn.qlinear_pointwise(activations, 1 / 127, 128, self.sample_packed, self.sample_scale,
                                                    torch.zeros(self.sample.numel(), dtype=torch.int64), None,
                                                    1.0, 0, torch.float32, "none", [], "")
        own_in_sample = self.sample_position[own.clamp_min(0)]
        has_own = (own >= 0) & (own_in_sample >= 0)
        sample[has_own.nonzero().squeeze(1), own_in_sample[has_own]] = -math.inf
        usable = self.sample.numel() - int(has_own.any())
        if usable < k:
            return None
        rank = k if self.sample.numel() == self.num_gallery else math.ceil(TARGET_RANK * k * usable / self.num_gallery)
        estimate = torch.topk(sample, min(rank, usable), dim=1).values[:, -1].double()

        step = 6 * float(bound.max()) / LEVELS  # the byte output spans about 6 bounds above the threshold
        wanted = estimate - 2 * bound - 2 * step
        # threshold columns: integer A per query with A·c/127 = −threshold; ceil keeps it ≤ wanted
        limit = 127 * EXTRA_COLUMNS
        columns_value = torch.ceil(-wanted * 127 / self.c)
        redo |= columns_value > limit  # a threshold too far below zero to carry
        columns_value = columns_value.clamp(-limit, limit)
        threshold = -columns_value * self.c / 127
        magnitude = columns_value.abs().long()
        base, extra = magnitude // EXTRA_COLUMNS, magnitude % EXTRA_COLUMNS
        spread = base[:, None] + (torch.arange(EXTRA_COLUMNS)[None, :] < extra[:, None]).long()
        activations[:, dim:] = (torch.sign(columns_value).long()[:, None] * spread + 128).to(torch.uint8)

        budget = n * max(PAIR_BUDGET * k, PAIR_FLOOR)
        kept, total = [], 0
        for start, stop, packed, scale, zeros in self.blocks:
            out = torch.ops.onednn.qlinear_pointwise(activations, 1 / 127, 128, packed, scale, zeros, None,
                                                     step, 0, torch.uint8, "none", [], "")
            words = torch.nonzero(out.view(torch.int64))
            if not words.numel():
                kept.append(None)
                continue
            bytes_ = out.view(n, -1, 8)[words[:, 0], words[:, 1]]
            hits = torch.nonzero(bytes_)
            rows = words[hits[:, 0], 0]
            columns = words[hits[:, 0], 1] * 8 + hits[:, 1]
            values = bytes_[hits[:, 0], hits[:, 1]].long()
            if bool(((own >= start) & (own < stop)).any()):  # a query's own item is never a candidate
                other = own[rows] != columns + start
                rows, columns, values = rows[other], columns[other], values[other]
            kept.append((rows, columns, values))
            total += rows.numel()
            if total > budget:
                return None

        # the k-th best byte per query (a lower bound of T̃) and the proof that t was low enough
        histogram = torch.zeros(n * (LEVELS + 1), dtype=torch.int64)
        for part in kept:
            if part is not None:
                histogram += torch.bincount(part[0] * (LEVELS + 1) + part[2], minlength=n * (LEVELS + 1))
        at_least = histogram.view(n, LEVELS + 1).flip(1).cumsum(1).flip(1)
        kth_byte = (at_least >= k).sum(1) - 1  # -1: fewer than k kept
        # the kernel's threshold is E_g·scale_g/c times ours: off by float32 rounding of c only
        bound_bytes = (2 * bound + 2 * threshold.abs() * (self.c_deviation + 2.0**-23)) / step
        redo |= kth_byte.double() < 1 + 2 * SLACK + bound_bytes
        keep_from = torch.ceil(kth_byte.double() - 1 - 2 * SLACK - bound_bytes).long()
        keep_from[redo] = LEVELS + 1  # rows to redo keep nothing

        values_parts, index_parts = [], []
        for (start, stop, *_), part in zip(self.blocks, kept):
            if part is None:
                continue
            rows, columns, values = part
            keep = values >= keep_from[rows]
            rows, columns = rows[keep], columns[keep]
            if not rows.numel():
                continue
            counts = torch.bincount(rows, minlength=n)
            crow = torch.zeros(n + 1, dtype=torch.int64)
            torch.cumsum(counts, 0, out=crow[1:])
            matrix = _sparse_csr(crow, columns, (n, stop - start))
            scores = torch.sparse.sampled_addmm(matrix, queries, self.gallery[start:stop].T, beta=0.0).values()
            slot = torch.arange(rows.numel()) - crow[rows]
            width = int(counts.max())
            block_values = torch.full((n, width), -math.inf)
            block_indices = torch.full((n, width), -1, dtype=torch.int64)
            block_values[rows, slot] = scores
            block_indices[rows, slot] = columns + start
            values_parts.append(block_values)
            index_parts.append(block_indices)
        if not values_parts:
            return None
        # columns run in gallery order across blocks: the tie rule holds by column
        values, columns = _chunk_candidates(torch.cat(values_parts, 1), k)
        indices = torch.cat(index_parts, 1).gather(1, columns)
        values, indices = _ordered_topk(values, indices, k)
        return values, indices, np.flatnonzero(redo.numpy())
