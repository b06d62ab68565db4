"""Experiment recipes: YAML → validated :class:`ExperimentConfig`.

Every section forbids unknown keys, so a typo fails before any data is read, naming the file,
the dotted key and the closest valid key::

    configs/x.yaml: data.imge_size: unknown key (did you mean 'image_size'?)

A recipe may start from another with ``base: other.yaml`` (path relative to the recipe); the
recipe's keys are merged over the base's, mappings key by key, lists replaced whole. Command-line
overrides ``a.b=value`` are applied last; the value is parsed as YAML (``train.epochs=3``,
``model.backbone.pretrained=false``, ``data.image_size=[128,96]``, ``loss.terms.0.weight=0.5``).
Model and loss keyword arguments are free-form here and checked against the builder's signature
when the model is built (``Registry.check_kwargs``); the backbone's options are a section of their
own, ``model.backbone`` (:class:`BackboneConfig`), into which :func:`nest_backbone_options` moves
the older flat spelling (``model.kwargs.backbone=NAME``, ``model.kwargs.pretrained=...``).
"""
from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import atomic
from .files import parse_yaml, quote, read_yaml
from .names import name_problem
from .registry import ConfigError, check_name

__all__ = ["ConfigError", "ExperimentConfig", "BackboneConfig", "load_config", "apply_overrides", "config_from_dict",
           "nest_backbone_options"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplerConfig(StrictModel):
    kind: str = Field("pk", description="SAMPLERS name (data/samplers.py): pk, cross_domain, attribute")
    p: int = Field(16, ge=1, description="groups per batch: identities, items or attribute values")
    k: int = Field(4, ge=1, description="images per group (cross_domain: half consumer, half shop)")
    label: Literal["item", "category"] = Field("item", description="what a P×K group shares (pk only)")

    @field_validator("kind")
    @classmethod
    def _known_sampler(cls, kind: str) -> str:
        from .data.samplers import SAMPLERS

        return check_name(SAMPLERS, kind)


class DataConfig(StrictModel):
    format: str = Field(description="dataset reader name (READERS), e.g. viton, fashion_product, deepfashion_c2s")
    root: str = Field(".", description="dataset folder, relative to the data root")
    options: dict[str, Any] = Field(default_factory=dict, description="extra reader keyword arguments")
    image_size: tuple[int, int] = Field((256, 192), description="[height, width] fed to the model")
    train_split: list[str] = Field(default_factory=lambda: ["train"])
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field("auto", description="DataLoader workers; auto: 1 on a CPU of "
                                                                      "up to 4 cores, more on bigger ones and "
                                                                      "on CUDA (engine/execution.py)")
    attributes: list[str] | None = Field(None, description="attributes a model learns, in this order "
                                                           "(default: all of the table's)")
    identity: Literal["item", "category"] = Field("item", description="what counts as the same identity for "
                                                                         "ID and metric losses: the product, or "
                                                                         "its category (category-level retrieval)")
    augment: bool = True
    crop_bbox: bool = Field(False, description="crop each image to its annotated box (DeepFashion, Street2Shop)")
    decoded_cache: str = Field("run", description="decoded-image cache for training: 'run' (inside the run "
                                                  "directory), 'off', or a folder shared by runs; epochs after "
                                                  "the first then do no JPEG work")

    @field_validator("decoded_cache", mode="before")
    @classmethod
    def _cache_switch(cls, where: Any) -> Any:
        # YAML reads `off` / `on` (and a `key=off` override) as booleans
        return {False: "off", True: "run"}.get(where, where) if isinstance(where, bool) else where

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, size: tuple[int, int]) -> tuple[int, int]:
        if min(size) < 8:
            raise ValueError(f"image_size must be [height, width] of at least 8 pixels each, got {list(size)}")
        return size


class BackboneConfig(StrictModel):
    """``model.backbone``: the feature extractor every model is built on (models/backbones.py).
    Options left null take the backbone's or the model's own default."""
    name: str = Field("resnet18", description="BACKBONES name: resnet18, resnet50, efficientnet_lite0, "
                                              "efficientnet_lite2")
    pretrained: bool | str = Field(False, description="ImageNet initialisation: true, or a torchvision weights "
                                                      "name such as IMAGENET1K_V2 (ResNet)")
    weights_path: str | None = Field(None, description="a local .pth / .safetensors file to initialise from "
                                                       "instead (offline)")
    last_stride: Literal[1, 2] | None = Field(None, description="1 keeps C5 at stride 16 (re-id trick); null: "
                                                                "the model's default (1 for global_net and "
                                                                "mmfl_net, 2 otherwise)")
    drop_connect_rate: float | None = Field(None, ge=0, lt=1, description="EfficientNet-Lite stochastic depth "
                                                                          "(null: 0.2)")


# Before the backbone had its own section these were model.kwargs keys (``backbone`` held the name);
# recipes, command lines and meta.json files of that time still spell them so.
FLAT_BACKBONE_KEYS = ("pretrained", "weights_path", "last_stride", "drop_connect_rate")


def nest_backbone_options(kwargs: dict[str, Any], backbone: dict[str, Any] | None = None) -> dict[str, Any]:
    """Model keyword arguments with every backbone option in one ``backbone`` mapping.

    The one migration of the old flat spelling (``kwargs: {backbone: resnet50, pretrained: true}``)
    to the nested one (``backbone: {name: resnet50, pretrained: true}``), for recipes, command-line
    overrides and the meta.json of older checkpoints alike. ``backbone`` is the recipe's
    ``model.backbone`` section; flat keys in ``kwargs`` override it, so an override such as
    ``model.kwargs.backbone=efficientnet_lite0`` changes the name and keeps the section's other
    options. Without any backbone option the model's default backbone is kept (no key added).
    Raises ConfigError naming the bad option."""
    kwargs = dict(kwargs)
    section = dict(backbone or {})
    given = backbone is not None
    inline = kwargs.pop("backbone", None)
    if isinstance(inline, dict):
        section.update(inline)
        given = True
    elif inline is not None:
        section["name"] = inline
        given = True
    for key in FLAT_BACKBONE_KEYS:
        if key in kwargs:
            section[key] = kwargs.pop(key)
            given = True
    if given:
        try:
            nested = BackboneConfig.model_validate(section)
        except ValidationError as exc:
            error = exc.errors()[0]
            raise ConfigError(f"backbone.{'.'.join(str(p) for p in error['loc'])}: "
                              f"{error['msg'].removeprefix('Value error, ')}") from None
        kwargs["backbone"] = nested.model_dump(exclude_none=True)
    return kwargs


class ModelConfig(StrictModel):
    name: str
    backbone: BackboneConfig | None = Field(None, description="the backbone and its options (default: the "
                                                              "model's, resnet18 without pretrained weights)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="MODELS builder keyword arguments")

    @model_validator(mode="after")
    def _backbone_options_are_valid(self) -> "ModelConfig":
        try:  # the old flat keys in kwargs are checked where the nested section would be
            nest_backbone_options(self.kwargs, self.backbone_section())
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def backbone_section(self) -> dict[str, Any] | None:
        return None if self.backbone is None else self.backbone.model_dump(exclude_none=True)

    def build_kwargs(self) -> dict[str, Any]:
        """``MODELS.build`` keyword arguments: ``kwargs`` with the backbone options nested."""
        return nest_backbone_options(self.kwargs, self.backbone_section())


class LossTermConfig(BaseModel):
    """``{name, weight, ...}``; every other key is the loss builder's keyword argument."""

    model_config = ConfigDict(extra="allow")
    name: str
    weight: float = 1.0

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LossConfig(StrictModel):
    terms: list[LossTermConfig] = Field(min_length=1)


class OptimConfig(StrictModel):
    name: str = Field("adamw", description="OPTIMIZERS name (optim.py): adam, adamw, sgd")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, description="sgd only")
    backbone_lr_mult: float = Field(1.0, ge=0, description="learning-rate factor of the backbone's parameters")
    loss_lr_mult: float = Field(1.0, ge=0, description="factor for loss parameters (centers, margin weights)")
    scheduler: str = Field("cosine", description="SCHEDULES name (optim.py): cosine, step, none")
    warmup_epochs: float = Field(0.0, ge=0)
    step_epochs: list[int] = Field(default_factory=list, description="step scheduler: epochs where lr *= gamma")
    gamma: float = Field(0.1, gt=0)
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value")

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        from .optim import OPTIMIZERS

        return check_name(OPTIMIZERS, name)

    @field_validator("scheduler")
    @classmethod
    def _known_schedule(cls, name: str) -> str:
        from .optim import SCHEDULES

        return check_name(SCHEDULES, name)


class EarlyStopConfig(StrictModel):
    """Stop once the validation metric has stopped improving (engine/stopping.py)."""
    metric: str = Field(description="'/'-path into the evaluation's metrics, e.g. overall/mAP or overall/MAP@all")
    patience: int = Field(3, ge=1, description="evaluations that must bring the gain")
    min_delta: float = Field(0.5, ge=0, description="the gain that counts, in points (fraction x 100)")


class TrainConfig(StrictModel):
    epochs: int = Field(10, ge=1, description="epochs to train; with early_stop, the cap")
    early_stop: EarlyStopConfig | None = Field(None, description="stop on a plateau of the validation metric "
                                                                  "(needs eval.benchmark and eval_every)")
    amp: bool | Literal["auto"] = Field("auto", description="bf16 autocast; auto: on CUDA only (it measured "
                                                              "slower on the CPU, docs/performance.md)")
    channels_last: bool | Literal["auto"] = Field("auto", description="channels-last memory format; auto: on "
                                                                        "(CPU and CUDA)")
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile the training step; auto: on "
                                                                  "CUDA once a few timed steps show the rest of "
                                                                  "the run pays the compile time back, off on "
                                                                  "the CPU (measured slower there)")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: the cores, per rank)")
    freeze_backbone_stages: int = Field(0, ge=0, description="freeze the backbone's stem and its first N "
                                                               "stages (weights and BatchNorm statistics)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    log_every: int = Field(20, ge=1, description="steps between metrics.csv / TensorBoard rows")
    eval_every: int = Field(0, ge=0, description="evaluate every N epochs (0: only after the last)")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap steps per epoch (small budgets)")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="also checkpoint mid-epoch every N steps")
    find_unused_parameters: bool = Field(True, description="DDP: allow parameters a step does not use")
    progress: bool = True


class EvalConfig(StrictModel):
    benchmark: str | None = Field(None, description="BENCHMARKS name; null: no evaluation during training")
    split: Literal["train", "val", "test"] = Field("val", description="split evaluated every eval_every epochs")
    final_split: Literal["train", "val", "test"] = Field("test", description="split evaluated after training")
    batch_size: int = Field(64, ge=1)
    options: dict[str, Any] = Field(default_factory=dict, description="the benchmark's keyword arguments; "
                                    "catalog: queries, level, attributes (its catalog, format and columns "
                                    "default to the recipe's data section)")


class ExperimentConfig(StrictModel):
    name: str
    description: str = ""
    seed: int = 0
    plugins: list[str] = Field(default_factory=list, description="modules imported first; they may register "
                                                                   "their own models, losses or readers")
    data: DataConfig
    model: ModelConfig
    loss: LossConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("plugins")
    @classmethod
    def _import_plugins(cls, modules: list[str]) -> list[str]:
        # before the sections below are checked: a plugin's samplers, optimizers and schedules
        # must be registered when data.sampler.kind and optim.* are looked up
        import importlib

        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ValueError(f"cannot import '{name}' ({exc})") from None
        return modules

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, name: str) -> str:
        # the default run directory is runs/<name>: a name is one folder, never a path
        problem = name_problem(name, component=True)
        if problem is not None:
            raise ValueError(f"{quote(name, 80)} {problem}; the recipe name becomes the run directory runs/<name>")
        return name

    @model_validator(mode="after")
    def _early_stop_has_evaluations(self) -> "ExperimentConfig":
        if self.train.early_stop is not None and not (self.eval.benchmark and self.train.eval_every):
            raise ValueError("train.early_stop needs evaluations to stop on: set eval.benchmark and "
                             "train.eval_every (e.g. 1)")
        return self

    @model_validator(mode="after")
    def _sampler_fits(self) -> "ExperimentConfig":
        sampler = self.data.sampler
        if sampler.kind == "cross_domain" and sampler.k % 2:
            raise ValueError(f"data.sampler.k must be even for cross_domain (half consumer, half shop), got {sampler.k}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def benchmark_options(self) -> dict[str, Any]:
        """``eval.options``; the ``catalog`` benchmark reads the recipe's own catalog unless they
        name another (``data.root`` relative to the data root, its format and reader options)."""
        options = dict(self.eval.options)
        if self.eval.benchmark == "catalog" and "catalog" not in options:
            options.update(catalog=self.data.root, format=self.data.format, options=dict(self.data.options))
        return options


# ---- loading ---------------------------------------------------------------------------------
def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = read_yaml(path, ConfigError)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, loss, ...), got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / str(base)).resolve()
    if base_path in chain:
        raise ConfigError(f"{path}: base chain loops back to {base_path}")
    return _merge(_read_yaml(base_path, chain + (path.resolve(),)), data)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "override") -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML; list elements by index)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{source}: '{override}' is not of the form key.path=value")
        value = parse_yaml(raw, f"{source}: override {key}", ConfigError, text_if_invalid=True) if raw.strip() else ""
        parts = key.split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{source}: {'.'.join(parts[:depth + 1])}: no list element {part} "
                                      f"(the list has {len(node)})")
                index = int(part)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if not isinstance(node.get(part), (dict, list)):
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"{source}: {'.'.join(parts[:depth])} is a value, it has no key '{part}'")
    return data


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the section that ``loc`` (a pydantic error location) points into."""
    annotation: Any = ExperimentConfig
    for part in loc:
        annotation = _strip_optional(annotation)
        if isinstance(part, int):
            args = typing.get_args(annotation)
            annotation = args[0] if args else Any
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            if field is None:
                return list(annotation.model_fields)
            annotation = field.annotation
        else:
            return []
    annotation = _strip_optional(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _strip_optional(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return annotation


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        options = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), options, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else (f"; valid keys: {', '.join(options)}" if options else "")
        return f"{dotted}: unknown key{hint}"
    if error["type"] == "missing":
        if loc and isinstance(loc[-1], int):  # a too-short fixed-size list such as image_size
            return f"{'.'.join(str(p) for p in loc[:-1])}: expected {loc[-1] + 1} or more values"
        return f"{dotted}: required key is missing"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    # quote(): the offending value may be a 4,000-character string or a huge nested list
    return f"{dotted}: {message} (got {quote(error.get('input'), 80)})" if error["type"] != "value_error" else f"{dotted}: {message}"


def config_from_dict(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise ConfigError(f"{source}: {problems[0]}{more}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a recipe (following ``base:``), apply ``key.path=value`` overrides, validate."""
    path = Path(path)
    data = _read_yaml(path)
    data = apply_overrides(data, list(overrides or []), source=str(path))
    return config_from_dict(data, source=str(path))


def dump_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the recipe beside a run; a half-written copy would make the next resume refuse it."""
    path = Path(path)
    try:
        atomic.write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
    except OSError as exc:
        # a failed write (a full disk) names no file by itself
        raise OSError(exc.errno, f"could not write the run's recipe ({exc.strerror or exc})", str(path)) from exc
