"""Where the time of one query chunk's exact top-k goes, kernel by kernel (CPU seconds, one thread).

The evaluation scan (``fashion_retrieval.scan``) scores a query chunk against the gallery and
keeps each query's top k. This times its pieces on random unit vectors, so the choice between
FAISS's fused k-NN kernel and ``mm`` + a top-k can be checked on any host:

    python benchmarks/topk_kernels.py                      # 4096 × 20000 × 256, k = 100
    python benchmarks/topk_kernels.py --queries 1024 --gallery 32768

Rows: the float32 and bf16 matrix products, ``torch.topk`` over the whole rows, the grouped
prefilter of ``topk.grouped_candidates`` (its pieces and in all), FAISS's ``knn``.
"""
from __future__ import annotations

import argparse
import time

import faiss
import torch

from fashion_retrieval import topk


def cpu_seconds(run, repeat: int) -> float:
    run()  # warm-up: first-touch of buffers, library initialisation
    start = time.process_time()
    for _ in range(repeat):
        run()
    return (time.process_time() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--gallery", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=generator), dim=1)
    gallery = torch.nn.functional.normalize(torch.randn(args.gallery, args.dim, generator=generator), dim=1)
    k = args.k + 1  # the scan asks for k + 1 (the tie check)
    scores = queries @ gallery.T
    groups = args.gallery // topk.GROUP
    grouped = scores[:, :groups * topk.GROUP].unflatten(1, (groups, topk.GROUP))
    group_max = grouped.amax(dim=2)
    group_index = torch.topk(group_max, k + 1, dim=1).indices
    columns = (group_index[:, :k, None] * topk.GROUP + torch.arange(topk.GROUP)).flatten(1)
    candidates = scores.gather(1, columns)
    queries_bf16, gallery_bf16 = queries.bfloat16(), gallery.bfloat16()
    queries_np, gallery_np = queries.numpy(), gallery.numpy()
    rows = [
        ("mm float32", lambda: queries @ gallery.T),
        ("mm bf16 (inputs already bf16)", lambda: queries_bf16 @ gallery_bf16.T),
        ("torch.topk over the rows", lambda: torch.topk(scores, k, dim=1)),
        (f"  group maxima (groups of {topk.GROUP})", lambda: grouped.amax(dim=2)),
        ("  top-k of the group maxima", lambda: torch.topk(group_max, k + 1, dim=1)),
        ("  gather the kept groups", lambda: scores.gather(1, columns)),
        ("  top-k of the kept columns", lambda: torch.topk(candidates, k, dim=1)),
        ("grouped top-k in all (topk.chunk_candidates)", lambda: topk.chunk_candidates(scores, args.k)),
        ("mm float32 + grouped top-k", lambda: topk.chunk_candidates(queries @ gallery.T, args.k)),
        ("FAISS knn (fused product + heap)", lambda: faiss.knn(queries_np, gallery_np, args.k + 2,
                                                               faiss.METRIC_INNER_PRODUCT)),
    ]
    print(f"{args.queries} queries × {args.gallery} gallery × {args.dim}, k = {args.k}, one thread, "
          f"CPU s per call (mean of {args.repeat})")
    for name, run in rows:
        print(f"{name:48s} {cpu_seconds(run, args.repeat):8.3f}")


if __name__ == "__main__":
    main()
