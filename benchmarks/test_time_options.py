"""Test-time options on saved evaluation embeddings: α-query expansion and k-reciprocal
re-ranking, each alone, over a small grid; the best setting on the val split is then reported on
test, next to the plain ranking. Flip averaging changes the embeddings themselves: pass the JSONs
of ``evaluate --flip`` runs and they are reported beside the plain ones.

    python benchmarks/test_time_options.py --val runs/tt/B-val-plain.npz --test runs/tt/B-test-plain.npz \\
        [--flip-val runs/tt/B-val-flip.json --flip-test runs/tt/B-test-flip.json] --json runs/tt/B-options.json

The npz files are what ``fashion-retrieval evaluate --json X.json`` writes beside X.json. The
chosen metric is ``mAP`` for instance and category benchmarks, overall ``MAP@all`` for attribute
ones. On test, the chosen option's difference from plain in that metric gets a 95% interval
from a paired bootstrap over the test queries ((query, attribute) pairs for attribute
benchmarks; ``--bootstrap`` resamples). Times: seconds per query of the whole ranking step on the test embeddings (the plain
top-100 search; QE's neighbour search, expansion and second search; the re-ranked distances and
their top-100), the best of ``--repeat`` runs, per (query, attribute) pair.
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
        started = time.perf_counter()
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
        best = min(best, time.perf_counter() - started)
    return best / pairs


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
    parser.add_argument("--flip-val", type=Path, help="JSON of evaluate --flip on val")
    parser.add_argument("--flip-test", type=Path, help="JSON of evaluate --flip on test")
    parser.add_argument("--repeat", type=int, default=3, help="timing runs (the best is kept)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the test difference")
    parser.add_argument("--quick", action="store_true", help="a two-setting grid (smoke test)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    val, test = load_npz(args.val), load_npz(args.test)
    kind = val["kind"]
    metric = main_metric(kind)
    options = grid() if not args.quick else [QueryExpansion(1, 3.0), KReciprocal(5, 2, 0.3)]
    rows = []
    plain_val = overall(val)
    print(f"val plain: {plain_val}", file=sys.stderr, flush=True)
    for option in options:
        started = time.perf_counter()
        rows.append({"option": describe(option), "family": type(option).__name__, "val": overall(val, **keyword(option))})
        print(f"val {rows[-1]['option']}: {rows[-1]['val']} ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
              flush=True)

    chosen = {}
    plain_per_query = per_query(test, metric)
    for family in ("QueryExpansion", "KReciprocal"):
        best = max((row for row in rows if row["family"] == family), key=lambda row: row["val"][metric])
        option = next(o for o in options if describe(o) == best["option"])
        chosen[family] = {"option": best["option"], "val": best["val"], "test": overall(test, **keyword(option)),
                          "test_difference_interval": bootstrap_interval(
                              plain_per_query, per_query(test, metric, **keyword(option)), args.bootstrap),
                          "seconds_per_query": seconds_per_query(test, option, args.repeat)}
    report = {
        "benchmark": kind, "metric": metric, "val_npz": str(args.val), "test_npz": str(args.test),
        "plain": {"val": plain_val, "test": overall(test), "seconds_per_query": seconds_per_query(test, None, args.repeat)},
        "chosen": chosen, "grid": rows,
        "queries": {"val": int(sum(len(q) for q in val["query"].values())),
                    "test": int(sum(len(q) for q in test["query"].values()))},
        "command": " ".join(["benchmarks/test_time_options.py", *sys.argv[1:]]),
        "hardware": hardware_description("cpu"), "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for split, path in (("val", args.flip_val), ("test", args.flip_test)):
        if path is not None:
            flipped = json.loads(path.read_text())
            report.setdefault("flip", {})[split] = {name: round(100 * value, 2) for name, value in
                                                    flipped["metrics"]["overall"].items() if name != "queries"}
            report["flip"][f"{split}_seconds_embedding"] = flipped.get("seconds_embedding")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")

    print(f"| option (chosen on val) | val {metric} | test {metric} | test − plain, 95% interval | test, all metrics "
          "| ms per query |")
    print("|---|---:|---:|---:|---|---:|")
    lines = [("plain", report["plain"])] + [(c["option"], c) for c in chosen.values()]
    for name, row in lines:
        interval = row.get("test_difference_interval")
        shown = f"[{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else ""
        print(f"| `{name}` | {row['val'][metric]:.2f} | {row['test'][metric]:.2f} | {shown} | "
              f"{', '.join(f'{k} {v:.2f}' for k, v in row['test'].items())} | {1e3 * row['seconds_per_query']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
