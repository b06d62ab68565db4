"""What a recipe builds, one function each: table, label space, model, objective, sampler,
optimizer and learning-rate schedule. ``train()`` calls them; so do ``benchmarks/`` and
``scripts/`` (public API: they time or inspect exactly what training builds).

Each part is chosen by name from its registry (MODELS, LOSSES, SAMPLERS, OPTIMIZERS, SCHEDULES);
this module only passes the recipe's settings and the sizes the data decides.
"""
from __future__ import annotations

import importlib
import random
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, ExperimentConfig
from ..data.labels import LabelSpace
from ..data.table import SampleTable
# the data builders live beside the samplers; they are part of this module's API
from ..data.training import build_sampler, label_space_for, read_table, training_table

__all__ = ["seed_everything", "import_plugins", "read_table", "training_table", "label_space_for", "build_sampler",
           "model_kwargs", "build_model", "build_objective_for", "build_optimizer", "lr_factor", "build_schedule"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def import_plugins(modules: Sequence[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"plugins: cannot import '{name}' ({exc})") from None


# ---- model and objective -----------------------------------------------------------------------
def model_kwargs(config: ExperimentConfig, labels: LabelSpace) -> dict[str, Any]:
    """Everything ``MODELS.build`` gets; stored in meta.json to rebuild the model later."""
    reserved = {"num_items", "attribute_sizes"} & set(config.model.kwargs)
    if reserved:
        raise ConfigError(f"model.kwargs.{sorted(reserved)[0]}: set from the data, do not set it in the recipe")
    return {**config.model.kwargs, "num_items": labels.num_items, "attribute_sizes": labels.attribute_sizes}


def build_model(config: ExperimentConfig, labels: LabelSpace) -> tuple[nn.Module, dict[str, Any]]:
    from ..models import MODELS

    kwargs = model_kwargs(config, labels)
    return MODELS.build(config.model.name, **kwargs), kwargs


def build_objective_for(config: ExperimentConfig, model: nn.Module, labels: LabelSpace,
                        table: SampleTable | None = None) -> nn.Module:
    """The weighted loss terms; sizes the terms need (classes, embedding width) come from the
    label space and the model, and label counts (frequency-weighted BCE) from the training
    ``table``, so recipes do not repeat them."""
    from ..losses.objective import build_objective

    feat_dim = int(getattr(model, "feat_dim", 0))
    context: dict[str, Any] = {
        "num_classes": labels.num_items,
        "embedding_size": int(getattr(model, "features_dim", feat_dim)),
        "attribute_sizes": labels.attribute_sizes,
        "feat_dim": feat_dim,
    }
    terms = [{"name": t.name, "weight": t.weight, **t.kwargs} for t in config.loss.terms]
    if table is not None and any(t.name == "attribute_multilabel_bce" for t in config.loss.terms):
        context["attribute_value_counts"] = {"positives": labels.value_counts(table), "images": len(table)}
    return build_objective(terms, context)


# ---- optimisation ----------------------------------------------------------------------------
def _is_backbone(name: str) -> bool:
    return name.startswith("backbone.") or ".backbone." in name


def build_optimizer(config: ExperimentConfig, model: nn.Module, objective: nn.Module) -> torch.optim.Optimizer:
    """Param groups: backbone / rest of the model, each split into decayed weights and undecayed
    biases and norm scales (decaying those only hurts), then the loss terms' parameters at
    ``loss_lr_mult`` (or their own settings, e.g. the center loss's ``center_lr``). The optimizer
    itself is ``optim.name`` in OPTIMIZERS (optim.py)."""
    from ..optim import OPTIMIZERS

    optim = config.optim
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(("backbone" if _is_backbone(name) else "head", param.ndim > 1), []).append(param)
    multipliers = {"backbone": optim.backbone_lr_mult, "head": 1.0}
    param_groups: list[dict[str, Any]] = [
        {"params": params, "lr": optim.lr * multipliers[part], "weight_decay": optim.weight_decay if decay else 0.0,
         "name": f"{part}{'' if decay else '_no_decay'}"}
        for (part, decay), params in sorted(groups.items())
    ]
    loss_groups = objective.parameter_groups() if hasattr(objective, "parameter_groups") else (
        [{"params": [p for p in objective.parameters() if p.requires_grad]}])
    for index, group in enumerate(g for g in loss_groups if g["params"]):
        param_groups.append({"lr": optim.lr * optim.loss_lr_mult, "weight_decay": 0.0, "name": f"loss{index}",
                             **group})
    if not param_groups:
        raise ConfigError(f"model '{config.model.name}' has no trainable parameters")
    # The fused kernels update all parameters in one pass: several times faster on CPU and GPU.
    return OPTIMIZERS.build(optim.name, param_groups=param_groups, settings=optim, fused=_fused_supported(model))


def _fused_supported(model: nn.Module) -> bool:
    devices = {p.device.type for p in model.parameters()}
    return devices <= {"cpu", "cuda"} and all(p.dtype.is_floating_point for p in model.parameters())


def lr_factor(config: ExperimentConfig, steps_per_epoch: int):
    """Learning-rate multiplier per optimizer step: linear warm-up, then ``optim.scheduler``."""
    from ..optim import lr_factor as schedule

    return schedule(config.optim, config.train.epochs, steps_per_epoch)


def build_schedule(config: ExperimentConfig, optimizer: torch.optim.Optimizer,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps_per_epoch))
