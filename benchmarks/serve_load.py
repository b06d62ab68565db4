"""Load test of `fashion-retrieval serve`: many concurrent clients, valid and hostile requests.

Starts the server as a subprocess on 127.0.0.1 (a free port) over an index, then runs
``--clients`` threads for ``--duration`` seconds. Each client mixes valid photo searches with
oversized bodies and malformed requests (garbage bytes, a truncated JPEG, an empty file, a
forged PNG header claiming 30000x30000 pixels, k=0, no file). Reports request counts by kind and
status, 5xx count (must be 0), latency p50/p99 of valid searches and of rejections, and the
server's RSS at start/middle/end. Loopback only; bounded in time; stops the server by itself.

Without ``--index`` it builds a demo index first: a randomly initialised global_net (resnet18,
256x192) over shop photos from the shared data (``--data-root``), or generated photos.

    python benchmarks/serve_load.py --clients 32 --duration 60
    python benchmarks/serve_load.py --index runs/index --duration 20 --json runs/serve_load.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
MAX_UPLOAD_MB = 1.0  # the server's limit in this benchmark: oversized requests are 1.5 MB


# ---- a demo index and a server subprocess (also used by query_latency.py) -------------------------
def photo_like(seed: int, size: tuple[int, int]) -> "Image.Image":
    """A garment-like generated picture (size: width, height) when no real photos are available."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    width, height = size
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(150, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        box = (x0, y0, x0 + int(rng.integers(width // 5, width // 2)), y0 + int(rng.integers(height // 5, height // 2)))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image.filter(ImageFilter.GaussianBlur(1))


def catalog_and_queries(data_root: Path, catalog_size: int, query_count: int, workdir: Path) -> tuple[Path, list[Path]]:
    """Shop photos to index and consumer photos to query with (real ones when the data is there)."""
    shop = sorted((data_root / "fashion-product" / "images").glob("*.jpg"))[:catalog_size]
    consumer = sorted((data_root / "clothing" / "validation").glob("*/*.jpg"))
    consumer = random.Random(0).sample(consumer, min(query_count, len(consumer)))
    catalog = workdir / "catalog"
    catalog.mkdir(parents=True, exist_ok=True)
    if len(shop) == catalog_size and consumer:
        for path in shop:  # links: the index records these paths and serves them
            (catalog / path.name).symlink_to(path)
        return catalog, consumer
    queries_dir = workdir / "queries"
    queries_dir.mkdir(exist_ok=True)
    for seed in range(catalog_size):
        photo_like(seed, (60, 80)).save(catalog / f"item{seed:05d}.jpg", quality=90)
    queries = []
    for seed in range(query_count):
        path = queries_dir / f"query{seed:03d}.jpg"
        photo_like(10_000 + seed, (400, 533)).save(path, quality=90)
        queries.append(path)
    return catalog, queries


def build_demo_index(workdir: Path, catalog: Path, backbone: str, image_size: tuple[int, int],
                     name: str = "index", **model_kwargs) -> Path:
    """A randomly initialised global_net saved like a trained one, and its index of ``catalog``
    (latency and robustness do not depend on what the weights learned)."""
    import torch

    from fashion_retrieval.engine.checkpoint import save_for_inference
    from fashion_retrieval.index.build import build_index
    from fashion_retrieval.models import MODELS

    torch.manual_seed(0)
    kwargs = {"backbone": backbone, "num_items": 100, **model_kwargs}
    model = MODELS.build("global_net", **kwargs).eval()
    run = workdir / f"{name}-run"
    save_for_inference(model, {"model": {"name": "global_net", "kwargs": kwargs}, "image_size": list(image_size)}, run)
    report = build_index(run, catalog, workdir / name, progress=False)
    print(f"built a demo index of {report.added} images (global_net {kwargs}, {image_size[0]}x{image_size[1]})",
          flush=True)
    return workdir / name


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`fashion-retrieval serve` in a subprocess on loopback; a context manager that always stops it."""

    def __init__(self, index: Path, extra_args: tuple[str, ...] = (), threads: int | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fashion_retrieval", "serve", "--index", str(index), "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning", *extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not answer /health within 120 s")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ---- the request mix ------------------------------------------------------------------------------
def forged_png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def request_mix(queries: list[bytes]) -> list[tuple[str, float, callable]]:
    """(kind, weight, send(client) -> response) for every request the clients make."""
    truncated = queries[0][: len(queries[0]) // 2]
    oversized = os.urandom(int(MAX_UPLOAD_MB * 1.5 * 2**20))
    garbage = os.urandom(4096)
    bomb = forged_png(30000, 30000)

    def search(data: bytes, params=None):
        return lambda client: client.post("/search", params=params or {"k": 10}, files={"image": ("q.jpg", data)})

    return [
        ("valid", 0.75, lambda client: search(random.choice(queries))(client)),
        ("oversized", 0.05, search(oversized)),
        ("garbage", 0.04, search(garbage)),
        ("truncated", 0.04, search(truncated)),
        ("empty", 0.03, search(b"")),
        ("bomb", 0.03, search(bomb)),
        ("bad_k", 0.03, search(queries[0], {"k": 0})),
        ("no_file", 0.03, lambda client: client.post("/search", content=b"k=1",
                                                     headers={"content-type": "application/x-www-form-urlencoded"})),
    ]


def run_clients(url: str, queries: list[bytes], clients: int, duration: float) -> dict[str, list]:
    mix = request_mix(queries)
    kinds, weights = [m[0] for m in mix], [m[1] for m in mix]
    senders = {m[0]: m[2] for m in mix}
    results: dict[str, list] = defaultdict(list)  # kind -> [(status or error, seconds)]
    lock = threading.Lock()
    deadline = time.monotonic() + duration

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.monotonic() < deadline:
                kind = rng.choices(kinds, weights)[0]
                started = time.perf_counter()
                try:
                    outcome = senders[kind](client).status_code
                except httpx.HTTPError as exc:  # the server may close the socket of an oversized upload
                    outcome = type(exc).__name__
                with lock:
                    results[kind].append((outcome, time.perf_counter() - started))

    threads = [threading.Thread(target=client_loop, args=(seed,), daemon=True) for seed in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + 120)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, help="index to serve (default: build a demo index)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--catalog-size", type=int, default=500)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, nargs=2, default=(256, 192), metavar=("H", "W"))
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        workdir = Path(tmp)
        catalog, query_paths = catalog_and_queries(args.data_root, args.catalog_size, 50, workdir)
        index = args.index or build_demo_index(workdir, catalog, args.backbone, tuple(args.image_size))
        queries = [p.read_bytes() for p in query_paths]
        with Server(index, ("--max-upload-mb", str(MAX_UPLOAD_MB))) as server:
            for query in queries[:5]:  # warm-up: first-call allocations are not steady state
                httpx.post(server.url + "/search", files={"image": ("q.jpg", query)}, timeout=60)
            rss = {"start": server.rss_mb()}
            sampler_stop = threading.Event()
            samples: list[float] = []

            def sample_rss() -> None:
                half = time.monotonic() + args.duration / 2
                while not sampler_stop.wait(1.0):
                    samples.append(server.rss_mb())
                    if "middle" not in rss and time.monotonic() >= half:
                        rss["middle"] = samples[-1]

            sampler = threading.Thread(target=sample_rss, daemon=True)
            sampler.start()
            started = time.monotonic()
            results = run_clients(server.url, queries, args.clients, args.duration)
            elapsed = time.monotonic() - started
            sampler_stop.set()
            sampler.join()
            rss["end"] = server.rss_mb()
            rss["max"] = max(samples + [rss["end"]])
            alive = server.process.poll() is None

    return report(args, results, elapsed, rss, alive)


def report(args, results: dict[str, list], elapsed: float, rss: dict[str, float], alive: bool) -> int:
    total = sum(len(v) for v in results.values())
    server_errors = sum(1 for v in results.values() for outcome, _ in v if isinstance(outcome, int) and outcome >= 500)
    print(f"\n{args.clients} clients for {elapsed:.1f} s: {total} requests ({total / elapsed:.1f}/s); "
          f"server alive at the end: {alive}")
    print(f"{'kind':<10} {'count':>6}  {'outcomes':<34} {'p50 ms':>8} {'p99 ms':>8}")
    rows = {}
    for kind in sorted(results, key=lambda k: (k != "valid", k)):
        outcomes = Counter(outcome for outcome, _ in results[kind])
        latencies = [1e3 * seconds for _, seconds in results[kind]]
        rows[kind] = {"count": len(results[kind]), "outcomes": {str(k): v for k, v in outcomes.items()},
                      "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items(), key=str))
        print(f"{kind:<10} {len(results[kind]):>6}  {shown:<34} {rows[kind]['p50_ms']:>8.1f} {rows[kind]['p99_ms']:>8.1f}")
    rejected = [1e3 * s for kind, v in results.items() if kind != "valid" for _, s in v]
    print(f"rejections (all hostile kinds): p50 {percentile(rejected, 50):.1f} ms, p99 {percentile(rejected, 99):.1f} ms")
    print(f"server RSS MB: start {rss['start']:.0f}, middle {rss.get('middle', float('nan')):.0f}, "
          f"end {rss['end']:.0f}, max {rss['max']:.0f}")
    print(f"5xx responses: {server_errors}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "clients": args.clients, "duration_s": elapsed, "requests": total, "kinds": rows, "rss_mb": rss,
            "server_errors": server_errors, "server_alive": alive,
            "rejections_p50_ms": percentile(rejected, 50), "rejections_p99_ms": percentile(rejected, 99),
            "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        }, indent=2))
    return 0 if server_errors == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
