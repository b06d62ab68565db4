"""Evaluate a model on a benchmark with the papers' protocols and metric names.

- instance / category benchmarks (consumer-to-shop): ``top1 … top50`` (share of queries with a
  relevant gallery image among their first k) and ``mAP``;
- attribute benchmarks (ASEN, M3-Net): ``MAP@all``, ``MAP@100`` and ``Recall@100`` per
  attribute, and overall over all (query, attribute) pairs.

An attribute-conditioned model embeds every image once per attribute (with that attribute's
index); any other model's single embedding serves every attribute. The JSON records the command,
checkpoint, hardware and counts; next to it an ``.npz`` holds the embeddings and labels so the
numbers can be recomputed without the model (:func:`recompute_from_npz`).

Test-time options (off by default; docs/metrics.md, "Test-time options", has what each gains):
``flip`` embeds every image flip-averaged (the npz then holds those embeddings);
``query_expansion`` (α-QE) and ``rerank`` (k-reciprocal) change the ranking of the embeddings,
per attribute (:mod:`fashion_retrieval.rerank`), one at a time.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .. import atomic
from ..models.base import RetrievalModel
from ..names import path_component
from ..provenance import provenance
from ..registry import ConfigError
from ..rerank import KReciprocal, QueryExpansion
from .checkpoint import CheckpointError, RunMeta
from .embed import embed_table_attributes

TOPK = (1, 5, 10, 20, 50)
ATTRIBUTE_CUTOFF = 100
PLOT_K = 50  # top-k curve and grid, from the top-k the metrics keep


@dataclass
class Evaluation:
    results: dict[str, Any]  # what goes into the JSON
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # what goes into the .npz
    # attribute -> the retrieval behind the metrics (top-k of the evaluated queries), reused by the plots
    retrievals: dict[str, Any] = field(default_factory=dict)
    benchmark: Any = None


# ---- metrics ---------------------------------------------------------------------------------
def metric_names(kind: str) -> list[str]:
    if kind == "attribute":
        return ["MAP@all", f"MAP@{ATTRIBUTE_CUTOFF}", f"Recall@{ATTRIBUTE_CUTOFF}"]
    return [f"top{k}" for k in TOPK] + ["mAP"]


def _named(kind: str, raw: dict[str, Any]) -> dict[str, float]:
    """The papers' names (mAP of consumer-to-shop = MAP over the full ranking) plus query counts."""
    out = {name: float(raw["MAP@all" if name == "mAP" else name]) for name in metric_names(kind)}
    out["queries"] = int(raw["queries_evaluated"])
    return out


def metric_spec():
    """What every evaluation computes: top-1…50, MAP@100, Recall@100 and MAP@all."""
    from ..metrics import MetricSpec

    return MetricSpec(top_k=TOPK, map_at=(ATTRIBUTE_CUTOFF,), recall_at=(ATTRIBUTE_CUTOFF,), full_map=True)


def check_test_time(query_expansion: QueryExpansion | None, rerank: KReciprocal | None) -> None:
    if query_expansion is not None and rerank is not None:
        raise ConfigError("--query-expansion and --rerank are offered one at a time (each is measured alone, "
                          "docs/metrics.md); choose one")


def _rerank_retrievals(query: dict[str, np.ndarray], gallery: dict[str, np.ndarray],
                       query_labels: dict[str, np.ndarray], gallery_labels: dict[str, np.ndarray],
                       self_index: dict[str, np.ndarray] | None, rerank: KReciprocal, spec: Any) -> dict[str, Any]:
    """Each attribute's retrieval ranked by its k-reciprocal distances."""
    from .. import metrics
    from ..rerank import k_reciprocal_distances

    found = {}
    for attribute in query:
        own = None if self_index is None else self_index[attribute]
        distances = k_reciprocal_distances(query[attribute], gallery[attribute], rerank.k1, rerank.k2, rerank.lam,
                                           query_gallery_index=own)
        found[attribute] = metrics.retrieve_from_scores(distances, query_labels[attribute], gallery_labels[attribute],
                                                        higher_is_better=False, k=max(spec.needed_k, PLOT_K),
                                                        full_ranks=spec.full_map, query_gallery_index=own)
    return found


def compute_metrics(kind: str, query: dict[str, np.ndarray], gallery: dict[str, np.ndarray],
                    query_labels: dict[str, np.ndarray], gallery_labels: dict[str, np.ndarray],
                    exclude_self: bool, retrievals: dict[str, Any] | None = None,
                    query_expansion: QueryExpansion | None = None, rerank: KReciprocal | None = None) -> dict[str, Any]:
    """``{"per_attribute": {attribute: metrics}, "overall": metrics}``; overall is the mean over
    all evaluated (query, attribute) pairs. ``exclude_self``: query i is gallery item i. Pass a
    dict as ``retrievals`` to keep each attribute's ``RetrievalResult`` (its top-k serves the plots).
    ``query_expansion`` / ``rerank``: rank with α-QE'd queries / k-reciprocal distances instead."""
    from .. import metrics

    check_test_time(query_expansion, rerank)
    self_index = {a: np.arange(len(q)) for a, q in query.items()} if exclude_self else None
    spec = metric_spec()
    if query_expansion is not None:
        from ..rerank import query_expansion as expand

        query = {a: expand(q, gallery[a], query_expansion.k, query_expansion.alpha,
                           query_gallery_index=None if self_index is None else self_index[a])
                 for a, q in query.items()}
    if rerank is not None:
        found = _rerank_retrievals(query, gallery, query_labels, gallery_labels, self_index, rerank, spec)
    else:
        found = metrics.retrieve_attributes(query, gallery, query_labels, gallery_labels, spec=spec, k=PLOT_K,
                                            query_gallery_index=self_index)
    if retrievals is not None:
        retrievals.update(found)
    raw = metrics.attribute_metrics(found, spec)
    per_attribute = {a: _named(kind, values) for a, values in raw["per_attribute"].items()}
    computed = {"overall": _named(kind, raw["overall"]), "per_attribute": per_attribute}
    if len(per_attribute) > 1:
        # Some papers report the plain mean of the attributes' numbers instead of the query-weighted one.
        computed["mean_over_attributes"] = {name: float(np.mean([m[name] for m in per_attribute.values()]))
                                            for name in metric_names(kind)}
    return computed


# ---- embedding a benchmark -------------------------------------------------------------------
def _attribute_indices(model: RetrievalModel, meta: RunMeta, benchmark: Any) -> dict[str, int | None]:
    if not model.attribute_conditioned:
        return {attribute: None for attribute in benchmark.attributes}
    known = list(model.attribute_names)
    missing = [a for a in benchmark.attributes if a not in known]
    if missing:
        raise ConfigError(f"benchmark '{benchmark.name}' evaluates {', '.join(missing)}, which this "
                          f"attribute-conditioned model was not trained on (it knows: {', '.join(known) or 'none'})")
    return {attribute: known.index(attribute) for attribute in benchmark.attributes}


def _embed_side(model: nn.Module, table: Any, image_size: Sequence[int], indices: dict[str, int | None],
                batch_size: int, device: torch.device, num_workers: int, progress: bool, desc: str,
                crop_bbox: bool = False, flip: bool = False):
    wanted = sorted({i for i in indices.values() if i is not None}) or [None]
    result = embed_table_attributes(model, table, image_size, wanted, batch_size=batch_size, device=device,
                                    num_workers=num_workers, progress=progress, desc=desc, crop_bbox=crop_bbox,
                                    flip=flip)
    per_attribute = {a: (result.by_attribute[i] if i is not None else result.embeddings) for a, i in indices.items()}
    return per_attribute, result.indices, result.skipped


def _keep_rows(embeddings: dict[str, np.ndarray], kept: np.ndarray, good: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of ``embeddings`` (aligned with ``kept`` table rows) restricted to the ``good`` rows."""
    mask = np.isin(kept, good)
    return {a: e[mask] for a, e in embeddings.items()}


def evaluate_model(model: nn.Module, meta: RunMeta, benchmark_name: str, split: str,
                   data_root: str | Path, batch_size: int = 64, device: str | torch.device = "cpu",
                   num_workers: int = 0, progress: bool = True,
                   benchmark_options: dict[str, Any] | None = None, flip: bool = False,
                   query_expansion: QueryExpansion | None = None, rerank: KReciprocal | None = None) -> Evaluation:
    """``benchmark_options``: keyword arguments of the benchmark's builder (the ``catalog``
    benchmark's catalog, columns, queries, level, attributes). ``flip``, ``query_expansion``,
    ``rerank``: the test-time options (module docstring)."""
    from ..data.benchmarks import BENCHMARKS

    check_test_time(query_expansion, rerank)  # before minutes of embedding
    started = time.perf_counter()
    device = torch.device(device)
    benchmark = BENCHMARKS.build(benchmark_name, data_root=Path(data_root), split=split, **(benchmark_options or {}))
    image_size = meta.image_size
    indices = _attribute_indices(model, meta, benchmark)
    conditioned = any(i is not None for i in indices.values())
    query_emb, query_kept, skipped = _embed_side(model, benchmark.queries, image_size, indices, batch_size, device,
                                                 num_workers, progress, "queries", benchmark.crop_bbox, flip)
    if benchmark.exclude_self:
        gallery_emb, gallery_kept = query_emb, query_kept
    else:
        gallery_emb, gallery_kept, gallery_skipped = _embed_side(model, benchmark.gallery, image_size, indices,
                                                                 batch_size, device, num_workers, progress, "gallery",
                                                                 benchmark.crop_bbox, flip)
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
    attributes = list(benchmark.attributes)
    retrievals: dict[str, Any] = {}
    embedded = time.perf_counter()
    computed = compute_metrics(kind, {a: query_emb[a] for a in attributes}, {a: gallery_emb[a] for a in attributes},
                               benchmark.query_labels, benchmark.gallery_labels, benchmark.exclude_self, retrievals,
                               query_expansion=query_expansion, rerank=rerank)
    ranked = time.perf_counter()
    test_time = {"flip": flip, "query_expansion": query_expansion.to_dict() if query_expansion else None,
                 "rerank": rerank.to_dict() if rerank else None}
    arrays: dict[str, np.ndarray] = {}
    for attribute in attributes:
        q, g = query_emb[attribute], gallery_emb[attribute]
        if conditioned or not arrays:  # one shared embedding is stored once
            arrays[f"query_embeddings__{attribute}"] = q
            if not benchmark.exclude_self:
                arrays[f"gallery_embeddings__{attribute}"] = g
        arrays[f"query_labels__{attribute}"] = benchmark.query_labels[attribute]
        arrays[f"gallery_labels__{attribute}"] = benchmark.gallery_labels[attribute]
    arrays["exclude_self"] = np.array(benchmark.exclude_self)
    arrays["kind"] = np.array(kind)
    arrays["test_time"] = np.array(json.dumps(test_time))  # recompute_from_npz ranks the same way

    results = {
        "benchmark": benchmark.name,
        "kind": kind,
        "split": split,
        "metric_names": metric_names(kind),
        "metrics": computed,
        **({"protocol": benchmark.protocol} if benchmark.protocol else {}),
        "counts": {"queries": len(benchmark.queries), "gallery": len(benchmark.gallery),
                   "skipped_images": len(skipped)},
        "skipped": skipped[:50],
        "model": {"name": meta.model.name, "feat_dim": meta.feat_dim,
                  "attribute_conditioned": conditioned, "experiment": meta.experiment},
        "image_size": list(image_size),
        "test_time": test_time,
        "seconds": round(time.perf_counter() - started, 2),
        # embedding (flip included) and ranking + metrics (query expansion or re-ranking included)
        "seconds_embedding": round(embedded - started, 2),
        "seconds_ranking": round(ranked - embedded, 2),
    }
    return Evaluation(results, arrays, retrievals, benchmark)


# ---- files -----------------------------------------------------------------------------------
def write_results(evaluation: Evaluation, json_path: str | Path, save_embeddings: bool = True) -> Path:
    """Write the JSON (atomically) and, with ``save_embeddings``, ``<json stem>.npz`` beside it."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    results = dict(evaluation.results)
    if save_embeddings and evaluation.arrays:
        npz_path = json_path.with_suffix(".npz")
        with atomic.replacing(npz_path, "wb") as handle:
            np.savez(handle, **evaluation.arrays)
        results["embeddings_file"] = npz_path.name
    atomic.write_json(json_path, results)
    return json_path


def load_npz(npz_path: str | Path) -> dict[str, Any]:
    """The saved arrays as ``{kind, exclude_self, query, gallery, query_labels, gallery_labels,
    test_time}`` (dicts keyed by attribute; a shared embedding is repeated for every attribute;
    ``test_time``: the options the evaluation ranked with, all off for older files)."""
    data = np.load(npz_path)
    exclude_self = bool(data["exclude_self"])
    attributes = [key.split("__", 1)[1] for key in data.files if key.startswith("query_labels__")]
    shared = next(k for k in data.files if k.startswith("query_embeddings__")).split("__", 1)[1]
    query, gallery = {}, {}
    for attribute in attributes:
        source = attribute if f"query_embeddings__{attribute}" in data.files else shared
        query[attribute] = data[f"query_embeddings__{source}"]
        gallery[attribute] = query[attribute] if exclude_self else data[f"gallery_embeddings__{source}"]
    test_time = json.loads(str(data["test_time"])) if "test_time" in data.files else {}
    return {"kind": str(data["kind"]), "exclude_self": exclude_self, "query": query, "gallery": gallery,
            "query_labels": {a: data[f"query_labels__{a}"] for a in attributes},
            "gallery_labels": {a: data[f"gallery_labels__{a}"] for a in attributes},
            "test_time": {"flip": bool(test_time.get("flip", False)),
                          "query_expansion": test_time.get("query_expansion"), "rerank": test_time.get("rerank")}}


_SAVED = object()  # recompute_from_npz: rank as the saved evaluation did


def _saved_ranking(saved: dict[str, Any]) -> tuple[QueryExpansion | None, KReciprocal | None]:
    """The query expansion and re-ranking a saved evaluation ranked with (``load_npz`` output)."""
    expansion, rerank = saved["test_time"]["query_expansion"], saved["test_time"]["rerank"]
    return (QueryExpansion(**expansion) if expansion else None,
            KReciprocal(rerank["k1"], rerank["k2"], rerank["lambda"]) if rerank else None)


def recompute_from_npz(npz_path: str | Path, query_expansion: QueryExpansion | None | object = _SAVED,
                       rerank: KReciprocal | None | object = _SAVED) -> dict[str, Any]:
    """The JSON's ``metrics`` again, from a saved ``.npz`` alone (no model, no images), ranked
    with the evaluation's own query expansion / re-ranking unless other ones (or None) are
    given: saved embeddings try those options without embedding again."""
    saved = load_npz(npz_path)
    saved_expansion, saved_rerank = _saved_ranking(saved)
    query_expansion = saved_expansion if query_expansion is _SAVED else query_expansion
    rerank = saved_rerank if rerank is _SAVED else rerank
    return compute_metrics(saved["kind"], saved["query"], saved["gallery"], saved["query_labels"],
                           saved["gallery_labels"], saved["exclude_self"], query_expansion=query_expansion,
                           rerank=rerank)


def smaller_gallery_metrics(npz_path: str | Path, gallery_sizes: Sequence[int], draws: int = 20,
                            seed: int = 0) -> list[dict[str, Any]]:
    """What the saved evaluation predicts for a test set drawn like its own but with a smaller
    gallery: for each size, the overall metrics over ``draws`` random subsets of that many gallery
    items, as ``{"gallery": size, "draws": n, "mean": {...}, "std": {...}}``.

    A subset keeps every query, and a query whose relevant items all fell out is not evaluated, as
    in any benchmark (for instance-level data with one product photo per item, that is drawing a
    subset of the products). Where the queries are the gallery (``exclude_self``: the attribute
    benchmarks), a subset is drawn of the items that serve as both. Fewer distractors raise
    top-k and mAP; this measures by how much, on the model's own scores, instead of guessing a
    rule. Ranked as the saved evaluation was (its query expansion and re-ranking)."""
    saved = load_npz(npz_path)
    query_expansion, rerank = _saved_ranking(saved)
    full_size = len(next(iter(saved["gallery_labels"].values())))
    rng = np.random.default_rng(seed)
    curve = []
    for size in gallery_sizes:
        if not 0 < size <= full_size:
            raise ValueError(f"gallery size {size} is outside 1..{full_size} (the saved gallery's size)")
        runs = []
        for _ in range(draws if size < full_size else 1):
            kept = np.sort(rng.choice(full_size, size=size, replace=False))
            gallery = {a: e[kept] for a, e in saved["gallery"].items()}
            gallery_labels = {a: labels[kept] for a, labels in saved["gallery_labels"].items()}
            query, query_labels = ((gallery, gallery_labels) if saved["exclude_self"]
                                   else (saved["query"], saved["query_labels"]))
            runs.append(compute_metrics(saved["kind"], query, gallery, query_labels, gallery_labels,
                                        saved["exclude_self"], query_expansion=query_expansion,
                                        rerank=rerank)["overall"])
        names = [name for name, value in runs[0].items() if isinstance(value, (int, float))]
        curve.append({"gallery": int(size), "draws": len(runs),
                      "mean": {name: float(np.mean([run[name] for run in runs])) for name in names},
                      "std": {name: float(np.std([run[name] for run in runs])) for name in names}})
    return curve


def save_plots(evaluation: Evaluation, plots_dir: str | Path, queries_shown: int = 8, seed: int = 0) -> list[Path]:
    """Top-k accuracy curves and, per attribute, a grid of random queries with their top-5.

    Drawn from the top-k the metrics kept (``evaluation.retrievals``): no further gallery scan.
    """
    from . import plots

    benchmark = evaluation.benchmark
    plots_dir = Path(plots_dir)
    curves, written = {}, []
    rng = np.random.default_rng(seed)
    for attribute, retrieval in evaluation.retrievals.items():
        q_labels = benchmark.query_labels[attribute]
        if retrieval.num_evaluated == 0 or retrieval.k == 0:
            continue
        neighbours = retrieval.topk_indices[:, :PLOT_K]  # one row per evaluated query
        relevant = retrieval.topk_relevant[:, :PLOT_K]
        curves[attribute] = plots.topk_curve(relevant)
        shown = np.sort(rng.choice(retrieval.num_evaluated, size=min(queries_shown, retrieval.num_evaluated),
                                   replace=False))
        chosen = retrieval.query_indices[shown]
        values = benchmark.values.get(attribute, [])
        captions = [_caption(q_labels[i], values) if benchmark.kind != "instance" else "query" for i in chosen]
        written.append(plots.plot_retrieval_grid(
            [benchmark.queries.resolve(benchmark.queries[i]) for i in chosen],
            [[benchmark.gallery.resolve(benchmark.gallery[j]) for j in neighbours[row, :5] if j >= 0] for row in shown],
            relevant[shown, :5], plots_dir / f"top5_{path_component(attribute)}.png",
            f"{benchmark.name} ({evaluation.results['split']}), {attribute}: top-5 (green = relevant)", captions))
    if curves:
        written.insert(0, plots.plot_topk_curves(curves, plots_dir / "topk_accuracy.png",
                                                 f"{benchmark.name} ({evaluation.results['split']})"))
    return written


def _caption(label: np.ndarray | int, values: list[str]) -> str:
    """A query's value name, or its value names joined by " + " for a value set."""
    ids = [int(v) for v in np.atleast_1d(label) if 0 <= v < len(values)]
    return " + ".join(values[v] for v in ids) or "query"


def _test_time_label(test_time: dict[str, Any]) -> str:
    """``, flip, α-QE k=2 α=3``: the test-time options a table's numbers were ranked with."""
    parts = ["flip"] if test_time.get("flip") else []
    if test_time.get("query_expansion"):
        parts.append("α-QE k={k} α={alpha:g}".format(**test_time["query_expansion"]))
    if test_time.get("rerank"):
        parts.append("k-reciprocal k1={k1} k2={k2} λ={lambda:g}".format(**test_time["rerank"]))
    return "".join(", " + part for part in parts)


def print_table(results: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    names = results["metric_names"]
    table = Table(title=f"{results['benchmark']} ({results['split']}, {results['model']['name']}"
                        f"{_test_time_label(results.get('test_time') or {})})")
    table.add_column("attribute" if results["kind"] == "attribute" else "label")
    table.add_column("queries", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for attribute, values in results["metrics"]["per_attribute"].items():
        table.add_row(attribute, str(values["queries"]), *[f"{100 * values[n]:.2f}" for n in names])
    if len(results["metrics"]["per_attribute"]) > 1:
        overall = results["metrics"]["overall"]
        table.add_row("overall", str(overall["queries"]), *[f"{100 * overall[n]:.2f}" for n in names], style="bold")
        mean = results["metrics"].get("mean_over_attributes")
        if mean:
            table.add_row("mean of attributes", "", *[f"{100 * mean[n]:.2f}" for n in names])
    console.print(table)
    console.print("(percent)")


def evaluate(checkpoint: str | Path, benchmark_name: str, split: str, data_root: str | Path, json_out: str | Path,
             plots_dir: str | Path | None = None, batch_size: int = 64, device: str = "auto", num_workers: int = 2,
             progress: bool = True, print_results: bool = True,
             benchmark_options: dict[str, Any] | None = None, flip: bool = False,
             query_expansion: QueryExpansion | None = None, rerank: KReciprocal | None = None) -> Evaluation:
    """Load a checkpoint, evaluate it, write JSON + npz (+ plots), print the table."""
    from .checkpoint import load_for_inference
    from .distributed import resolve_device

    check_test_time(query_expansion, rerank)  # before the model loads
    torch_device = resolve_device(device)
    model, meta = load_for_inference(checkpoint, device=torch_device)
    evaluation = evaluate_model(model, meta, benchmark_name, split, data_root, batch_size=batch_size,
                                device=torch_device, num_workers=num_workers, progress=progress,
                                benchmark_options=benchmark_options, flip=flip,
                                query_expansion=query_expansion, rerank=rerank)
    evaluation.results.update({"checkpoint": str(checkpoint), **provenance(torch_device, meta)})
    if plots_dir is not None:
        evaluation.results["plots"] = [str(p) for p in save_plots(evaluation, plots_dir)]
    write_results(evaluation, json_out)
    if print_results:
        print_table(evaluation.results)
    return evaluation


__all__ = ["Evaluation", "evaluate", "evaluate_model", "write_results", "recompute_from_npz",
           "smaller_gallery_metrics", "save_plots",
           "print_table", "compute_metrics", "CheckpointError"]
