"""Time and peak memory of retrieval evaluation: our chunked metrics vs pytorch-metric-learning.

Each configuration runs in its own subprocess so its peak RSS is its own. Peak RSS is read from
/proc/self/status (VmHWM, reset with /proc/self/clear_refs after the data is generated, so it
covers the resident data plus everything the evaluation allocates, torch and FAISS included);
``data_gb`` is the resident size of the generated embeddings before evaluation starts.

Methods:
  ours       top-1…50 accuracy, MAP@100, Recall@100 (one pass over the gallery; on the CPU the
             int8 first pass with float32 re-scoring where the gallery has ≥ 32768 items)
  ours-exact the same with the int8 pass off (FAISS's exact k-NN kernel or the torch scan with its
             grouped top-k, whichever a one-off timing found faster on this machine)
  ours-full  the same plus MAP@all (a second pass for the rank of every relevant item)
  pml        pytorch-metric-learning AccuracyCalculator: precision_at_1 + mean_average_precision,
             k=100 (FAISS IndexFlatL2 k-NN, the library default; L2 order = dot-product order on
             unit vectors)

The issue's comparison (CPU seconds with one thread on both sides, repeated, interleaved):

    python benchmarks/eval_scaling.py --threads 1 --repeat 3 --methods ours,ours-exact,pml

Data: unit-norm float32 embeddings, gallery labels in blocks of ``--per-label`` (so every query
has exactly that many relevant items), each embedding = its label's centre + noise.

    python benchmarks/eval_scaling.py --json runs/eval_scaling.json
    python benchmarks/eval_scaling.py --queries 100000 --gallery 1000000 --methods ours
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

GIB = 1024**3


def status_bytes(field: str) -> int:
    """A memory field (VmHWM, VmRSS, …) of this process from /proc, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Make VmHWM start again from the current RSS (Linux ≥ 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def make_problem(n_queries: int, n_gallery: int, dim: int, per_label: int, noise: float, seed: int):
    """Clustered unit vectors: gallery labels in blocks of ``per_label``, queries on random labels."""
    rng = np.random.default_rng(seed)
    n_labels = max(1, n_gallery // per_label)
    centres = rng.standard_normal((n_labels, dim), dtype=np.float32)
    gallery_labels = np.minimum(np.arange(n_gallery) // per_label, n_labels - 1)
    query_labels = rng.integers(0, n_labels, n_queries)

    def embed(labels: np.ndarray) -> np.ndarray:
        out = np.empty((labels.size, dim), dtype=np.float32)
        step = 65536  # generated in slices so temporaries stay small next to the output
        for start in range(0, labels.size, step):
            stop = min(start + step, labels.size)
            block = centres[labels[start:stop]] + noise * rng.standard_normal((stop - start, dim), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[start:stop] = block
        return out

    return embed(query_labels), embed(gallery_labels), query_labels, gallery_labels


def run_worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    queries, gallery, query_labels, gallery_labels = make_problem(
        args.queries, args.gallery, args.dim, args.per_label, args.noise, args.seed)
    data_bytes = status_bytes("VmRSS")
    peak_reset = reset_peak_rss()
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    if args.worker == "pml":
        import faiss
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        faiss.omp_set_num_threads(args.threads)
        calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision"), k=100,
                                        device=torch.device("cpu"))
        raw = calculator.get_accuracy(queries, query_labels, gallery, gallery_labels)
        metrics = {"top1": raw["precision_at_1"], "MAP@100": raw["mean_average_precision"]}
    else:
        from fashion_retrieval import scan_int8
        from fashion_retrieval.metrics import MetricSpec, evaluate_retrieval

        scan_int8.INT8_SCAN = args.worker != "ours-exact"

        def progress(done: int, total: int) -> None:
            print(f"  {args.worker}: {done}/{total} queries, {time.perf_counter() - started:.0f}s",
                  file=sys.stderr, flush=True)

        metrics = evaluate_retrieval(
            queries, gallery, query_labels, gallery_labels,
            spec=MetricSpec(map_at=(100,), recall_at=(100,), full_map=args.worker == "ours-full"),
            query_chunk=args.query_chunk,
            gallery_chunk=args.gallery_chunk, progress=progress if args.verbose else None)
    seconds = time.perf_counter() - started
    cpu_seconds = _cpu_seconds() - cpu_before
    peak = status_bytes("VmHWM") if peak_reset else None
    return {
        "method": args.worker, "queries": args.queries, "gallery": args.gallery, "dim": args.dim,
        "seconds": seconds, "cpu_seconds": cpu_seconds, "threads": args.threads, "data_gb": data_bytes / GIB,
        "peak_rss_gb": (peak / GIB) if peak is not None else None,
        "peak_rss_includes_generation": not peak_reset,
        "ru_maxrss_gb": _ru_maxrss_bytes() / GIB,
        "metrics": {key: value for key, value in metrics.items()},
    }


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: less sensitive than wall time to
    other jobs on a shared machine (but it counts threads spinning while they wait)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _ru_maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def run_configuration(args: argparse.Namespace, method: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", method,
               "--queries", str(args.queries), "--gallery", str(args.gallery), "--dim", str(args.dim),
               "--per-label", str(args.per_label), "--noise", str(args.noise), "--seed", str(args.seed),
               "--threads", str(args.threads), "--query-chunk", str(args.query_chunk),
               "--gallery-chunk", str(args.gallery_chunk)] + (["--verbose"] if args.verbose else [])
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        # e.g. killed for memory: reported as a failed row, the other configurations still run
        return {"method": method, "queries": args.queries, "gallery": args.gallery,
                "error": f"exit status {completed.returncode}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    header = (f"{'method':<10} {'queries':>8} {'gallery':>9} {'wall s':>8} {'cpu s':>8} {'peak GB':>8} "
              f"{'data GB':>8}  metrics")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{row['method']:<10} {row['queries']:>8} {row['gallery']:>9}  failed: {row['error']}")
            continue
        shown = {k: v for k, v in row["metrics"].items() if k in ("top1", "top10", "MAP@100", "Recall@100", "MAP@all")}
        metrics = " ".join(f"{k}={v:.4f}" for k, v in shown.items())
        peak = row["peak_rss_gb"] if row["peak_rss_gb"] is not None else row["ru_maxrss_gb"]
        print(f"{row['method']:<10} {row['queries']:>8} {row['gallery']:>9} {row['seconds']:>8.1f} "
              f"{row['cpu_seconds']:>8.1f} {peak:>8.2f} {row['data_gb']:>8.2f}  {metrics}")
    timed: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        if "error" not in row:
            for clock in ("seconds", "cpu_seconds"):
                timed.setdefault(row["method"], {}).setdefault(clock, []).append(row[clock])
    if "pml" in timed:
        for method in ("ours", "ours-exact", "ours-full"):
            if method in timed:
                cpu = float(np.median(timed["pml"]["cpu_seconds"])) / float(np.median(timed[method]["cpu_seconds"]))
                wall = float(np.median(timed["pml"]["seconds"])) / float(np.median(timed[method]["seconds"]))
                print(f"speed-up of {method} over pml (medians of {len(timed[method]['seconds'])} runs): "
                      f"{cpu:.2f}x in CPU seconds, {wall:.2f}x in wall time")
        # same data, same definitions: PML's precision_at_1 is our top1 and, with 10 relevant
        # items per query ≤ k = 100, its mean_average_precision is our MAP@100 (docs/metrics.md)
        reference = next(row["metrics"] for row in rows if row.get("method") == "pml" and "error" not in row)
        for row in rows:
            if row.get("method", "").startswith("ours") and "error" not in row:
                gap = max(abs(row["metrics"][name] - reference[name]) for name in ("top1", "MAP@100"))
                print(f"{row['method']}: top1 and MAP@100 equal to pml's within {gap:.1e}")
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--gallery", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--per-label", type=int, default=10, help="relevant gallery items per query")
    parser.add_argument("--noise", type=float, default=2.0, help="noise scale around each label centre")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    parser.add_argument("--methods", default="ours,ours-full,pml",
                        help="comma list of ours, ours-exact, ours-full, pml")
    parser.add_argument("--query-chunk", type=int, default=1024)
    parser.add_argument("--gallery-chunk", type=int, default=32768)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each configuration (timings are noisy)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--verbose", action="store_true", help="progress of our evaluation on stderr")
    parser.add_argument("--worker", choices=("ours", "ours-exact", "ours-full", "pml"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - {"ours", "ours-exact", "ours-full", "pml"}
    if unknown:
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
    # interleaved repeats, so a burst of load from other jobs hits every method alike
    rows = [run_configuration(args, method) for _ in range(args.repeat) for method in methods]
    print_table(rows)
    if args.json:
        report = {
            "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                        "python": platform.python_version()},
            "results": rows,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
