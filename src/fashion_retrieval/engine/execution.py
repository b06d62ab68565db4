"""How a training run uses its device: memory format, precision, compilation, threads, workers
and frozen backbone stages, decided in one place from the recipe's ``train`` / ``data`` keys.

Every choice is a recipe switch whose default, ``auto``, is what measured fastest on that kind
of device (``docs/performance.md``, "Training on the CPU", has the numbers and the commands):

- ``train.channels_last`` auto → on, on the CPU too: one EfficientNet-Lite0 step at 96×72,
  batch 32, went from 51 to 85–89 img/s on this project's 2-core AVX-512 machine.
- ``train.amp`` (bf16 autocast) auto → CUDA only: on that CPU bf16 alone gave 54 img/s against
  51, and with channels_last 73 against 85–89, a loss.
- ``train.compile`` auto → on CUDA, compile the training step once its eager speed is known and
  the rest of the run is long enough for the compile time to pay back (:class:`CompileGate`);
  on the CPU, off: in the real training loop the compiled step was slower there.
- ``train.threads`` / ``data.num_workers`` auto → on the CPU the model's threads and the
  loader's worker processes share the same few cores (:func:`plan_execution`).
- ``train.freeze_backbone_stages`` N → the stem and the first N backbone stages keep their
  pretrained weights and BatchNorm statistics (:func:`freeze_backbone_stages`).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..config import ConfigError, ExperimentConfig

if TYPE_CHECKING:
    from ..models.base import RetrievalModel

# torch.compile of a training step measured 81 s on the first step here (global_net, Lite0) and
# then 98 against 85–89 img/s eager (≈ 12 % less time per step); bigger models compile longer.
# Auto compiles when the eager estimate of what is left is at least this many times the
# expected compile cost, so a compiled run is never slower and short runs (tests, smoke runs)
# stay eager and bit-reproducible.
COMPILE_COST_S = 120.0
COMPILE_PAYS_BACK_AFTER = 15.0
COMPILE_WARMUP_STEPS = 3   # steps not timed: the first ones allocate and warm caches
COMPILE_TIMED_STEPS = 5


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ExecutionPlan:
    device: torch.device
    channels_last: bool
    amp: bool
    compile: str          # "off", "on" or "auto" (decided by CompileGate once steps are timed)
    threads: int          # torch intra-op threads of the training process
    num_workers: int      # DataLoader worker processes
    pin_memory: bool
    frozen_stages: int

    def describe(self) -> str:
        return (f"execution on {self.device}: channels_last={'on' if self.channels_last else 'off'}, "
                f"bf16 autocast={'on' if self.amp else 'off'}, compile={self.compile}, "
                f"{self.threads} threads, {self.num_workers} loader workers"
                + (f", backbone stem + {self.frozen_stages} stages frozen" if self.frozen_stages else ""))


def _auto(value: Any, when_auto: bool) -> bool:
    return when_auto if value == "auto" else bool(value)


def plan_execution(config: ExperimentConfig, device: torch.device, world_size: int = 1,
                   decoded_cache: bool = False) -> ExecutionPlan:
    """The recipe's execution switches resolved for ``device``."""
    train, data = config.train, config.data
    on_gpu = device.type == "cuda"
    cores = available_cores()
    if on_gpu:
        threads = train.threads or torch.get_num_threads()
        workers = data.num_workers if data.num_workers != "auto" else min(8, cores)
    else:
        # A CPU process per rank shares the cores with its loader workers. Decoding a JPEG costs
        # about as much as a training step's share of it on few cores, so one worker keeps the
        # model fed; with the decoded-image cache a worker only reads and augments.
        per_rank = max(1, cores // max(1, world_size))
        threads = train.threads or per_rank
        workers = data.num_workers if data.num_workers != "auto" else (1 if per_rank <= 4 else min(4, per_rank // 4))
    compile_mode = train.compile if isinstance(train.compile, str) else ("on" if train.compile else "off")
    if world_size > 1 and compile_mode == "auto":
        compile_mode = "off"  # DDP + compile is left to an explicit `compile: true`
    if not on_gpu and compile_mode == "auto":
        # Measured in the real loop (benchmarks/train_e2e.py, global_net Lite0 128x96, 2 cores):
        # compiled epochs ran at 38-40 img/s against 46 eager, so on the CPU only `compile: true` compiles.
        compile_mode = "off"
    return ExecutionPlan(device=device, channels_last=_auto(train.channels_last, True),
                         amp=_auto(train.amp, on_gpu), compile=compile_mode, threads=int(threads),
                         num_workers=int(workers), pin_memory=on_gpu, frozen_stages=train.freeze_backbone_stages)


# ---- inference (evaluate, index build, search, serve) ----------------------------------------
def _has_channels_last_weights(model: nn.Module) -> bool:
    weights = [p for p in model.parameters() if p.dim() == 4]
    return bool(weights) and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)


@contextmanager
def channels_last_inference(model: nn.Module, enabled: bool = True):
    """Run ``model`` with channels_last weights for the duration (inputs are the caller's to
    convert), then give the weights back their memory format: the model may be a training model
    in the middle of a run whose recipe turned channels_last off. Yields whether it is on.

    On the CPU this is the embedding's main lever (global_net Lite0's eval forward: see
    docs/performance.md, "Embedding"); on CUDA cuDNN converts the weights itself, as before."""
    if not enabled or _has_channels_last_weights(model) or not any(p.dim() == 4 for p in model.parameters()):
        yield enabled
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield True
    finally:
        model.to(memory_format=torch.contiguous_format)


# ---- partial fine-tuning ----------------------------------------------------------------------
def _keep_in_eval_mode(module: nn.Module, _inputs: Any) -> None:
    if module.training:
        module.eval()


def freeze_backbone_stages(model: RetrievalModel, stages: int) -> list[nn.Module]:
    """Freeze the stem and the first ``stages`` stages of every backbone of the model (ASEN++ has
    two): no gradients (so backward stops before them and the optimizer leaves them alone) and
    eval mode in every forward, so their BatchNorm statistics stay those of the pretrained weights
    and drop-connect is off. Returns the frozen modules."""
    if stages <= 0:
        return []
    backbones = model.backbones()
    if not backbones:
        raise ConfigError(f"train.freeze_backbone_stages: model {type(model).__name__} has no backbone with stages")
    frozen: list[nn.Module] = []
    for backbone in backbones:
        modules = backbone.stage_modules()
        # the last entry of EfficientNet-Lite is its head, not a stage; ResNet has none
        countable = len(modules) - 1 - (1 if type(backbone).__name__ == "EfficientNetLite" else 0)
        if stages > countable:
            raise ConfigError(f"train.freeze_backbone_stages: {type(backbone).__name__} has {countable} stages, "
                              f"got {stages}")
        frozen += modules[:stages + 1]
    for module in frozen:
        module.requires_grad_(False)
        module.eval()
        # a hook, not a one-off eval(): model.train() after an evaluation must not thaw them
        for child in module.modules():
            child.register_forward_pre_hook(_keep_in_eval_mode)
    return frozen


# ---- torch.compile when it pays back ----------------------------------------------------------
class CompileGate:
    """Decides, once, whether to compile the training step.

    ``compile: on`` compiles before the first step; ``auto`` times a few eager steps, estimates
    the eager time of the rest of the run and compiles when that is at least
    ``COMPILE_PAYS_BACK_AFTER`` × ``COMPILE_COST_S``; ``off`` never compiles. A compile that
    fails (no C++ compiler, an unsupported op) falls back to eager with a log line.
    """

    def __init__(self, mode: str, remaining_steps: int, log: Callable[[str], None]):
        self.mode = mode
        self.remaining = remaining_steps
        self.log = log
        self.decided = mode == "off"
        self._seen = 0
        self._timed: list[float] = []
        self._last: float | None = None

    def wants_compile_now(self) -> bool:
        """Called before each step; True once, when the step should be compiled."""
        if self.decided:
            return False
        if self.mode == "on":
            self.decided = True
            return True
        now = time.perf_counter()
        if self._last is not None and self._seen > COMPILE_WARMUP_STEPS:
            self._timed.append(now - self._last)
        self._last = now
        self._seen += 1
        self.remaining -= 1
        if len(self._timed) < COMPILE_TIMED_STEPS:
            return False
        self.decided = True
        step_s = sorted(self._timed)[len(self._timed) // 2]
        eager_left = step_s * self.remaining
        if eager_left >= COMPILE_PAYS_BACK_AFTER * COMPILE_COST_S:
            self.log(f"compiling the training step: {self.remaining} steps left at {step_s:.2f} s eager "
                     f"(≈ {eager_left / 60:.0f} min) pay back a compile of about {COMPILE_COST_S / 60:.0f} min")
            return True
        return False


def compile_step(module: nn.Module, log: Callable[[str], None]) -> nn.Module:
    try:
        return torch.compile(module)
    except Exception as exc:  # compile is an optimisation: never a reason to stop training
        log(f"torch.compile unavailable ({exc}); training stays eager")
        return module
