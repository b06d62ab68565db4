"""The training loop: recipe → table → labels → model + objective → sampler → checkpoints.

Reproducibility is by construction, not by luck:

- the sampler's epoch plan is a function of ``(seed, epoch)``;
- each image's augmentation is seeded from ``(seed, epoch, rank, batch position, slot)``, so it
  does not depend on the number of DataLoader workers or on where a run was resumed;
- the main process's RNG (dropout) is saved with each checkpoint and restored on resume;
- DataLoaders get their own generators, so creating one never advances the training RNG.

So ``train --resume`` after a kill (at an epoch boundary or, with ``checkpoint_every_steps``,
mid-epoch) ends with the same weights as an uninterrupted run on CPU.
"""
from __future__ import annotations

import csv
import importlib
import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import ConfigError, ExperimentConfig, config_from_dict, dump_config
from ..data.images import ImageDataset, SkipCounter, collate_skipping, default_transform, tensor_stage
from ..data.labels import LabelSpace
from ..data.table import SampleTable
from ..files import quote, refuse_other_artefact
from . import checkpoint as ckpt
from .distributed import (DistributedContext, all_true, barrier, broadcast_object, cleanup, gather_objects,
                          init_distributed, wrap_model)
from .execution import CompileGate, compile_step, freeze_backbone_stages, plan_execution
from .stopping import StopDecision, available_metrics, metric_value, should_stop

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
EVAL_FILE = "eval.json"


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    epochs: int
    steps: int
    skipped_images: int
    evaluation: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


# ---- reproducible data pipeline --------------------------------------------------------------
def sample_seed(seed: int, epoch: int, rank: int, position: int, slot: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, position, slot]).generate_state(1)[0])


class SeededBatches(Sampler[list]):
    """Wraps a batch sampler: caps an epoch at ``max_steps`` and pairs every key with its
    augmentation seed, so a sample's crop/flip/jitter depends only on where it sits in the plan."""

    def __init__(self, batch_sampler: Any, seed: int, rank: int, max_steps: int | None = None):
        self.batch_sampler = batch_sampler
        self.seed, self.rank, self.max_steps = seed, rank, max_steps
        self.epoch, self.start = 0, 0

    def steps_per_epoch(self) -> int:
        self.batch_sampler.set_epoch(self.epoch, 0)
        full = len(self.batch_sampler)
        self.batch_sampler.set_epoch(self.epoch, self.start)
        return min(full, self.max_steps) if self.max_steps else full

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.batch_sampler.set_epoch(epoch, start)

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch() - self.start)

    def __iter__(self) -> Iterator[list]:
        remaining = len(self)
        for offset, batch in enumerate(self.batch_sampler):
            if offset >= remaining:
                return
            position = self.start + offset
            yield [(key, sample_seed(self.seed, self.epoch, self.rank, position, slot))
                   for slot, key in enumerate(batch)]


class SeededDataset(Dataset):
    """``dataset[(key, seed)]``: the item for ``key`` with the torch RNG seeded for its augmentation."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, keyed: tuple[Any, int]) -> dict[str, Any]:
        key, seed = keyed
        # fork_rng: with num_workers=0 this runs in the main process, whose RNG drives dropout.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[key]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- building blocks -------------------------------------------------------------------------
def import_plugins(modules: Sequence[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"plugins: cannot import '{name}' ({exc})") from None


def read_table(config: ExperimentConfig, data_root: Path) -> SampleTable:
    from ..data.readers import READERS

    root = Path(data_root) / config.data.root
    if not root.exists():
        raise FileNotFoundError(f"{root}: dataset folder not found (data root {data_root}, data.root "
                                f"'{config.data.root}'); pass --data-root or set FASHION_DATA_ROOT")
    return READERS.build(config.data.format, root=root, **config.data.options)


def training_table(config: ExperimentConfig, data_root: Path) -> SampleTable:
    table = read_table(config, data_root).filter(split=config.data.train_split)
    if config.data.identity == "category":
        # Category-level retrieval: every ID/metric loss then treats a category as one identity.
        table = table.filter(predicate=lambda s: s.category is not None)
        table = SampleTable([replace(s, item_id=s.category) for s in table], table.root, table.name, table.multi_label)
    if len(table) == 0:
        raise ConfigError(f"data.train_split: no images in split(s) {config.data.train_split} of "
                          f"{config.data.format} at {Path(data_root) / config.data.root}"
                          + (" with a category" if config.data.identity == "category" else ""))
    return table


def label_space_for(table: SampleTable, attributes: Sequence[str] | None) -> LabelSpace:
    """The table's label space, restricted to (and ordered as) ``attributes`` when given."""
    full = LabelSpace.from_table(table)
    if attributes is None:
        return full
    unknown = [a for a in attributes if a not in full.attributes]
    if unknown:
        raise ConfigError(f"data.attributes: {', '.join(unknown)} not in the training table "
                          f"(it has: {', '.join(full.attribute_names) or 'no attributes'})")
    return LabelSpace(full.items, full.categories, {a: full.attributes[a] for a in attributes},
                      tuple(a for a in full.multi_label if a in attributes))


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


def build_sampler(config: ExperimentConfig, table: SampleTable, labels: LabelSpace, context: DistributedContext):
    from ..data import samplers

    spec = config.data.sampler
    common = {"p": spec.p, "k": spec.k, "seed": config.seed, "rank": context.rank, "world_size": context.world_size}
    encoded = labels.encode_table(table)
    try:
        if spec.kind == "pk":
            return samplers.PKSampler(encoded[spec.label], **common)
        if spec.kind == "cross_domain":
            return samplers.CrossDomainSampler([s.item_id for s in table], [s.domain for s in table], **common)
        return samplers.AttributeBatchSampler(encoded["attrs"], **common)
    except ValueError as exc:
        raise ConfigError(f"data.sampler: {exc}") from None


def _is_backbone(name: str) -> bool:
    return name.startswith("backbone.") or ".backbone." in name


def build_optimizer(config: ExperimentConfig, model: nn.Module, objective: nn.Module) -> torch.optim.Optimizer:
    """Param groups: backbone / rest of the model, each split into decayed weights and undecayed
    biases and norm scales (decaying those only hurts), then the loss terms' parameters at
    ``loss_lr_mult`` (or their own settings, e.g. the center loss's ``center_lr``)."""
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
    fused = {"fused": True} if _fused_supported(model) else {}
    if optim.name == "sgd":
        return torch.optim.SGD(param_groups, lr=optim.lr, momentum=optim.momentum, nesterov=True, **fused)
    if optim.name == "adam":
        return torch.optim.Adam(param_groups, lr=optim.lr, **fused)
    return torch.optim.AdamW(param_groups, lr=optim.lr, **fused)


def _fused_supported(model: nn.Module) -> bool:
    devices = {p.device.type for p in model.parameters()}
    return devices <= {"cpu", "cuda"} and all(p.dtype.is_floating_point for p in model.parameters())


def lr_factor(config: ExperimentConfig, steps_per_epoch: int):
    """Learning-rate multiplier per optimizer step: linear warm-up, then cosine / step / constant."""
    optim = config.optim
    total = max(1, config.train.epochs * steps_per_epoch)
    warmup = int(round(optim.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.scheduler == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if optim.scheduler == "step":
            epoch = step // max(1, steps_per_epoch)
            return optim.gamma ** sum(epoch >= boundary for boundary in optim.step_epochs)
        return 1.0

    return factor


class TrainStep(nn.Module):
    """Model and objective as one module, so DDP synchronises loss parameters (centers, margin
    weights) together with the model's."""

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective
        self.conditioned = bool(getattr(model, "attribute_conditioned", False))

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.conditioned:
            outputs = self.model(batch["image"], attribute=batch["attribute"])
        else:
            outputs = self.model(batch["image"])
        return self.objective(outputs, batch)


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if channels_last:
        moved["image"] = moved["image"].contiguous(memory_format=torch.channels_last)
    return moved


# ---- logging ---------------------------------------------------------------------------------
class MetricsLog:
    """metrics.csv + TensorBoard, rank 0 only. On resume, rows after the checkpoint are dropped
    (the killed run logged steps that the resumed run repeats)."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as handle:
                self.rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        else:
            self.path.unlink(missing_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is optional at run time; the CSV is the record
            self.writer = None
        self._rewrite()

    def _rewrite(self) -> None:
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        tmp = self.path.with_suffix(".csv.tmp")
        try:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns or ["step"])
                writer.writeheader()
                writer.writerows(self.rows)
            tmp.replace(self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._write_error(exc) from exc

    def _write_error(self, exc: OSError) -> OSError:
        # a failed write (a full disk) names no file by itself; the checkpoints are separate files
        return OSError(exc.errno, f"could not write the metrics log ({exc.strerror or exc}); the last "
                                  "checkpoint is unchanged", str(self.path))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        known = list(self.rows[0]) if self.rows else []
        self.rows.append(row)
        if known and list(row) == known:
            try:
                with open(self.path, "a", newline="", encoding="utf-8") as handle:
                    csv.DictWriter(handle, fieldnames=known).writerow(row)
            except OSError as exc:
                raise self._write_error(exc) from exc
        else:
            self._rewrite()  # new columns (e.g. the first eval row): rewrite with the wider header
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace(".", "/", 1), value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _flatten_numbers(prefix: str, data: Any, out: dict[str, float]) -> dict[str, float]:
    if isinstance(data, dict):
        for key, value in data.items():
            _flatten_numbers(f"{prefix}/{key}" if prefix else str(key), value, out)
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        out[prefix] = float(data)
    return out


def _stopping_decision(history: list[dict[str, Any]], split: str, rule: Any) -> StopDecision:
    evaluations = [entry["metrics"] or {} for entry in history if entry.get("split") == split]
    values = [metric_value(metrics, rule.metric) for metrics in evaluations]
    if evaluations and values[-1] is None:
        raise ConfigError(f"train.early_stop.metric: {quote(rule.metric, 80)} is not among the {split} "
                          f"evaluation's metrics ({', '.join(available_metrics(evaluations[-1])[:12])})")
    # NaN: an evaluation that measured nothing (every query image unreadable, e.g. a data folder
    # that vanished for a moment) says nothing about the model, so it neither stops nor extends the run
    return should_stop([value for value in values if value is not None and not math.isnan(value)],
                       rule.patience, rule.min_delta)


# ---- the loop --------------------------------------------------------------------------------
def _check_resumable(run_dir: Path, config: ExperimentConfig) -> None:
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.exists():
        return
    from ..files import read_yaml

    saved = read_yaml(saved_path, ConfigError)
    if not isinstance(saved, dict):
        raise ConfigError(f"{saved_path}: expected the run's recipe (a mapping), got {type(saved).__name__}")
    saved = config_from_dict(saved, str(saved_path)).to_dict()
    current = config.to_dict()
    # What may change on resume: how long, how often and how it runs, not what is trained.
    for volatile in (("train", "epochs"), ("train", "eval_every"), ("train", "log_every"), ("train", "progress"),
                     ("train", "checkpoint_every_steps"), ("data", "num_workers"), ("data", "decoded_cache"),
                     ("train", "amp"), ("train", "channels_last"), ("train", "compile"), ("train", "threads"),
                     ("train", "early_stop"), ("eval",), ("description",)):
        for snapshot in (saved, current):
            node = snapshot
            for key in volatile[:-1]:
                node = node[key]
            node.pop(volatile[-1], None)
    if saved != current:
        differing = _first_difference(saved, current)
        raise ConfigError(f"{saved_path}: the run was started with a different recipe ({differing} differs); "
                          "resume with the same recipe or use a new --out directory")


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
    return prefix or "(top level)"


DECODED_CACHE_DIR = "decoded-images"


def decoded_cache_for(config: ExperimentConfig, run_dir: Path):
    """The recipe's decoded-image cache (``data.decoded_cache``), or None when it is off."""
    from ..data.image_cache import DecodedImageCache

    where = config.data.decoded_cache
    if where == "off":
        return None
    folder = run_dir / DECODED_CACHE_DIR if where == "run" else Path(where)
    return DecodedImageCache(folder, config.data.image_size)


def _is_empty_run(run_dir: Path) -> bool:
    return not run_dir.exists() or not any(run_dir.iterdir())


def train(config: ExperimentConfig, data_root: str | Path, out_dir: str | Path, resume: bool = False,
          progress: bool | None = None, log: Any = print) -> TrainResult:
    """Train ``config`` on ``data_root``; writes checkpoints, metrics and evaluation into ``out_dir``.

    Under ``torchrun`` every process calls this; rank 0 alone writes files.
    """
    from tqdm.auto import tqdm

    data_root, run_dir = Path(data_root), Path(out_dir)
    context = init_distributed(config.train.device)
    is_main = context.is_main
    show_progress = (config.train.progress if progress is None else progress) and is_main
    try:
        refuse_other_artefact(run_dir, "run", ConfigError)
        import_plugins(config.plugins)
        if not resume and is_main and not _is_empty_run(run_dir) and ckpt.training_checkpoint_dir(run_dir):
            raise ConfigError(f"{run_dir}: already holds a training run; pass --resume to continue it "
                              "or choose another --out")
        if resume:
            _check_resumable(run_dir, config)
        seed_everything(config.seed)
        table = training_table(config, data_root)
        labels = label_space_for(table, config.data.attributes)
        model, kwargs = build_model(config, labels)
        conditioned = bool(getattr(model, "attribute_conditioned", False))
        if conditioned and config.data.sampler.kind != "attribute":
            raise ConfigError(f"data.sampler.kind: model '{config.model.name}' is attribute-conditioned and needs "
                              "kind: attribute (batches of one attribute each)")
        objective = build_objective_for(config, model, labels, table)
        device = context.device
        cache = decoded_cache_for(config, run_dir)
        plan = plan_execution(config, device, context.world_size, decoded_cache=cache is not None)
        if device.type == "cpu" and torch.get_num_threads() != plan.threads:
            torch.set_num_threads(plan.threads)
        channels_last = plan.channels_last
        model.to(device)
        objective.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        freeze_backbone_stages(model, plan.frozen_stages)
        optimizer = build_optimizer(config, model, objective)

        batch_sampler = build_sampler(config, table, labels, context)
        batches = SeededBatches(batch_sampler, config.seed, context.rank, config.train.max_steps_per_epoch)
        steps_per_epoch = batches.steps_per_epoch()
        if steps_per_epoch == 0:
            raise ConfigError(f"data.sampler: p={config.data.sampler.p} × k={config.data.sampler.k} leaves no "
                              f"full batch per process for {len(table)} training images")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps_per_epoch))
        size = tuple(config.data.image_size)
        # with the cache, images arrive decoded and resized: only the random part of the transform runs
        transform = (tensor_stage if cache is not None else default_transform)(size, config.data.augment)
        dataset = SeededDataset(ImageDataset(table, transform, labels, crop_bbox=config.data.crop_bbox, cache=cache))
        workers = plan.num_workers
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_skipping, num_workers=workers,
                            pin_memory=plan.pin_memory, persistent_workers=workers > 0,
                            generator=torch.Generator().manual_seed(config.seed))

        meta = {
            "model": {"name": config.model.name, "kwargs": kwargs},
            "image_size": list(config.data.image_size),
            "label_space": labels.to_dict(),
            "attributes": labels.attribute_names,
            "feat_dim": int(getattr(model, "feat_dim", 0)),
            "dataset": {"format": config.data.format, "root": config.data.root, "train_split": config.data.train_split,
                        "train_images": len(table)},
            "benchmark": config.eval.benchmark,
            "experiment": config.name,
            "seed": config.seed,
            "git_commit": ckpt.git_commit(),
        }

        skips = SkipCounter()
        stopped: dict[str, Any] | None = None
        epoch, step, start_in_epoch = 0, 0, 0
        resumed_step: int | None = None
        history: list[dict[str, Any]] = []
        if resume:
            if ckpt.training_checkpoint_dir(run_dir) is None:
                raise ckpt.CheckpointError(f"{run_dir / ckpt.TRAINING_DIR}: no training checkpoint to resume from")
            state = ckpt.load_training_state(run_dir, model)
            optimizer.load_state_dict(state.optimizer)
            if state.scheduler is not None:
                scheduler.load_state_dict(state.scheduler)
            if state.objective is not None:
                objective.load_state_dict(state.objective)
            rng = state.rng["ranks"][context.rank] if context.rank < len(state.rng["ranks"]) else state.rng["ranks"][0]
            ckpt.restore_rng_states(rng)
            epoch, step, start_in_epoch = state.epoch, state.step, state.step_in_epoch
            skips.count = int(state.extra.get("skipped_images", 0))
            skips.messages = list(state.extra.get("skipped_examples", []))
            history = list(state.extra.get("history", []))
            stopped = state.extra.get("stopped_early")
            resumed_step = step
            log(f"resuming {run_dir} at epoch {epoch + 1}, step {step}"
                + (f" ({start_in_epoch} steps into the epoch)" if start_in_epoch else ""))

        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(config, run_dir / CONFIG_FILE)
        metrics_log = MetricsLog(run_dir, is_main, resumed_step if resume else None)
        step_module = wrap_model(TrainStep(model, objective), context, config.train.find_unused_parameters)
        eager_step = step_module
        amp = plan.amp
        if is_main:
            log(plan.describe())
        steps_left = (config.train.epochs - epoch) * steps_per_epoch - start_in_epoch
        compile_gate = CompileGate(plan.compile, steps_left, log)
        first_compiled_step = False

        def save_checkpoint(epochs_done: int, in_epoch: int) -> None:
            rng_states = gather_objects(ckpt.capture_rng_states(), context)
            if is_main:
                extra = {"skipped_images": skips.count, "skipped_examples": skips.messages, "history": history,
                         **({"stopped_early": stopped} if stopped else {})}
                state = ckpt.TrainingState(
                    epoch=epochs_done, step=step, step_in_epoch=in_epoch, optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), objective=objective.state_dict(), rng={"ranks": rng_states},
                    sampler={"epoch": epochs_done, "start": in_epoch, "seed": config.seed}, extra=extra)
                ckpt.save_training_state(run_dir, model, state)
                log(f"checkpoint saved: epoch {epochs_done}" + (f" + {in_epoch} steps" if in_epoch else "")
                    + f", step {step}")
            barrier(context)

        evaluation: dict[str, Any] | None = None
        if stopped and config.train.early_stop is None:
            stopped = None  # the recipe no longer stops early: train on to train.epochs
        elif stopped:
            log(f"{run_dir}: stopped early after epoch {stopped['epoch']} ({stopped['reason']}); nothing to resume")
        while epoch < config.train.epochs and not stopped:
            batches.set_epoch(epoch, start_in_epoch)
            step_module.train()
            sums: dict[str, float] = {}
            window_images, window_start = 0, time.perf_counter()
            steps_in_window = 0
            bar = tqdm(total=steps_per_epoch, initial=start_in_epoch, desc=f"epoch {epoch + 1}/{config.train.epochs}",
                       unit="step", disable=not show_progress, dynamic_ncols=True)
            in_epoch = start_in_epoch
            for batch in loader:
                skips.update(batch)
                has_images = "image" in batch
                if not all_true(has_images, context):
                    in_epoch += 1  # every image of some rank's batch was unreadable: all ranks skip it
                    bar.update(1)
                    continue
                batch = _to_device(batch, device, channels_last)
                if compile_gate.wants_compile_now():
                    step_module, first_compiled_step = compile_step(eager_step, log), True
                try:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        total, terms = step_module(batch)
                except Exception as exc:
                    if not first_compiled_step:
                        raise
                    # compiling is an optimisation: a toolchain that cannot compile this model
                    # leaves it eager (a real error in the model fails again, eagerly)
                    log(f"torch.compile failed on the first step ({type(exc).__name__}: {exc}); training stays eager")
                    step_module = eager_step
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        total, terms = step_module(batch)
                first_compiled_step = False
                if not torch.isfinite(total):
                    raise FloatingPointError(f"loss became {total.item()} at step {step} (epoch {epoch + 1}); "
                                             "lower optim.lr or check the data")
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if config.optim.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(
                        [p for group in optimizer.param_groups for p in group["params"]], config.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                in_epoch += 1
                steps_in_window += 1
                window_images += len(batch["image"])
                for name, value in {"loss": total, **terms}.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
                bar.update(1)
                if step % config.train.log_every == 0 or in_epoch == steps_per_epoch:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    means = {name: total_value / steps_in_window for name, total_value in sums.items()}
                    throughput = window_images * context.world_size / elapsed
                    row = {"step": step, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                           **{f"train.{k}": round(v, 6) for k, v in means.items()},
                           "images_per_s": round(throughput, 1), "skipped_images": skips.count}
                    if hasattr(objective, "learned_values"):
                        row.update({f"learned.{k}": round(v, 6) for k, v in objective.learned_values().items()})
                    metrics_log.log(row)
                    bar.set_postfix({**{k: f"{v:.3f}" for k, v in means.items()}, "img/s": f"{throughput:.0f}"})
                    sums, window_images, steps_in_window = {}, 0, 0
                    window_start = time.perf_counter()
                every = config.train.checkpoint_every_steps
                if every and in_epoch % every == 0 and in_epoch < steps_per_epoch:
                    save_checkpoint(epoch, in_epoch)
            bar.close()
            epoch += 1
            start_in_epoch = 0
            last = epoch == config.train.epochs
            due = bool(config.train.eval_every and epoch % config.train.eval_every == 0)

            def evaluate_on(split: str, final: bool) -> dict[str, Any] | None:
                result = _evaluate_during_training(model, meta, config, data_root, split, run_dir, epoch, step,
                                                   context, show_progress, log, plan.num_workers, final)
                if result is not None:
                    if is_main:
                        flat = _flatten_numbers("", result.get("metrics", {}), {})
                        metrics_log.log({"step": step, "epoch": epoch,
                                         **{f"eval.{split}.{k}": v for k, v in flat.items()}})
                    history.append({"epoch": epoch, "step": step, "split": split, "metrics": result.get("metrics")})
                return result

            rule = config.train.early_stop
            if config.eval.benchmark and rule is not None and due:
                # the curve and the stopping rule need the validation split at every due epoch, the last included
                evaluate_on(config.eval.split, final=False)
                decision = _stopping_decision(history, config.eval.split, rule)
                log(f"early stop after epoch {epoch}: {'yes' if decision.stop else 'no'}, {decision.reason}")
                if decision.stop and not last:
                    stopped, last = {"epoch": epoch, "reason": decision.reason}, True
            if config.eval.benchmark and (last or (due and rule is None)):
                evaluation = evaluate_on(config.eval.final_split if last else config.eval.split, final=last)
            if is_main:
                ckpt.save_for_inference(model, {**meta, "epoch": epoch, "step": step}, run_dir)
            save_checkpoint(epoch, 0)
            if stopped:
                break

        if is_main and skips.count:
            log(skips.summary())
        if is_main and cache is not None:
            log(cache.stats().summary())
        metrics_log.close()
        return TrainResult(run_dir, model, epoch, step, skips.count, evaluation, history)
    finally:
        cleanup(context)


def _evaluate_during_training(model: nn.Module, meta: dict[str, Any], config: ExperimentConfig, data_root: Path,
                              split: str, run_dir: Path, epoch: int, step: int, context: DistributedContext,
                              progress: bool, log: Any, num_workers: int, last: bool) -> dict[str, Any] | None:
    """Rank 0 evaluates (embedding a benchmark is cheap next to training); the others wait."""
    result = None
    if context.is_main:
        from .. import __version__
        from .evaluate import evaluate_model, provenance, write_results

        was_training = model.training
        evaluation = evaluate_model(model, meta, config.eval.benchmark, split, data_root,
                                    batch_size=config.eval.batch_size, device=context.device,
                                    num_workers=num_workers, progress=progress)
        model.train(was_training)
        result = evaluation.results
        result.update({"epoch": epoch, "step": step, "experiment": config.name, "checkpoint": str(run_dir),
                       **provenance(context.device, {**meta, "package_version": __version__})})
        name = EVAL_FILE if last else f"eval-epoch{epoch:03d}-{split}.json"
        write_results(evaluation, run_dir / name, save_embeddings=last)
        log(f"evaluation after epoch {epoch} on {config.eval.benchmark}/{split}: {summarise(result)}")
    return broadcast_object(result, context) if context.enabled else result


def summarise(result: dict[str, Any]) -> str:
    overall = result.get("metrics", {}).get("overall", {})
    return ", ".join(f"{name} {overall[name]:.4f}" for name in result.get("metric_names", []) if name in overall)
