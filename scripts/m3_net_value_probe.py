"""Where does M3-Net lose against the plain attribute classifier: its backbone or its embedding?

M3-Net trains a per-attribute value classifier (Loss 1, weighted BCE) beside its metric
embedding. This script scores a trained M3-Net (or M3-Net_a / M3-Net_c) checkpoint twice on an
attribute benchmark: with its embedding (what ``evaluate`` reports) and with its own value
classifier's outputs used as the embedding (the class-mixture weights σ(z_v) / Σ_u σ(z_u) over
attribute ``a``'s values, compared by cosine), the way the attribute-classifier baseline ranks
with its softmax heads. If the classifier outputs score near the baseline classifier, the shared
backbone has learnt what the baseline's has and the gap lies in the triplet-trained embedding;
if they score low too, the features themselves are weaker. results/analysis.md quotes it:

    .venv/bin/python scripts/m3_net_value_probe.py runs/results_cpu_converged/fashion_product_m3_net \\
        --benchmark fashion_product_attributes --split val --data-root ../shared/data

(57 s for both passes over the val split on 2 quiet CPU cores: the benchmark is embedded once
per attribute and pass.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from fashion_retrieval.engine.checkpoint import load_for_inference
from fashion_retrieval.engine.evaluate import evaluate_model
from fashion_retrieval.models.m3_net import M3Net, class_mixture_weights


class ValueClassifierEmbedding(nn.Module):
    """An M3-Net whose embedding is its value classifier's class-mixture weights over attribute
    ``a``'s values (padded slots weigh 0, so every attribute shares one width)."""

    attribute_conditioned = True

    def __init__(self, model: M3Net):
        super().__init__()
        self.model = model
        self.attribute_names = model.attribute_names
        self.feat_dim = max(model.attribute_sizes)

    def embed(self, images: torch.Tensor, attribute: int | torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(attribute, torch.Tensor):
            attribute = torch.full((images.shape[0],), int(attribute), dtype=torch.long, device=images.device)
        logits = self.model.value_logits(images, attribute)
        return class_mixture_weights(logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="an M3-Net run directory or its model.safetensors")
    parser.add_argument("--benchmark", default="fashion_product_attributes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", help="write both results here")
    args = parser.parse_args()

    model, meta = load_for_inference(args.checkpoint)
    if not isinstance(model, M3Net):
        parser.error(f"{args.checkpoint} holds a '{meta.model.name}' model, not an M3-Net")
    rows = {}
    for name, scored in (("embedding", model), ("value classifier", ValueClassifierEmbedding(model).eval())):
        with torch.inference_mode():
            evaluation = evaluate_model(scored, meta, args.benchmark, args.split, args.data_root,
                                        batch_size=args.batch_size, progress=False)
        metrics = evaluation.results["metrics"]
        rows[name] = {"overall": metrics["overall"],
                      "per_attribute": {a: m["MAP@all"] for a, m in metrics["per_attribute"].items()}}
    attributes = list(rows["embedding"]["per_attribute"])
    print(f"| {args.checkpoint} ({args.split}) | overall MAP@all | MAP@100 | " + " | ".join(attributes) + " |")
    print("|---|---:|---:|" + "---:|" * len(attributes))
    for name, row in rows.items():
        cells = [f"{100 * row['per_attribute'][a]:.2f}" for a in attributes]  # percentages, as docs/results.md
        print(f"| {name} | {100 * row['overall']['MAP@all']:.2f} | {100 * row['overall']['MAP@100']:.2f} | "
              + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "split": args.split, **rows}, indent=2))


if __name__ == "__main__":
    main()
