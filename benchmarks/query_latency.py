"""Single-photo query latency through `fashion-retrieval serve` on CPU (target: p50 ≤ 100 ms).

For each model configuration: build a small demo index (randomly initialised global_net: the
weights' values do not change the cost), start the server on 127.0.0.1, send ``--warmup`` then
``--queries`` sequential searches with consumer photos (shared data clothing/, 400x533 JPEGs, or
generated ones of that size), one at a time, and report p50/p99 of the client-side latency
(upload + decode + model + search + JSON) and of the server's own ``took_ms``. ``--onnx`` also
serves each model from its ONNX export (onnxruntime).

    python benchmarks/query_latency.py
    python benchmarks/query_latency.py --config resnet18:1 --config efficientnet_lite0:2 --onnx --queries 200
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import (DEFAULT_DATA_ROOT, Server, build_demo_index, catalog_and_queries,  # noqa: E402
                        percentile)

DEFAULT_CONFIGS = ["resnet18:1", "resnet18:2", "efficientnet_lite0:1", "efficientnet_lite0:2"]


def measure(server: Server, queries: list[bytes], warmup: int, count: int) -> dict[str, float]:
    client_ms, server_ms = [], []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for i in range(warmup + count):
            data = queries[i % len(queries)]
            started = time.perf_counter()
            response = client.post("/search", params={"k": 10}, files={"image": ("query.jpg", data)})
            elapsed = 1e3 * (time.perf_counter() - started)
            response.raise_for_status()
            if i >= warmup:
                client_ms.append(elapsed)
                server_ms.append(response.json()["took_ms"])
    return {"client_p50_ms": percentile(client_ms, 50), "client_p99_ms": percentile(client_ms, 99),
            "server_p50_ms": percentile(server_ms, 50), "server_p99_ms": percentile(server_ms, 99)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", help="BACKBONE:LAST_STRIDE (repeatable); default: "
                        + ", ".join(DEFAULT_CONFIGS))
    parser.add_argument("--image-size", type=int, nargs=2, default=(256, 192), metavar=("H", "W"))
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--catalog-size", type=int, default=200)
    parser.add_argument("--onnx", action="store_true", help="also serve each model from its ONNX export")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from fashion_retrieval.export import export_onnx

    rows = []
    with tempfile.TemporaryDirectory(prefix="query-latency-") as tmp:
        workdir = Path(tmp)
        catalog, query_paths = catalog_and_queries(args.data_root, args.catalog_size, 50, workdir)
        queries = [p.read_bytes() for p in query_paths]
        for config in args.config or DEFAULT_CONFIGS:
            backbone, last_stride = config.split(":")
            name = f"{backbone}-s{last_stride}"
            index = build_demo_index(workdir, catalog, backbone, tuple(args.image_size), name,
                                     last_stride=int(last_stride))
            runtimes = [("torch", ())]
            if args.onnx:
                onnx_path = workdir / f"{name}.onnx"
                export_onnx(index, onnx_path)
                runtimes.append(("onnxruntime", ("--onnx", str(onnx_path))))
            for runtime, extra in runtimes:
                with Server(index, extra) as server:
                    row = {"backbone": backbone, "last_stride": int(last_stride), "runtime": runtime,
                           **measure(server, queries, args.warmup, args.queries)}
                rows.append(row)
                print(f"{backbone:<19} stride {last_stride} {runtime:<12} client p50 {row['client_p50_ms']:6.1f} ms "
                      f"p99 {row['client_p99_ms']:6.1f} ms · server p50 {row['server_p50_ms']:6.1f} ms "
                      f"p99 {row['server_p99_ms']:6.1f} ms", flush=True)
    load = os.getloadavg()
    print(f"\n{args.queries} sequential queries per row, {args.image_size[0]}x{args.image_size[1]} input, "
          f"{os.cpu_count()} CPUs, load average at the end {load[0]:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "queries": args.queries, "image_size": args.image_size,
                                         "cpu_count": os.cpu_count(), "load_average": load,
                                         "processor": platform.processor() or platform.machine()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
