"""Multi-GPU / multi-node training under ``torchrun``: process group from the environment,
DDP wrapping, and helpers so that only rank 0 writes files.

Single-process runs (no ``WORLD_SIZE`` in the environment) go through the same functions and
get a context with ``world_size == 1`` and no process group, so the training loop has one path.
Batches are sharded by the samplers themselves (``rank``/``world_size``): every rank draws the
same epoch plan from the seed and keeps its own share.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` → this process's GPU when there is one, else CPU."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            from ..registry import ConfigError

            raise ConfigError(f"train.device is '{preference}' but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def init_distributed(device_preference: str = "auto", timeout_minutes: int = 30) -> DistributedContext:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size <= 1:
        return DistributedContext(0, 1, 0, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(minutes=timeout_minutes)}
        if device.type == "cuda":
            kwargs["device_id"] = device  # binds NCCL to this GPU up front, avoiding a guess later
        dist.init_process_group(**kwargs)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def wrap_model(module: nn.Module, context: DistributedContext, find_unused_parameters: bool = True) -> nn.Module:
    """DDP-wrap ``module`` when running on several processes; otherwise return it unchanged."""
    if not context.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def all_true(flag: bool, context: DistributedContext) -> bool:
    """Whether ``flag`` holds on every rank (one tiny all-reduce)."""
    if not context.enabled:
        return flag
    backend_device = context.device if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], device=backend_device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather_objects(obj: Any, context: DistributedContext) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank."""
    if not context.enabled:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, context: DistributedContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not context.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def cleanup(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
