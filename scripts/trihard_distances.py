"""Batch-hard distances of a recipe's model on a few real training batches: where does
improved_trihard's positive threshold τ act? docs/losses.md quotes it:

    PYTHONPATH=src .venv/bin/python scripts/trihard_distances.py configs/viton_mmfl_net.yaml \
        --data-root ../shared/data --batches 3 data.image_size=[96,72] data.sampler.p=16 \
        data.sampler.k=2 model.kwargs.backbone=efficientnet_lite0 model.kwargs.pretrained=true

(5–40 s on 2 CPU cores; ``--train-steps 20 optim.backbone_lr_mult=1.0`` adds 20 training steps,
about 2 minutes.)

For the freshly built model and, with ``--train-steps``, again after that many optimiser steps of
the recipe's own objective, it prints quantiles of the hardest-positive (d_ap) and
hardest-negative (d_an) distances per anchor on the training-mode ``features`` (what
``improved_trihard`` reads), raw and between L2-normalised features, and the share of anchors
whose compactness hinge is active: [d_ap − τ]₊ for ``--tau`` on both scales, and
[d_ap − τ · mean d_an]₊ for a few τ (``improved_trihard``'s default ``threshold_scale: relative``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fashion_retrieval.config import apply_overrides, config_from_dict, load_config
from fashion_retrieval.data.images import ImageDataset, collate_skipping, default_transform
from fashion_retrieval.data.training import SeededBatches, SeededDataset
from fashion_retrieval.engine.builders import (build_model, build_objective_for, build_optimizer, build_sampler,
                                               label_space_for, seed_everything, training_table)
from fashion_retrieval.engine.train import TrainStep

QUANTILES = (0.05, 0.5, 0.95)
RELATIVE_TAUS = (0.8, 0.9, 1.0, 1.1, 1.2)


def hardest(features: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    distance = torch.cdist(features, features)
    same = items[:, None] == items[None, :]
    eye = torch.eye(len(items), dtype=torch.bool)
    d_ap = distance.masked_fill(~same | eye, float("-inf")).max(1).values
    d_an = distance.masked_fill(same, float("inf")).min(1).values
    keep = torch.isfinite(d_ap) & torch.isfinite(d_an)
    return d_ap[keep], d_an[keep]


def describe(name: str, values: torch.Tensor) -> str:
    q = torch.quantile(values, torch.tensor(QUANTILES))
    return f"{name} p5/p50/p95 {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}"


def report(label: str, model: torch.nn.Module, batches: list[dict], tau: float) -> None:
    model.train()  # the loss sees training-mode features (BatchNorm on batch statistics)
    raw_ap, raw_an, unit_ap, unit_an, ratios = [], [], [], [], []
    with torch.no_grad():
        for batch in batches:
            features = model(batch["image"])["features"].float()
            for store_ap, store_an, x in ((raw_ap, raw_an, features), (unit_ap, unit_an, F.normalize(features, dim=1))):
                d_ap, d_an = hardest(x, batch["item"])
                store_ap.append(d_ap)
                store_an.append(d_an)
            ratios.append(raw_ap[-1] / raw_an[-1].mean())  # per batch, as the loss scales it
    raw_ap, raw_an, unit_ap, unit_an, ratio = (torch.cat(v) for v in (raw_ap, raw_an, unit_ap, unit_an, ratios))
    width = features.shape[1]
    print(f"{label}: {len(raw_ap)} anchors, features {width}-d, norm mean {features.norm(dim=1).mean():.2f}")
    print(f"  raw:        {describe('d_ap', raw_ap)}; {describe('d_an', raw_an)}; "
          f"[d_ap - {tau:g}]+ active for {(raw_ap > tau).float().mean():.0%}")
    print(f"  normalised: {describe('d_ap', unit_ap)}; {describe('d_an', unit_an)}; "
          f"[d_ap - {tau:g}]+ active for {(unit_ap > tau).float().mean():.0%}")
    active = ", ".join(f"{t:g}: {(ratio > t).float().mean():.0%}" for t in RELATIVE_TAUS)
    print(f"  relative:   {describe('d_ap / batch-mean d_an', ratio)}; [d_ap - tau * mean d_an]+ active for "
          f"tau = {active}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--tau", type=float, default=0.1, help="the threshold whose activity is reported")
    args = parser.parse_intermixed_args()
    torch.set_num_threads(2)

    config = load_config(args.config)
    config = config_from_dict(apply_overrides(config.model_dump(mode="json"), args.overrides))
    seed_everything(config.seed)
    data_root = Path(args.data_root)
    table = training_table(config, data_root)
    labels = label_space_for(table, config.data.attributes)
    model, _ = build_model(config, labels)
    sampler = build_sampler(config, table, labels)
    size = tuple(config.data.image_size)
    needed = args.batches + args.train_steps
    dataset = SeededDataset(ImageDataset(table, default_transform(size, config.data.augment), labels,
                                         crop_bbox=config.data.crop_bbox))
    loader = DataLoader(dataset, batch_sampler=SeededBatches(sampler, config.seed, 0, needed),
                        collate_fn=collate_skipping)
    loaded = list(loader)
    probe, train_batches = loaded[: args.batches], loaded[args.batches:]
    report("fresh", model, probe, args.tau)
    if train_batches:
        objective = build_objective_for(config, model, labels, table)
        optimizer = build_optimizer(config, model, objective)
        step = TrainStep(model, objective).train()
        for batch in train_batches:
            total, _ = step(batch)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        report(f"after {len(train_batches)} steps", model, probe, args.tau)


if __name__ == "__main__":
    main()
