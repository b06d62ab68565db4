"""Test-time options on saved evaluation embeddings: α-query expansion and k-reciprocal
re-ranking, each alone, over a small grid; the best setting on the val split is then reported on
test, next to the plain ranking. Flip averaging changes the embeddings themselves: pass the npz
files of ``evaluate --flip`` runs and they are compared with the plain ones the same way;
``--flip-model`` times the model's forward per photo with and without it (one attribute space, a
batch of ``--flip-batch`` random photos at the model's image size: decoding, the same both ways,
is left out). ``--grid-from`` takes the grid and the chosen options' metrics from an earlier
report of the same npz files instead of computing them again (their times are measured again).

    python benchmarks/test_time_options.py --val runs/tt/B-val-plain.npz --test runs/tt/B-test-plain.npz \\
        [--flip-val runs/tt/B-val-flip.npz --flip-test runs/tt/B-test-flip.npz --flip-model zoo:M] \\
        --json runs/tt/B-options.json

The npz files are what ``fashion-retrieval evaluate --json X.json`` writes beside X.json. The
chosen metric is ``mAP`` for instance and category benchmarks, overall ``MAP@all`` for attribute
ones. On test, the chosen option's difference from plain in that metric gets a 95% interval
from a paired bootstrap over the test queries ((query, attribute) pairs for attribute
benchmarks; ``--bootstrap`` resamples). Times are CPU time of the process with ``--threads``
threads (default 1: on a machine shared with other jobs the steadier measure, and no thread
spinning counted), the best of ``--repeat`` runs, per
(query, attribute) pair: the whole ranking step on the test embeddings (the plain top-100 search;
QE's neighbour search, expansion and second search; the re-ranked distances and their top-100).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from fashion_retrieval.engine.evaluate import compute_metrics, load_npz
from fashion_retrieval.provenance import git_commit, hardware_description
from fashion_retrieval.rerank import KReciprocal, QueryExpansion, k_reciprocal_distances, query_expansion

QE_GRID = {"k": (1, 2, 3, 5, 10), "alpha": (0.0, 1.0, 3.0)}
RERANK_GRID = {"k1": (10, 20, 50), "k2": (1, 6), "lam": (0.1, 0.3, 0.6)}
SEARCH_K = 100


def main_metric(kind: str) -> str:
    return "MAP@all" if kind == "attribute" else "mAP"


def overall(saved: dict, **options) -> dict[str, float]:
    computed = compute_metrics(saved["kind"], saved["query"], saved["gallery"], saved["query_labels"],
                               saved["gallery_labels"], saved["exclude_self"], **options)
    return {name: round(100 * value, 2) for name, value in computed["overall"].items() if name != "queries"}


def per_query(saved: dict, metric: str, **options) -> np.ndarray:
    """The metric of every evaluated (query, attribute) pair, attributes in a fixed order."""
    from fashion_retrieval.engine.evaluate import metric_spec

    found: dict = {}
    compute_metrics(saved["kind"], saved["query"], saved["gallery"], saved["query_labels"], saved["gallery_labels"],
                    saved["exclude_self"], retrievals=found, **options)
    key = "MAP@all" if metric == "mAP" else metric
    return np.concatenate([found[a].per_query(metric_spec())[key] for a in sorted(found)])


def bootstrap_interval(plain: np.ndarray, other: np.ndarray, resamples: int, seed: int = 0) -> list[float]:
    """95% interval (percentile bootstrap, paired over queries) of mean(other - plain), in points."""
    difference = 100.0 * (other - plain)
    rng = np.random.default_rng(seed)
    means = [difference[rng.integers(0, difference.size, difference.size)].mean() for _ in range(resamples)]
    return [round(float(np.percentile(means, 2.5)), 2), round(float(np.percentile(means, 97.5)), 2)]


def _self_index(saved: dict, attribute: str) -> np.ndarray | None:
    return np.arange(len(saved["query"][attribute])) if saved["exclude_self"] else None


def seconds_per_query(saved: dict, option: QueryExpansion | KReciprocal | None, repeat: int) -> float:
    """The ranking step alone (no metrics), per (query, attribute) pair, best of ``repeat``."""
    from fashion_retrieval.metrics import chunked_topk

    pairs = sum(len(q) for q in saved["query"].values())
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for attribute, queries in saved["query"].items():
            gallery, own = saved["gallery"][attribute], _self_index(saved, attribute)
            if isinstance(option, KReciprocal):
                distances = k_reciprocal_distances(queries, gallery, option.k1, option.k2, option.lam,
                                                   query_gallery_index=own)
                if own is not None:
                    distances[np.arange(len(queries)), own] = np.inf
                np.argpartition(distances, min(SEARCH_K, distances.shape[1] - 1), axis=1)
                continue
            if isinstance(option, QueryExpansion):
                queries = query_expansion(queries, gallery, option.k, option.alpha, query_gallery_index=own)
            chunked_topk(queries, gallery, SEARCH_K, query_gallery_index=own)
        best = min(best, time.process_time() - started)
    return best / pairs


def forward_ms_per_photo(checkpoint: str, batch: int, repeat: int) -> dict[str, float]:
    """Milliseconds per photo of the embedding forward, plain and flip-averaged, best of ``repeat``."""
    import torch

    from fashion_retrieval.engine.checkpoint import load_for_inference
    from fashion_retrieval.engine.embed import _forward_embeddings

    model, meta = load_for_inference(checkpoint)
    attribute = 0 if model.attribute_conditioned else None
    images = torch.rand((batch, 3, *meta.image_size), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.inference_mode():
        for flip in (False, True):
            _forward_embeddings(model, images, [attribute], amp=False, flip=flip)  # warm-up
            best = float("inf")
            for _ in range(repeat):
                started = time.process_time()
                _forward_embeddings(model, images, [attribute], amp=False, flip=flip)
                best = min(best, time.process_time() - started)
            out["flip" if flip else "plain"] = round(1e3 * best / batch, 3)
    return out


def grid() -> list[QueryExpansion | KReciprocal]:
    options: list[QueryExpansion | KReciprocal] = [QueryExpansion(k, a) for k, a in itertools.product(*QE_GRID.values())]
    options += [KReciprocal(k1, k2, lam) for k1, k2, lam in itertools.product(*RERANK_GRID.values())]
    return options


def describe(option: QueryExpansion | KReciprocal | None) -> str:
    if option is None:
        return "plain"
    if isinstance(option, QueryExpansion):
        return f"--query-expansion {option.k},{option.alpha:g}"
    return f"--rerank {option.k1},{option.k2},{option.lam:g}"


def keyword(option: QueryExpansion | KReciprocal) -> dict:
    return {"query_expansion": option} if isinstance(option, QueryExpansion) else {"rerank": option}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val", type=Path, required=True, help="npz of the plain evaluation on val")
    parser.add_argument("--test", type=Path, required=True, help="npz of the plain evaluation on test")
    parser.add_argument("--flip-val", type=Path, help="npz of evaluate --flip on val")
    parser.add_argument("--flip-test", type=Path, help="npz of evaluate --flip on test")
    parser.add_argument("--grid-from", type=Path, help="an earlier report of the same npz files: reuse its grid")
    parser.add_argument("--flip-model", help="checkpoint (zoo:NAME) whose forward is timed with and without flip")
    parser.add_argument("--flip-batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="timing runs (the best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the test difference")
    parser.add_argument("--quick", action="store_true", help="a two-setting grid (smoke test)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    val, test = load_npz(args.val), load_npz(args.test)
    kind = val["kind"]
    metric = main_metric(kind)
    options = grid() if not args.quick else [QueryExpansion(1, 3.0), KReciprocal(5, 2, 0.3)]
    rows = []
    plain_val = overall(val)
    print(f"val plain: {plain_val}", file=sys.stderr, flush=True)
    plain_per_query = per_query(test, metric)
    earlier = json.loads(args.grid_from.read_text()) if args.grid_from else None
    if earlier is not None and (earlier["val_npz"], earlier["test_npz"]) != (str(args.val), str(args.test)):
        parser.error(f"--grid-from {args.grid_from} was measured on {earlier['val_npz']} and {earlier['test_npz']}")
    for option in options if earlier is None else []:
        started = time.perf_counter()
        rows.append({"option": describe(option), "family": type(option).__name__, "val": overall(val, **keyword(option))})
        print(f"val {rows[-1]['option']}: {rows[-1]['val']} ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
              flush=True)

    chosen = {}
    for family in ("QueryExpansion", "KReciprocal") if earlier is None else ():
        best = max((row for row in rows if row["family"] == family), key=lambda row: row["val"][metric])
        option = next(o for o in options if describe(o) == best["option"])
        chosen[family] = {"option": best["option"], "val": best["val"], "test": overall(test, **keyword(option)),
                          "test_difference_interval": bootstrap_interval(
                              plain_per_query, per_query(test, metric, **keyword(option)), args.bootstrap),
                          "seconds_per_query": seconds_per_query(test, option, args.repeat)}
    if earlier is not None:
        chosen, rows = earlier["chosen"], earlier["grid"]
        for row in chosen.values():  # timed again now, beside the plain ranking, under the same load
            option = next(o for o in grid() if describe(o) == row["option"])
            row["seconds_per_query"] = seconds_per_query(test, option, args.repeat)
    report = {
        "benchmark": kind, "metric": metric, "val_npz": str(args.val), "test_npz": str(args.test),
        "plain": {"val": plain_val, "test": overall(test), "seconds_per_query": seconds_per_query(test, None, args.repeat)},
        "chosen": chosen, "grid": rows,
        "queries": {"val": int(sum(len(q) for q in val["query"].values())),
                    "test": int(sum(len(q) for q in test["query"].values()))},
        "command": " ".join(["benchmarks/test_time_options.py", *sys.argv[1:]]),
        "hardware": hardware_description("cpu"), "threads": args.threads, "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.flip_val is not None and args.flip_test is not None:
        flipped_val, flipped_test = load_npz(args.flip_val), load_npz(args.flip_test)
        if not (flipped_val["test_time"]["flip"] and flipped_test["test_time"]["flip"]):
            parser.error("--flip-val and --flip-test must be npz files of evaluate --flip")
        report["flip"] = {"option": "--flip", "val": overall(flipped_val), "test": overall(flipped_test),
                          "test_difference_interval": bootstrap_interval(
                              plain_per_query, per_query(flipped_test, metric), args.bootstrap),
                          "val_npz": str(args.flip_val), "test_npz": str(args.flip_test)}
    if args.flip_model:
        report.setdefault("flip", {})["forward_ms_per_photo"] = forward_ms_per_photo(args.flip_model, args.flip_batch,
                                                                                    args.repeat)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")

    print(f"| option (chosen on val) | val {metric} | test {metric} | test − plain, 95% interval | test, all metrics "
          "| CPU ms per query |")
    print("|---|---:|---:|---:|---|---:|")
    lines = [("plain", report["plain"])] + [(c["option"], c) for c in chosen.values()]
    if "test" in report.get("flip", {}):
        lines.append(("--flip", report["flip"]))
    forward = report.get("flip", {}).get("forward_ms_per_photo")
    for name, row in lines:
        interval = row.get("test_difference_interval")
        shown = f"[{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else ""
        cost = (f"{1e3 * row['seconds_per_query']:.2f}" if "seconds_per_query" in row
                else f"forward {forward['plain']:.2f} → {forward['flip']:.2f} per photo" if forward else "")
        print(f"| `{name}` | {row['val'][metric]:.2f} | {row['test'][metric]:.2f} | {shown} | "
              f"{', '.join(f'{k} {v:.2f}' for k, v in row['test'].items())} | {cost} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
