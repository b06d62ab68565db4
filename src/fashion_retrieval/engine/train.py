"""The training loop: setup, restore, epochs, end of epoch.

``train()`` reads as those four phases. What a recipe builds comes from ``builders.py`` (model,
objective, optimizer, schedule) and ``data/training.py`` (table, labels, seeded batches); the
checkpoint contract from ``checkpoint.py``; the log from ``metrics_log.py``; when to stop early
from ``stopping.py``.

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

import math

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, ExperimentConfig, config_from_dict, dump_config
from ..data.images import SkipCounter
from ..data.training import TrainingData, build_training_data
from ..files import quote, refuse_other_artefact
from ..provenance import git_commit
from . import checkpoint as ckpt
from .builders import build_model, build_objective_for, build_optimizer, build_schedule, import_plugins, seed_everything
from .distributed import (DistributedContext, all_true, barrier, broadcast_object, cleanup, gather_objects,
                          init_distributed, wrap_model)
from .execution import CompileGate, ExecutionPlan, compile_step, freeze_backbone_stages, plan_execution
from .metrics_log import METRICS_FILE, MetricsLog, flatten_numbers
from .stopping import StopDecision, available_metrics, metric_value, should_stop

CONFIG_FILE = "config.yaml"
EVAL_FILE = "eval.json"
__all__ = ["train", "TrainResult", "TrainStep", "CONFIG_FILE", "METRICS_FILE", "EVAL_FILE"]


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    epochs: int
    steps: int
    skipped_images: int
    evaluation: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class TrainStep(nn.Module):
    """Model and objective as one module, so DDP synchronises loss parameters (centers, margin
    weights) together with the model's."""

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # every model takes the attribute; only attribute-conditioned ones read it
        return self.objective(self.model(batch["image"], attribute=batch.get("attribute")), batch)


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if channels_last:
        moved["image"] = moved["image"].contiguous(memory_format=torch.channels_last)
    return moved


@dataclass
class _Run:
    """One training run between its phases: what setup built and where the loop stands."""

    config: ExperimentConfig
    data_root: Path
    run_dir: Path
    context: DistributedContext
    log: Any
    show_progress: bool
    data: TrainingData
    model: nn.Module
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    plan: ExecutionPlan
    loader: Any
    meta: ckpt.RunMeta
    skips: SkipCounter = field(default_factory=SkipCounter)
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    start_in_epoch: int = 0  # steps of epoch ``epoch`` already taken (a mid-epoch resume)
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: dict[str, Any] | None = None  # {"epoch", "reason"} once early stopping ended the run
    evaluation: dict[str, Any] | None = None
    metrics_log: MetricsLog | None = None
    step_module: nn.Module | None = None
    eager_step: nn.Module | None = None
    compile_gate: CompileGate | None = None

    @property
    def is_main(self) -> bool:
        return self.context.is_main


def train(config: ExperimentConfig, data_root: str | Path, out_dir: str | Path, resume: bool = False,
          progress: bool | None = None, log: Any = print) -> TrainResult:
    """Train ``config`` on ``data_root``; writes checkpoints, metrics and evaluation into ``out_dir``.

    Under ``torchrun`` every process calls this; rank 0 alone writes files.
    """
    context = init_distributed(config.train.device)
    show_progress = (config.train.progress if progress is None else progress) and context.is_main
    try:
        run = _setup(config, Path(data_root), Path(out_dir), resume, context, show_progress, log)
        resumed_step = _restore(run) if resume else None
        _start(run, resumed_step)
        if run.stopped and config.train.early_stop is None:
            run.stopped = None  # the recipe no longer stops early: train on to train.epochs
        elif run.stopped:
            log(f"{run.run_dir}: stopped early after epoch {run.stopped['epoch']} ({run.stopped['reason']}); "
                "nothing to resume")
        while run.epoch < config.train.epochs and not run.stopped:
            _train_epoch(run)
            _end_of_epoch(run)
        _finish(run)
        return TrainResult(run.run_dir, run.model, run.epoch, run.step, run.skips.count, run.evaluation, run.history)
    finally:
        cleanup(context)


# ---- setup -----------------------------------------------------------------------------------
def _setup(config: ExperimentConfig, data_root: Path, run_dir: Path, resume: bool, context: DistributedContext,
           show_progress: bool, log: Any) -> _Run:
    """Checks, then data, model, objective, execution plan, optimizer and schedule."""
    refuse_other_artefact(run_dir, "run", ConfigError)
    import_plugins(config.plugins)
    if not resume and context.is_main and not _is_empty_run(run_dir) and ckpt.training_checkpoint_dir(run_dir):
        raise ConfigError(f"{run_dir}: already holds a training run; pass --resume to continue it "
                          "or choose another --out")
    if resume:
        _check_resumable(run_dir, config)
    seed_everything(config.seed)
    data = build_training_data(config, data_root, run_dir, context.rank, context.world_size)
    model, kwargs = build_model(config, data.labels)
    if model.attribute_conditioned and config.data.sampler.kind != "attribute":
        raise ConfigError(f"data.sampler.kind: model '{config.model.name}' is attribute-conditioned and needs "
                          "kind: attribute (batches of one attribute each)")
    objective = build_objective_for(config, model, data.labels, data.table)
    device = context.device
    plan = plan_execution(config, device, context.world_size, decoded_cache=data.cache is not None)
    if device.type == "cpu" and torch.get_num_threads() != plan.threads:
        torch.set_num_threads(plan.threads)
    model.to(device)
    objective.to(device)
    if plan.channels_last:
        model.to(memory_format=torch.channels_last)
    freeze_backbone_stages(model, plan.frozen_stages)
    optimizer = build_optimizer(config, model, objective)
    scheduler = build_schedule(config, optimizer, data.steps_per_epoch)
    meta = ckpt.RunMeta(
        model=ckpt.ModelSpec(config.model.name, kwargs), image_size=list(config.data.image_size),
        label_space=data.labels.to_dict(), attributes=data.labels.attribute_names,
        feat_dim=model.feat_dim,
        dataset={"format": config.data.format, "root": config.data.root, "train_split": config.data.train_split,
                 "train_images": len(data.table)},
        benchmark=config.eval.benchmark, experiment=config.name, seed=config.seed, git_commit=git_commit())
    return _Run(config, data_root, run_dir, context, log, show_progress, data, model, objective, optimizer, scheduler,
                plan, data.loader(plan.num_workers, plan.pin_memory), meta)


def _is_empty_run(run_dir: Path) -> bool:
    return not run_dir.exists() or not any(run_dir.iterdir())


def _check_resumable(run_dir: Path, config: ExperimentConfig) -> None:
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.exists():
        return
    from ..files import read_yaml

    saved = read_yaml(saved_path, ConfigError)
    if not isinstance(saved, dict):
        raise ConfigError(f"{saved_path}: expected the run's recipe (a mapping), got {type(saved).__name__}")
    saved_config = config_from_dict(saved, str(saved_path))
    saved, current = saved_config.to_dict(), config.to_dict()
    # backbone options spelled flat (a run started before model.backbone existed) or nested build
    # the same model: compare what is built
    for snapshot, source in ((saved, saved_config), (current, config)):
        snapshot["model"] = {"name": source.model.name, "kwargs": source.model.build_kwargs()}
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


# ---- restore -------------------------------------------------------------------------------------
def _restore(run: _Run) -> int:
    """Weights, optimizer, schedule, loss parameters, RNG and counters from the run's last
    training checkpoint; returns the step it was taken at."""
    if ckpt.training_checkpoint_dir(run.run_dir) is None:
        raise ckpt.CheckpointError(f"{run.run_dir / ckpt.TRAINING_DIR}: no training checkpoint to resume from")
    state = ckpt.load_training_state(run.run_dir, run.model)
    run.optimizer.load_state_dict(state.optimizer)
    if state.scheduler is not None:
        run.scheduler.load_state_dict(state.scheduler)
    if state.objective is not None:
        run.objective.load_state_dict(state.objective)
    ranks = state.rng["ranks"]
    ckpt.restore_rng_states(ranks[run.context.rank] if run.context.rank < len(ranks) else ranks[0])
    run.epoch, run.step, run.start_in_epoch = state.epoch, state.step, state.step_in_epoch
    run.skips.count = int(state.extra.get("skipped_images", 0))
    run.skips.messages = list(state.extra.get("skipped_examples", []))
    run.history = list(state.extra.get("history", []))
    run.stopped = state.extra.get("stopped_early")
    run.log(f"resuming {run.run_dir} at epoch {run.epoch + 1}, step {run.step}"
            + (f" ({run.start_in_epoch} steps into the epoch)" if run.start_in_epoch else ""))
    return run.step


def _start(run: _Run, resumed_step: int | None) -> None:
    """The run directory's recipe copy, the metrics log and the (maybe compiled) training step."""
    if run.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(run.config, run.run_dir / CONFIG_FILE)
    run.metrics_log = MetricsLog(run.run_dir, run.is_main, resumed_step)
    run.step_module = run.eager_step = wrap_model(TrainStep(run.model, run.objective), run.context,
                                                  run.config.train.find_unused_parameters)
    if run.is_main:
        run.log(run.plan.describe())
    steps_left = (run.config.train.epochs - run.epoch) * run.data.steps_per_epoch - run.start_in_epoch
    run.compile_gate = CompileGate(run.plan.compile, steps_left, run.log)


# ---- one epoch -------------------------------------------------------------------------------
def _train_epoch(run: _Run) -> None:
    """The epoch's remaining steps, logging every ``log_every`` and checkpointing every
    ``checkpoint_every_steps``; ``run.epoch`` counts it done at the end."""
    from tqdm.auto import tqdm

    config, context, device = run.config, run.context, run.context.device
    steps_per_epoch, amp, channels_last = run.data.steps_per_epoch, run.plan.amp, run.plan.channels_last
    run.data.batches.set_epoch(run.epoch, run.start_in_epoch)
    run.step_module.train()
    sums: dict[str, float] = {}
    window_images, window_start, steps_in_window = 0, time.perf_counter(), 0
    bar = tqdm(total=steps_per_epoch, initial=run.start_in_epoch, desc=f"epoch {run.epoch + 1}/{config.train.epochs}",
               unit="step", disable=not run.show_progress, dynamic_ncols=True)
    in_epoch = run.start_in_epoch
    first_compiled_step = False
    for batch in run.loader:
        run.skips.update(batch)
        if not all_true("image" in batch, context):
            in_epoch += 1  # every image of some rank's batch was unreadable: all ranks skip it
            bar.update(1)
            continue
        batch = _to_device(batch, device, channels_last)
        if run.compile_gate.wants_compile_now():
            run.step_module, first_compiled_step = compile_step(run.eager_step, run.log), True
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                total, terms = run.step_module(batch)
        except Exception as exc:
            if not first_compiled_step:
                raise
            # compiling is an optimisation: a toolchain that cannot compile this model
            # leaves it eager (a real error in the model fails again, eagerly)
            run.log(f"torch.compile failed on the first step ({type(exc).__name__}: {exc}); training stays eager")
            run.step_module = run.eager_step
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                total, terms = run.step_module(batch)
        first_compiled_step = False
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss became {total.item()} at step {run.step} (epoch {run.epoch + 1}); "
                                     "lower optim.lr or check the data")
        run.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if config.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for group in run.optimizer.param_groups for p in group["params"]], config.optim.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        run.step += 1
        in_epoch += 1
        steps_in_window += 1
        window_images += len(batch["image"])
        for name, value in {"loss": total, **terms}.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
        bar.update(1)
        if run.step % config.train.log_every == 0 or in_epoch == steps_per_epoch:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            means = {name: total_value / steps_in_window for name, total_value in sums.items()}
            throughput = window_images * context.world_size / elapsed
            row = {"step": run.step, "epoch": run.epoch + 1, "lr": run.optimizer.param_groups[0]["lr"],
                   **{f"train.{k}": round(v, 6) for k, v in means.items()},
                   "images_per_s": round(throughput, 1), "skipped_images": run.skips.count}
            if hasattr(run.objective, "learned_values"):
                row.update({f"learned.{k}": round(v, 6) for k, v in run.objective.learned_values().items()})
            run.metrics_log.log(row)
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in means.items()}, "img/s": f"{throughput:.0f}"})
            sums, window_images, steps_in_window = {}, 0, 0
            window_start = time.perf_counter()
        every = config.train.checkpoint_every_steps
        if every and in_epoch % every == 0 and in_epoch < steps_per_epoch:
            _save_checkpoint(run, run.epoch, in_epoch)
    bar.close()
    run.epoch += 1
    run.start_in_epoch = 0


def _save_checkpoint(run: _Run, epochs_done: int, in_epoch: int) -> None:
    """The training checkpoint (every rank's RNG, gathered; rank 0 writes)."""
    rng_states = gather_objects(ckpt.capture_rng_states(), run.context)
    if run.is_main:
        extra = {"skipped_images": run.skips.count, "skipped_examples": run.skips.messages, "history": run.history,
                 **({"stopped_early": run.stopped} if run.stopped else {})}
        state = ckpt.TrainingState(
            epoch=epochs_done, step=run.step, step_in_epoch=in_epoch, optimizer=run.optimizer.state_dict(),
            scheduler=run.scheduler.state_dict(), objective=run.objective.state_dict(), rng={"ranks": rng_states},
            extra=extra)
        ckpt.save_training_state(run.run_dir, run.model, state)
        run.log(f"checkpoint saved: epoch {epochs_done}" + (f" + {in_epoch} steps" if in_epoch else "")
                + f", step {run.step}")
    barrier(run.context)


# ---- end of an epoch -----------------------------------------------------------------------------
def _end_of_epoch(run: _Run) -> None:
    """Evaluate when due, decide on early stopping, save the model and the training checkpoint."""
    config, epoch = run.config, run.epoch
    last = epoch == config.train.epochs
    due = bool(config.train.eval_every and epoch % config.train.eval_every == 0)
    rule = config.train.early_stop
    if config.eval.benchmark and rule is not None and due:
        # the curve and the stopping rule need the validation split at every due epoch, the last included
        _evaluate_and_log(run, config.eval.split, final=False)
        decision = _stopping_decision(run.history, config.eval.split, rule)
        run.log(f"early stop after epoch {epoch}: {'yes' if decision.stop else 'no'}, {decision.reason}")
        if decision.stop and not last:
            run.stopped, last = {"epoch": epoch, "reason": decision.reason}, True
    if config.eval.benchmark and (last or (due and rule is None)):
        run.evaluation = _evaluate_and_log(run, config.eval.final_split if last else config.eval.split, final=last)
    if run.is_main:
        ckpt.save_for_inference(run.model, run.meta.replace(epoch=epoch, step=run.step), run.run_dir)
    _save_checkpoint(run, epoch, 0)


def _evaluate_and_log(run: _Run, split: str, final: bool) -> dict[str, Any] | None:
    result = _evaluate_during_training(run.model, run.meta, run.config, run.data_root, split, run.run_dir, run.epoch,
                                       run.step, run.context, run.show_progress, run.log, run.plan.num_workers, final)
    if result is not None:
        if run.is_main:
            flat = flatten_numbers("", result.get("metrics", {}), {})
            run.metrics_log.log({"step": run.step, "epoch": run.epoch,
                                 **{f"eval.{split}.{k}": v for k, v in flat.items()}})
        run.history.append({"epoch": run.epoch, "step": run.step, "split": split, "metrics": result.get("metrics")})
    return result


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


def _finish(run: _Run) -> None:
    if run.is_main and run.skips.count:
        run.log(run.skips.summary())
    if run.is_main and run.data.cache is not None:
        run.log(run.data.cache.stats().summary())
    run.metrics_log.close()


def _evaluate_during_training(model: nn.Module, meta: ckpt.RunMeta, config: ExperimentConfig, data_root: Path,
                              split: str, run_dir: Path, epoch: int, step: int, context: DistributedContext,
                              progress: bool, log: Any, num_workers: int, last: bool) -> dict[str, Any] | None:
    """Rank 0 evaluates (embedding a benchmark is cheap next to training); the others wait."""
    result = None
    if context.is_main:
        from .. import __version__
        from ..provenance import provenance
        from .evaluate import evaluate_model, write_results

        was_training = model.training
        evaluation = evaluate_model(model, meta, config.eval.benchmark, split, data_root,
                                    batch_size=config.eval.batch_size, device=context.device,
                                    num_workers=num_workers, progress=progress,
                                    benchmark_options=config.benchmark_options())
        model.train(was_training)
        result = evaluation.results
        result.update({"epoch": epoch, "step": step, "experiment": config.name, "checkpoint": str(run_dir),
                       **provenance(context.device, meta.replace(package_version=__version__))})
        name = EVAL_FILE if last else f"eval-epoch{epoch:03d}-{split}.json"
        write_results(evaluation, run_dir / name, save_embeddings=last)
        log(f"evaluation after epoch {epoch} on {config.eval.benchmark}/{split}: {summarise(result)}")
    return broadcast_object(result, context) if context.enabled else result


def summarise(result: dict[str, Any]) -> str:
    overall = result.get("metrics", {}).get("overall", {})
    return ", ".join(f"{name} {overall[name]:.4f}" for name in result.get("metric_names", []) if name in overall)
