"""What verifying an index costs when it is opened (`search`, `serve`, `index add` all open one).

Builds a one-space catalog index of N × D vectors with metadata shaped like a real build's
(path, category, domain, attributes) and a model copy of ``--model-mb`` random bytes (resnet18
weights are 45 MB, resnet50 95 MB), saves it, then opens it ``--repeat`` times with and without
verification and times the parts. Prints a table and writes JSON.

Verification = the size and sha256 of index.faiss, metadata.jsonl and the model files against
the manifests, plus the count/dim/id cross-checks; ``verify=False`` keeps the sizes and the
cross-checks and skips the sha256. The files are in the page cache after the save (a first open
after a reboot also pays the disk read, which faiss and the JSON parser would pay anyway).

    python benchmarks/index_open.py --n 100000 --dim 512 --json runs/index_open.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from fashion_retrieval.index.catalog import META_FILE, MODEL_DIR, WEIGHTS_FILE, CatalogIndex
from fashion_retrieval.index.faiss_store import FaissStore
from fashion_retrieval.index.store import file_sha256


def make_index(path: Path, n: int, dim: int, model_mb: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    faiss.normalize_L2(vectors)
    ids = [f"{i:07d}" for i in range(n)]
    metadata = [{"item_id": item, "path": f"/data/fashion-product/images/{item}.jpg", "category": "Tshirts",
                 "domain": "shop", "attributes": {"colour": "navy blue", "season": "summer", "usage": "casual",
                                                  "gender": "men", "article_type": "tshirts"}} for item in ids]
    staging = path.parent / "model-staging"
    staging.mkdir()
    (staging / WEIGHTS_FILE).write_bytes(rng.bytes(int(model_mb * 2**20)))
    (staging / META_FILE).write_text("{}")
    store = FaissStore(path / "spaces" / "default", dim)
    store.add(ids, vectors, metadata)
    catalog = CatalogIndex(path, {"name": "synthetic", "sha256": file_sha256(staging / WEIGHTS_FILE)}, ["default"],
                           dim, stores={"default": store},
                           model_files={name: staging / name for name in (WEIGHTS_FILE, META_FILE)})
    catalog.save()


def timed(function, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> list[dict]:
    faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="index-open-", dir=args.tmp) as tmp:
        index = Path(tmp) / "index"
        start = time.perf_counter()
        make_index(index, args.n, args.dim, args.model_mb, args.seed)
        print(f"built and saved {args.n:,} x {args.dim} in {time.perf_counter() - start:.1f}s")
        space = index / "spaces" / "default"
        files = {"index.faiss": space / "index.faiss", "metadata.jsonl": space / "metadata.jsonl",
                 f"{MODEL_DIR}/{WEIGHTS_FILE}": index / MODEL_DIR / WEIGHTS_FILE}
        sizes = {name: file.stat().st_size for name, file in files.items()}
        parts = {f"sha256 {name} ({sizes[name] / 2**20:.0f} MB)": (lambda f=file: file_sha256(f))
                 for name, file in files.items()}
        parts["faiss.read_index"] = lambda: faiss.read_index(str(space / "index.faiss"))
        steps = {
            "open, verify (default)": lambda: CatalogIndex.open(index),
            "open, verify=False (sizes, counts, ids)": lambda: CatalogIndex.open(index, verify=False),
            **parts,
        }
        rows = []
        for step, function in steps.items():
            function()  # warm-up: the page cache and imports
            rows.append({"step": step, "n": args.n, "dim": args.dim, "seconds": round(timed(function, args.repeat), 3)})
            print(f"{step:48} {rows[-1]['seconds']:8.3f} s")
        total_mb = sum(sizes.values()) / 2**20
        verify, plain = rows[0]["seconds"], rows[1]["seconds"]
        print(f"verification adds {verify - plain:.3f} s to an open of {plain:.3f} s "
              f"({total_mb:.0f} MB hashed, {total_mb / max(verify - plain, 1e-9):.0f} MB/s)")
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--model-mb", type=float, default=45.0, help="size of the model copy (resnet18: 45 MB)")
    parser.add_argument("--repeat", type=int, default=3, help="opens per step; the median is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tmp", default=None, help="folder for the index (default: the system's temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = run(args)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/index_open.py " + " ".join(sys.argv[1:]),
                       "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                  f"load {os.getloadavg()[0]:.1f}",
                       "faiss": faiss.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
