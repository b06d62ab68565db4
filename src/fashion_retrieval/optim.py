"""Optimizers and learning-rate schedules by name, as models and losses are (``registry.py``).

``OPTIMIZERS.build(name, param_groups=..., settings=..., fused=...)`` returns a
``torch.optim.Optimizer``; ``settings`` is the recipe's ``optim`` section. ``SCHEDULES.build(name,
settings=..., steps_per_epoch=...)`` returns the learning-rate factor of a step after the warm-up
(:func:`lr_factor` adds the warm-up). Adding one is one decorated function here; the recipe's
``optim.name`` / ``optim.scheduler`` accept it at once (config.py checks names against these).
torch is imported inside the builders, so checking a recipe's names stays cheap.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from .registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")
SCHEDULES: Registry = Registry("scheduler")


@OPTIMIZERS.register("sgd")
def sgd(param_groups: list[dict[str, Any]], settings: Any, fused: bool = False):
    import torch

    return torch.optim.SGD(param_groups, lr=settings.lr, momentum=settings.momentum, nesterov=True,
                           **({"fused": True} if fused else {}))


@OPTIMIZERS.register("adam")
def adam(param_groups: list[dict[str, Any]], settings: Any, fused: bool = False):
    import torch

    return torch.optim.Adam(param_groups, lr=settings.lr, **({"fused": True} if fused else {}))


@OPTIMIZERS.register("adamw")
def adamw(param_groups: list[dict[str, Any]], settings: Any, fused: bool = False):
    import torch

    return torch.optim.AdamW(param_groups, lr=settings.lr, **({"fused": True} if fused else {}))


@SCHEDULES.register("cosine")
def cosine(settings: Any, steps_per_epoch: int, warmup: int, total: int) -> Callable[[int], float]:
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@SCHEDULES.register("step")
def step_decay(settings: Any, steps_per_epoch: int, warmup: int, total: int) -> Callable[[int], float]:
    """``lr *= gamma`` at each of ``step_epochs``."""
    def factor(step: int) -> float:
        epoch = step // max(1, steps_per_epoch)
        return settings.gamma ** sum(epoch >= boundary for boundary in settings.step_epochs)

    return factor


@SCHEDULES.register("none")
def constant(settings: Any, steps_per_epoch: int, warmup: int, total: int) -> Callable[[int], float]:
    return lambda step: 1.0


def lr_factor(settings: Any, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning-rate multiplier per optimizer step: linear warm-up over ``settings.warmup_epochs``,
    then the schedule ``settings.scheduler``."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(round(settings.warmup_epochs * steps_per_epoch))
    after = SCHEDULES.build(settings.scheduler, settings=settings, steps_per_epoch=steps_per_epoch, warmup=warmup,
                            total=total)

    def factor(step: int) -> float:
        return (step + 1) / warmup if step < warmup else after(step)

    return factor
