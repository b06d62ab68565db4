"""Evaluation figures: the top-k accuracy curve and a grid of queries with their top results.

matplotlib runs on its file-only Agg backend, so plots work on servers without a display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

CORRECT_COLOUR = "#1a9850"
WRONG_COLOUR = "#d73027"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def topk_curve(neighbour_relevant: np.ndarray, max_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``neighbour_relevant`` [Q, K] bool (is the i-th result relevant): k = 1..K and the share of
    queries with a relevant result among their first k."""
    relevant = np.asarray(neighbour_relevant, dtype=bool)
    if relevant.ndim != 2 or relevant.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    max_k = min(max_k or relevant.shape[1], relevant.shape[1])
    hit_by_k = np.logical_or.accumulate(relevant[:, :max_k], axis=1).mean(axis=0)
    return np.arange(1, max_k + 1), hit_by_k


def plot_topk_curves(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path: str | Path,
                     title: str) -> Path:
    """One line per curve name (e.g. per attribute), k on x, top-k accuracy on y."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for name, (ks, values) in curves.items():
        axes.plot(ks, values, label=name, linewidth=1.6)
    axes.set_xlabel("k")
    axes.set_ylabel("top-k accuracy")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.set_title(title)
    if len(curves) > 1:
        axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def _thumbnail(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """The image as an RGB array, or a grey tile for a file that cannot be read."""
    from ..data.images import ImageLoadError, load_rgb

    try:
        image = load_rgb(path)
    except ImageLoadError:
        return np.full((size[1], size[0], 3), 200, np.uint8)
    image.thumbnail(size)
    return np.asarray(image)


def plot_retrieval_grid(query_paths: Sequence[str | Path], result_paths: Sequence[Sequence[str | Path]],
                        correct: np.ndarray, path: str | Path, title: str,
                        query_captions: Sequence[str] | None = None) -> Path:
    """A row per query: the query, then its top results framed green (relevant) or red (not)."""
    plt = _pyplot()
    rows = len(query_paths)
    columns = 1 + max((len(r) for r in result_paths), default=0)
    figure, axes = plt.subplots(rows, columns, figsize=(1.5 * columns, 2.0 * rows), dpi=100, squeeze=False)
    thumb = (96, 128)
    for row in range(rows):
        axes[row, 0].imshow(_thumbnail(query_paths[row], thumb))
        axes[row, 0].set_title(query_captions[row] if query_captions else "query", fontsize=7)
        for column in range(1, columns):
            ax = axes[row, column]
            if column - 1 < len(result_paths[row]):
                ax.imshow(_thumbnail(result_paths[row][column - 1], thumb))
                colour = CORRECT_COLOUR if correct[row][column - 1] else WRONG_COLOUR
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(4)
                if row == 0:
                    ax.set_title(f"#{column}", fontsize=7)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
        for spine in axes[row, 0].spines.values():
            spine.set_linewidth(0.5)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
