"""Evaluate a model on a benchmark with the papers' protocols and metric names.

- instance / category benchmarks (consumer-to-shop): ``top1 … top50`` (share of queries with a
  relevant gallery image among their first k) and ``mAP``;
- attribute benchmarks (ASEN, M3-Net): ``MAP@all``, ``MAP@100`` and ``Recall@100`` per
  attribute, and overall over all (query, attribute) pairs.

An attribute-conditioned model embeds every image once per attribute (with that attribute's
index); any other model's single embedding serves every attribute. The JSON records the command,
checkpoint, hardware and counts; next to it an ``.npz`` holds the embeddings and labels so the
numbers can be recomputed without the model (:func:`recompute_from_npz`).
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..registry import ConfigError
from .checkpoint import CheckpointError, write_json_atomic
from .embed import embed_table_attributes

TOPK = (1, 5, 10, 20, 50)
ATTRIBUTE_CUTOFF = 100
PLOT_K = 50


@dataclass
class Evaluation:
    results: dict[str, Any]  # what goes into the JSON
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # what goes into the .npz
    neighbours: dict[str, np.ndarray] = field(default_factory=dict)  # attribute -> [Q, PLOT_K] gallery rows
    benchmark: Any = None


# ---- metrics ---------------------------------------------------------------------------------
def compute_metrics(kind: str, query: np.ndarray, gallery: np.ndarray, query_labels: np.ndarray,
                    gallery_labels: np.ndarray, exclude_self: bool) -> dict[str, float]:
    """The papers' metrics for one attribute (or the instance / category label)."""
    from .. import metrics

    if kind == "attribute":
        raw = metrics.evaluate_attribute_retrieval(query, gallery, query_labels, gallery_labels,
                                                   cutoff=ATTRIBUTE_CUTOFF, exclude_self=exclude_self)
    else:
        raw = metrics.evaluate_retrieval(query, gallery, query_labels, gallery_labels, ks=TOPK,
                                         exclude_self=exclude_self)
    return {key: float(value) for key, value in raw.items()}


def _overall(kind: str, per_attribute: dict[str, dict[str, float]], evaluated: dict[str, int]) -> dict[str, float]:
    """Mean over all evaluated (query, attribute) pairs, i.e. attributes weighted by their queries."""
    total = sum(evaluated.values())
    if total == 0:
        return {}
    names = list(next(iter(per_attribute.values())))
    overall = {name: sum(per_attribute[a][name] * evaluated[a] for a in per_attribute) / total
               for name in names if name not in ("queries",)}
    if kind == "attribute":
        overall["MAP@all_mean_over_attributes"] = float(np.mean([m["MAP@all"] for m in per_attribute.values()]))
    return overall


def top_neighbours(query: np.ndarray, gallery: np.ndarray, k: int, exclude_self: bool,
                   chunk: int = 1024) -> np.ndarray:
    """[Q, min(k, G')] gallery rows by decreasing cosine (for plots); chunked to bound memory."""
    gallery_t = torch.from_numpy(np.ascontiguousarray(gallery))
    k = min(k, len(gallery) - (1 if exclude_self else 0))
    if k <= 0 or len(query) == 0:
        return np.zeros((len(query), 0), np.int64)
    rows = []
    for start in range(0, len(query), chunk):
        scores = torch.from_numpy(np.ascontiguousarray(query[start:start + chunk])) @ gallery_t.T
        if exclude_self:
            own = torch.arange(start, start + len(scores))
            scores[torch.arange(len(scores)), own] = -float("inf")
        rows.append(scores.topk(k, dim=1).indices.numpy())
    return np.concatenate(rows)


# ---- embedding a benchmark -------------------------------------------------------------------
def _attribute_indices(model: nn.Module, meta: dict[str, Any], benchmark: Any) -> dict[str, int | None]:
    if not getattr(model, "attribute_conditioned", False):
        return {attribute: None for attribute in benchmark.attributes}
    known = list(meta.get("attributes") or [])
    missing = [a for a in benchmark.attributes if a not in known]
    if missing:
        raise ConfigError(f"benchmark '{benchmark.name}' evaluates {', '.join(missing)}, which this "
                          f"attribute-conditioned model was not trained on (it knows: {', '.join(known) or 'none'})")
    return {attribute: known.index(attribute) for attribute in benchmark.attributes}


def _embed_side(model: nn.Module, table: Any, image_size: Sequence[int], indices: dict[str, int | None],
                batch_size: int, device: torch.device, num_workers: int, progress: bool, desc: str):
    wanted = sorted({i for i in indices.values() if i is not None}) or [None]
    result = embed_table_attributes(model, table, image_size, wanted, batch_size=batch_size, device=device,
                                    num_workers=num_workers, progress=progress, desc=desc)
    per_attribute = {a: (result.by_attribute[i] if i is not None else result.embeddings) for a, i in indices.items()}
    return per_attribute, result.indices, result.skipped


def _keep_rows(embeddings: dict[str, np.ndarray], kept: np.ndarray, good: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of ``embeddings`` (aligned with ``kept`` table rows) restricted to the ``good`` rows."""
    mask = np.isin(kept, good)
    return {a: e[mask] for a, e in embeddings.items()}


def evaluate_model(model: nn.Module, meta: dict[str, Any], benchmark_name: str, split: str,
                   data_root: str | Path, batch_size: int = 64, device: str | torch.device = "cpu",
                   num_workers: int = 0, progress: bool = True) -> Evaluation:
    from ..data.benchmarks import BENCHMARKS

    started = time.perf_counter()
    device = torch.device(device)
    benchmark = BENCHMARKS.build(benchmark_name, data_root=Path(data_root), split=split)
    image_size = meta["image_size"]
    indices = _attribute_indices(model, meta, benchmark)
    conditioned = any(i is not None for i in indices.values())
    query_emb, query_kept, skipped = _embed_side(model, benchmark.queries, image_size, indices, batch_size, device,
                                                 num_workers, progress, "queries")
    if benchmark.exclude_self:
        gallery_emb, gallery_kept = query_emb, query_kept
    else:
        gallery_emb, gallery_kept, gallery_skipped = _embed_side(model, benchmark.gallery, image_size, indices,
                                                                 batch_size, device, num_workers, progress, "gallery")
        skipped = skipped + gallery_skipped
    bad_queries = sorted(set(range(len(benchmark.queries))) - set(query_kept.tolist()))
    bad_gallery = sorted(set(range(len(benchmark.gallery))) - set(gallery_kept.tolist()))
    if bad_queries or bad_gallery:
        # Unreadable images leave the benchmark (with exclude_self, from both sides at once).
        good_q = np.setdiff1d(query_kept, bad_gallery if benchmark.exclude_self else [])
        good_g = np.setdiff1d(gallery_kept, bad_queries if benchmark.exclude_self else [])
        query_emb, gallery_emb = _keep_rows(query_emb, query_kept, good_q), _keep_rows(gallery_emb, gallery_kept, good_g)
        benchmark = benchmark.drop(queries=bad_queries, gallery=bad_gallery)

    kind = benchmark.kind
    per_attribute: dict[str, dict[str, float]] = {}
    evaluated: dict[str, int] = {}
    arrays: dict[str, np.ndarray] = {}
    neighbours: dict[str, np.ndarray] = {}
    for attribute in benchmark.attributes:
        q, g = query_emb[attribute], gallery_emb[attribute]
        q_labels, g_labels = benchmark.query_labels[attribute], benchmark.gallery_labels[attribute]
        evaluated[attribute] = int(benchmark.evaluable(attribute).sum())
        per_attribute[attribute] = compute_metrics(kind, q, g, q_labels, g_labels, benchmark.exclude_self)
        neighbours[attribute] = top_neighbours(q, g, PLOT_K, benchmark.exclude_self)
        if conditioned or not arrays:
            arrays[f"query_embeddings__{attribute}"] = q
            if not benchmark.exclude_self:
                arrays[f"gallery_embeddings__{attribute}"] = g
        arrays[f"query_labels__{attribute}"] = q_labels
        arrays[f"gallery_labels__{attribute}"] = g_labels
    arrays["exclude_self"] = np.array(benchmark.exclude_self)
    arrays["shared_embeddings"] = np.array(not conditioned)

    results = {
        "benchmark": benchmark.name,
        "kind": kind,
        "split": split,
        "metric_names": (["MAP@all", f"MAP@{ATTRIBUTE_CUTOFF}", f"Recall@{ATTRIBUTE_CUTOFF}"] if kind == "attribute"
                         else [f"top{k}" for k in TOPK] + ["mAP"]),
        "metrics": {"overall": _overall(kind, per_attribute, evaluated), "per_attribute": per_attribute},
        "counts": {"queries": len(benchmark.queries), "gallery": len(benchmark.gallery),
                   "evaluated_queries": evaluated, "skipped_images": len(skipped)},
        "skipped": skipped[:50],
        "model": {"name": meta["model"]["name"], "feat_dim": meta.get("feat_dim"),
                  "attribute_conditioned": conditioned, "experiment": meta.get("experiment")},
        "image_size": list(image_size),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return Evaluation(results, arrays, neighbours, benchmark)


# ---- files -----------------------------------------------------------------------------------
def hardware_description(device: str | torch.device = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    info: dict[str, Any] = {"device": str(device), "platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_results(evaluation: Evaluation, json_path: str | Path, save_embeddings: bool = True) -> Path:
    """Write the JSON (atomically) and, with ``save_embeddings``, ``<json stem>.npz`` beside it."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    results = dict(evaluation.results)
    if save_embeddings and evaluation.arrays:
        npz_path = json_path.with_suffix(".npz")
        tmp = npz_path.with_name(f".{npz_path.name}.tmp.npz")
        np.savez(tmp, **evaluation.arrays)
        tmp.replace(npz_path)
        results["embeddings_file"] = npz_path.name
    write_json_atomic(json_path, results)
    return json_path


def recompute_from_npz(npz_path: str | Path, kind: str) -> dict[str, dict[str, float]]:
    """Per-attribute metrics from a saved ``.npz`` alone (no model, no images)."""
    data = np.load(npz_path)
    exclude_self = bool(data["exclude_self"])
    attributes = [key.split("__", 1)[1] for key in data.files if key.startswith("query_labels__")]
    shared_query = next(k for k in data.files if k.startswith("query_embeddings__"))
    out = {}
    for attribute in attributes:
        q_key = f"query_embeddings__{attribute}" if f"query_embeddings__{attribute}" in data.files else shared_query
        q = data[q_key]
        g_key = q_key.replace("query_", "gallery_")
        g = q if exclude_self else data[g_key]
        out[attribute] = compute_metrics(kind, q, g, data[f"query_labels__{attribute}"],
                                         data[f"gallery_labels__{attribute}"], exclude_self)
    return out


def save_plots(evaluation: Evaluation, plots_dir: str | Path, queries_shown: int = 8, seed: int = 0) -> list[Path]:
    """Top-k accuracy curves and, per attribute, a grid of random queries with their top-5."""
    from . import plots

    benchmark = evaluation.benchmark
    plots_dir = Path(plots_dir)
    curves, written = {}, []
    rng = np.random.default_rng(seed)
    for attribute, neighbours in evaluation.neighbours.items():
        q_labels, g_labels = benchmark.query_labels[attribute], benchmark.gallery_labels[attribute]
        evaluable = benchmark.evaluable(attribute)
        if not evaluable.any() or neighbours.shape[1] == 0:
            continue
        relevant = (g_labels[neighbours] == q_labels[:, None]) & (g_labels[neighbours] >= 0)
        curves[attribute] = plots.topk_curve(relevant[evaluable])
        chosen = np.sort(rng.choice(np.flatnonzero(evaluable), size=min(queries_shown, int(evaluable.sum())),
                                    replace=False))
        values = benchmark.values.get(attribute, [])
        captions = [values[q_labels[i]] if 0 <= q_labels[i] < len(values) and benchmark.kind != "instance"
                    else "query" for i in chosen]
        written.append(plots.plot_retrieval_grid(
            [benchmark.queries.resolve(benchmark.queries[i]) for i in chosen],
            [[benchmark.gallery.resolve(benchmark.gallery[j]) for j in neighbours[i, :5]] for i in chosen],
            relevant[chosen, :5], plots_dir / f"top5_{_safe(attribute)}.png",
            f"{benchmark.name} ({evaluation.results['split']}), {attribute}: top-5 (green = relevant)", captions))
    if curves:
        written.insert(0, plots.plot_topk_curves(curves, plots_dir / "topk_accuracy.png",
                                                 f"{benchmark.name} ({evaluation.results['split']})"))
    return written


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def print_table(results: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    names = results["metric_names"]
    table = Table(title=f"{results['benchmark']} ({results['split']}, {results['model']['name']})")
    table.add_column("attribute" if results["kind"] == "attribute" else "label")
    table.add_column("queries", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    evaluated = results["counts"]["evaluated_queries"]
    for attribute, values in results["metrics"]["per_attribute"].items():
        table.add_row(attribute, str(evaluated.get(attribute, "")), *[f"{100 * values[n]:.2f}" for n in names])
    if len(results["metrics"]["per_attribute"]) > 1:
        overall = results["metrics"]["overall"]
        table.add_row("overall", str(sum(evaluated.values())), *[f"{100 * overall[n]:.2f}" for n in names],
                      style="bold")
    console.print(table)
    console.print("(percent)")


def evaluate(checkpoint: str | Path, benchmark_name: str, split: str, data_root: str | Path, json_out: str | Path,
             plots_dir: str | Path | None = None, batch_size: int = 64, device: str = "auto", num_workers: int = 2,
             progress: bool = True, print_results: bool = True) -> Evaluation:
    """Load a checkpoint, evaluate it, write JSON + npz (+ plots), print the table."""
    from .checkpoint import load_for_inference
    from .distributed import resolve_device

    torch_device = resolve_device(device)
    model, meta = load_for_inference(checkpoint, device=torch_device)
    evaluation = evaluate_model(model, meta, benchmark_name, split, data_root, batch_size=batch_size,
                                device=torch_device, num_workers=num_workers, progress=progress)
    evaluation.results.update({
        "checkpoint": str(checkpoint),
        "command": " ".join(["fashion-retrieval", *sys.argv[1:]]) if Path(sys.argv[0]).stem == "fashion-retrieval"
        else " ".join(sys.argv),
        "hardware": hardware_description(torch_device),
        "package_version": meta.get("package_version"),
        "git_commit": meta.get("git_commit"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    if plots_dir is not None:
        evaluation.results["plots"] = [str(p) for p in save_plots(evaluation, plots_dir)]
    write_results(evaluation, json_out)
    if print_results:
        print_table(evaluation.results)
    return evaluation


__all__ = ["Evaluation", "evaluate", "evaluate_model", "write_results", "recompute_from_npz", "save_plots",
           "print_table", "compute_metrics", "CheckpointError"]
