"""Search cost at catalog scale: exact (flat) vs IVF / HNSW / IVF-PQ FAISS indexes.

For each index kind: build time, index memory, recall@10 against exact search, single-query
p50/p99 latency and batch throughput (QPS). Prints a table and writes JSON.

Data: a generated gallery of N × D float32 unit vectors. Uniform random vectors are the
worst case for approximate search and unlike real embeddings, which cluster (several photos
per product, products per category), so the default draws them around N / ``--per-cluster``
centres with noise; ``--per-cluster 0`` gives the uniform worst case: report both. Queries are perturbed
gallery vectors (a customer photo lands near its product, not on it).

    python benchmarks/search_speed.py --n 1000000 --dim 256 --json runs/search_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import faiss
import numpy as np


def make_vectors(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chunk = 100_000
    out = np.empty((n, dim), dtype=np.float32)
    centres = rng.standard_normal((max(clusters, 1), dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        if clusters:
            assign = rng.integers(0, clusters, stop - start)
            out[start:stop] = centres[assign] + 0.6 * noise
        else:
            out[start:stop] = noise
    faiss.normalize_L2(out)
    return out


def make_queries(gallery: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    picks = gallery[rng.integers(0, len(gallery), count)]
    noise = rng.standard_normal(picks.shape, dtype=np.float32) / np.sqrt(gallery.shape[1])
    queries = np.ascontiguousarray(picks + 0.3 * noise, dtype=np.float32)
    faiss.normalize_L2(queries)
    return queries


def build(kind: str, gallery: np.ndarray, args) -> faiss.Index:
    n, dim = gallery.shape
    nlist = args.nlist or max(16, int(4 * np.sqrt(n)))
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = args.ef_construction
    elif kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivfpq":
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, args.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    else:
        raise SystemExit(f"unknown kind {kind}")
    if not index.is_trained:
        rng = np.random.default_rng(0)
        sample = gallery[rng.choice(n, min(n, 64 * nlist, 256_000), replace=False)]
        index.train(sample)
    index.add(gallery)
    return index


def tune(kind: str, index: faiss.Index, args) -> str:
    if kind == "hnsw":
        index.hnsw.efSearch = args.ef_search
        return f"M={args.hnsw_m} efC={args.ef_construction} efS={args.ef_search}"
    if kind in ("ivf", "ivfpq"):
        index.nprobe = args.nprobe
        extra = f" m={args.pq_m}" if kind == "ivfpq" else ""
        return f"nlist={index.nlist} nprobe={args.nprobe}{extra}"
    return "exact"


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = sum(len(set(f[:k]) & set(t[:k])) for f, t in zip(found, truth))
    return hits / (k * len(truth))


def run(args) -> list[dict]:
    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    clusters = args.n // args.per_cluster if args.per_cluster else 0
    gallery = make_vectors(args.n, args.dim, clusters, args.seed)
    queries = make_queries(gallery, args.queries, args.seed)
    print(f"generated {args.n:,} x {args.dim} in {time.perf_counter() - t0:.1f}s")
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(gallery)
    _, truth = exact.search(queries, args.k)
    del exact
    rows = []
    for kind in args.kinds:
        t0 = time.perf_counter()
        index = build(kind, gallery, args)
        build_s = time.perf_counter() - t0
        index_bytes = faiss.serialize_index(index).nbytes  # what the index holds, as saved on disk
        params = tune(kind, index, args)
        index.search(queries[:10], args.k)  # warm-up
        latencies = []
        for q in queries[: args.latency_queries]:
            t = time.perf_counter()
            index.search(q[None], args.k)
            latencies.append(time.perf_counter() - t)
        t = time.perf_counter()
        _, found = index.search(queries, args.k)
        batch_s = time.perf_counter() - t
        rows.append({
            "kind": kind, "params": params, "n": args.n, "dim": args.dim,
            "build_s": round(build_s, 2), "memory_mb": round(index_bytes / 2**20, 1),
            f"recall@{args.k}": round(recall_at(found, truth, args.k), 4),
            "p50_ms": round(1e3 * float(np.percentile(latencies, 50)), 3),
            "p99_ms": round(1e3 * float(np.percentile(latencies, 99)), 3),
            "batch_qps": round(len(queries) / batch_s, 1),
        })
        print_row(rows[-1], args.k)
        del index
    return rows


def print_row(row: dict, k: int) -> None:
    print(f"{row['kind']:6} {row['params']:32} build {row['build_s']:8.2f}s  mem {row['memory_mb']:8.1f} MB  "
          f"recall@{k} {row[f'recall@{k}']:.4f}  p50 {row['p50_ms']:7.3f} ms  p99 {row['p99_ms']:7.3f} ms  "
          f"QPS {row['batch_qps']:10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--per-cluster", type=int, default=50,
                        help="mean vectors per cluster (photos of one product); 0 = uniform random vectors")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--latency-queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw", "ivfpq"])
    parser.add_argument("--nlist", type=int, default=0, help="0 = 4·sqrt(N)")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--pq-m", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = run(args)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/search_speed.py " + " ".join(os.sys.argv[1:]),
                       "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                       "faiss": faiss.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
