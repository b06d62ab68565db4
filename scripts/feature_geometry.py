"""Feature norm and spread of trained runs, on the first 32 VITON photos (sorted by path).

For each run: the mean / min / max L2 norm of the training-mode ``features`` (what the margin
losses read), and the mean cosine between different images for ``features`` and for the
eval-mode ``embedding`` (what retrieval uses). results/analysis.md quotes it:

    .venv/bin/python scripts/feature_geometry.py runs/results_cpu_backbone_lr1/viton_dml_sphereface \
        runs/results_cpu_backbone_lr1/viton_dml_normalized_softmax runs/results_cpu_backbone_lr1/viton_dml_learned
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from fashion_retrieval.engine.checkpoint import load_for_inference
from fashion_retrieval.engine.embed import inference_transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (or model.safetensors files)")
    parser.add_argument("--images", default="../shared/data/viton", help="folder searched for *.jpg")
    parser.add_argument("--count", type=int, default=32)
    args = parser.parse_args()
    files = sorted(Path(args.images).rglob("*.jpg"))[: args.count]
    if len(files) < 2:
        raise SystemExit(f"error: {args.images}: fewer than 2 .jpg files found")
    for run in args.runs:
        model, meta = load_for_inference(run)
        transform = inference_transform(meta)  # what evaluation feeds the model (which normalises itself)
        images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
        with torch.no_grad():
            model.train()
            features = model(images)["features"]
            model.eval()
            embedding = model(images)["embedding"]
        norms = features.norm(dim=1)
        different = ~torch.eye(len(files), dtype=torch.bool)

        def spread(x: torch.Tensor) -> float:
            x = F.normalize(x, dim=1)
            return float((x @ x.t())[different].mean())

        print(f"{Path(run).name}: feature norm mean {norms.mean():.4f} min {norms.min():.4f} max {norms.max():.4f}; "
              f"mean cosine between images: features {spread(features):.3f}, embedding {spread(embedding):.3f}")


if __name__ == "__main__":
    main()
