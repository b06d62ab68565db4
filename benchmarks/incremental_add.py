"""What adding a batch to a large index costs: time and bytes written, before and after segments.

Builds a one-space catalog index of N synthetic L2-normalised vectors with metadata shaped like a
real build's (path, category, domain, attributes), saves it, opens it as ``index add`` does, adds
``--batch`` new items and saves again; the add + save is timed and the bytes the process wrote
during it are read from ``/proc/self/io`` (``wchar``: every byte handed to write()). Each
variant runs in a fresh interpreter: "before" from a temporary git worktree at ``--before`` (the
code that rewrote the whole store on every save), "after" from this checkout.

    python benchmarks/incremental_add.py --n 1000000 --dim 256 --batch 1000 --before 54a499c
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = r'''
import json, sys, time
from pathlib import Path
import numpy as np
from fashion_retrieval.index.catalog import CatalogIndex, META_FILE, WEIGHTS_FILE
from fashion_retrieval.index.faiss_store import FaissStore
from fashion_retrieval.index.store import file_sha256

folder, n, dim, batch, repeat = Path(sys.argv[1]), *map(int, sys.argv[2:6])

def written() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("wchar:"):
            return int(line.split()[1])

def rows(start, count):
    return [{"item_id": f"{i:07d}", "path": f"/data/fashion-product/images/{i:07d}.jpg", "category": "Tshirts",
             "domain": "shop", "attributes": {"colour": "navy blue", "season": "summer", "usage": "casual",
                                              "gender": "men", "article_type": "tshirts"}} for i in range(start, start + count)]

def vectors(count, seed):
    v = np.random.default_rng(seed).standard_normal((count, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)

index = folder / "index"
staging = folder / "model"
staging.mkdir()
(staging / WEIGHTS_FILE).write_bytes(np.random.default_rng(0).bytes(1 << 20))
(staging / META_FILE).write_text("{}")
store = FaissStore(index / "spaces" / "default", dim)
for start in range(0, n, 100_000):
    count = min(100_000, n - start)
    store.add([f"{i:07d}" for i in range(start, start + count)], vectors(count, start), rows(start, count))
catalog = CatalogIndex(index, {"name": "synthetic", "sha256": file_sha256(staging / WEIGHTS_FILE)}, ["default"], dim,
                       stores={"default": store}, model_files={k: staging / k for k in (WEIGHTS_FILE, META_FILE)})
started = time.perf_counter()
catalog.save()
build_s = time.perf_counter() - started
del catalog, store
results = []
for step in range(repeat):
    started = time.perf_counter()
    catalog = CatalogIndex.open(index)
    open_s = time.perf_counter() - started
    first = n + step * batch
    before_bytes, started = written(), time.perf_counter()
    catalog.add("default", [f"{i:07d}" for i in range(first, first + batch)], vectors(batch, 10**9 + step),
                rows(first, batch))
    catalog.save()
    results.append({"add_save_s": time.perf_counter() - started, "written": written() - before_bytes, "open_s": open_s})
    del catalog
reopened = CatalogIndex.open(index)
assert len(reopened) == n + repeat * batch, len(reopened)
on_disk = sum(p.stat().st_size for p in index.rglob("*") if p.is_file())
print(json.dumps({"build_save_s": build_s, "runs": results, "index_bytes": on_disk}))
'''


def worktree_at(ref: str, parent: Path) -> Path:
    folder = parent / f"worktree-{ref}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), ref], check=True,
                   capture_output=True)
    return folder


def measure(source: Path, args, scratch: Path, name: str) -> dict:
    folder = scratch / f"data-{name}"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(source / "src"), "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(args.n), str(args.dim), str(args.batch),
                             str(args.repeat)], env=env, capture_output=True, text=True, cwd=source)
    if result.returncode:
        raise SystemExit(f"{name}: failed\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="add + save rounds per variant (median reported)")
    parser.add_argument("--before", default="54a499c", help="git ref of the code before segments ('' to skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tmp", default=None, help="scratch folder (needs ~3x the index size)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="incremental-add-", dir=args.tmp) as tmp:
        scratch = Path(tmp)
        try:
            variants = ([("before", args.before, worktree_at(args.before, scratch))] if args.before else [])
            variants.append(("after", "this tree", REPO))
            for name, ref, source in variants:
                result = measure(source, args, scratch, name)
                runs = sorted(result["runs"], key=lambda r: r["add_save_s"])
                middle = runs[len(runs) // 2]
                rows.append({"variant": name, "ref": ref, "n": args.n, "dim": args.dim, "batch": args.batch,
                             "add_save_s": middle["add_save_s"], "written_mb": middle["written"] / 1e6,
                             "open_s": middle["open_s"], "build_save_s": result["build_save_s"],
                             "index_mb": result["index_bytes"] / 1e6})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            for folder in scratch.glob("worktree-*"):
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)], capture_output=True)
    print(f"| variant | code | N × dim | add {args.batch:,} + save | bytes written | open (before the add) | "
          "first save (build) | index on disk |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['variant']} | {row['ref']} | {row['n']:,} × {row['dim']} | {row['add_save_s']:.2f} s | "
              f"{row['written_mb']:.2f} MB | {row['open_s']:.1f} s | {row['build_save_s']:.1f} s | {row['index_mb']:.0f} MB |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
