"""Checkpoints: inference weights + meta for index/serve/export, and resumable training state.

A run directory holds

- ``model.safetensors`` + ``meta.json``: everything :func:`load_for_inference` needs to rebuild
  the model by name and load its weights strictly (no pickle, so a checkpoint from elsewhere
  cannot run code);
- ``checkpoint-last/``: weights + optimizer + scheduler + loss parameters + RNG states + sampler
  position, so ``train --resume`` continues exactly where a killed run stopped.

Every file is written through :mod:`fashion_retrieval.atomic` (a temporary name, flushed to
disk, renamed over the old one), so a crash or a full disk leaves the previous checkpoint intact. The weights and meta.json carry the
same random ``save_id``: if a crash falls between their two renames, loading says so instead of
pairing new weights with an old description.

``meta.json``'s contract is :class:`RunMeta`: every reader goes through it (``meta.image_size``,
``meta.attributes`` …); it still answers ``meta["image_size"]`` as the dict it replaced did.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import stat
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .. import __version__, atomic
from ..files import OutsideDirectoryError, ensure_inside, quote, read_json

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
TRAINING_DIR = "checkpoint-last"
PREVIOUS_TRAINING_DIR = "checkpoint-previous"
TRAINING_STATE_FILE = "training_state.pt"
# meta.json holds the label vocabularies (tens of thousands of item ids): megabytes, not gigabytes
MAX_META_BYTES = 256 << 20
# a side of the model's input: papers use 224-512; a meta.json asking [20000, 20000] made every
# image of `index build` a 1.6 GB tensor (17 GB, then the kernel killed it)
MAX_IMAGE_SIDE = 2048
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors' names of the floating-point dtypes


class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt, of another format version or of another model."""


# ---- helpers ---------------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / torch.compile wrappers (their state_dict keys differ)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _inside_run(path: Path, run_dir: Path) -> None:
    """Refuse to replace or remove ``path`` unless it is a real folder (or absent) inside ``run_dir``."""
    try:
        ensure_inside(path, run_dir, "training checkpoint")
    except OutsideDirectoryError as exc:
        raise CheckpointError(str(exc)) from None
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise CheckpointError(f"{path}: is not a checkpoint folder of this run (a link or a file); "
                              "refusing to replace or remove it")


def _save_weights(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    try:
        # save_model drops tied duplicates and makes channels_last tensors contiguous.
        def write(tmp: Path) -> None:
            save_model(unwrap_model(model), str(tmp), metadata=metadata, force_contiguous=True)
            # safetensors creates its file 0600; the run's other files follow the umask (0644 usually),
            # and a weights file only its writer can read breaks serving it from another account
            os.chmod(tmp, _new_file_mode(path.parent))

        atomic.write_with(path, write)
    except SafetensorError as exc:
        # A failed write (a full disk) arrives as safetensors' own error, "... (os error 28)":
        # as an OSError it reaches the handlers that keep the previous checkpoint and say so.
        raise _as_os_error(exc, path) from exc


def _new_file_mode(folder: Path) -> int:
    """The mode ``open()`` gives a new file in ``folder`` (0666 less the umask). Read from
    /proc on Linux; elsewhere from a probe file, since setting the umask to read it would race
    with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    probe = _temporary_name(folder / "mode-probe")
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def _as_os_error(exc: BaseException, path: Path) -> OSError:
    found = re.search(r"os error (\d+)", str(exc))
    if found:
        number = int(found.group(1))
        return OSError(number, os.strerror(number), str(path))
    return OSError(errno.EIO, _first_line(exc), str(path))


def _load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(path), strict=False, device="cpu")
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(f"{path}: weights do not fit the model: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: cannot read weights ({_first_line(exc)})") from None
    broken = next((name for name, value in model.state_dict().items()
                   if value.is_floating_point() and not torch.isfinite(value).all()), None)
    if broken is not None:  # a diverged run: every embedding would be NaN
        raise CheckpointError(f"{path}: weights contain NaN or infinite values (first in {broken!r}); "
                              "a diverged training run? use an earlier checkpoint")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]!r}")
        raise CheckpointError(f"{path}: weights are from another model: {'; '.join(parts)}")


def _weights_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None


def _check_weights_fit(build, weights: Path) -> None:
    """Refuse a model whose tensors the weights file does not hold, before it is built for real.

    meta.json's model arguments decide how much the model allocates (``num_items`` 1e11 is a 400 GB
    classifier); the file's tensors are bounded by its size. So the model is first built on the
    ``meta`` device (shapes, no memory) and its tensor shapes compared with the file's header.
    A model that cannot be built that way is left to the ordinary build and load.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            stored = {key: (tuple(part.get_shape()), part.get_dtype()) for key, part in slices.items()}
    except Exception:  # noqa: BLE001 - _load_weights names what is wrong with the file
        return
    try:
        with torch.device("meta"):
            skeleton = build()
        wanted = {key: (tuple(value.shape), value.is_floating_point())
                  for key, value in unwrap_model(skeleton).state_dict().items()}
    except Exception:  # noqa: BLE001 - the real build reports its own error
        return
    for key, (shape, floating) in wanted.items():
        if key not in stored:
            continue
        stored_shape, stored_dtype = stored[key]
        if stored_shape != shape:
            raise CheckpointError(f"{weights}: weights do not fit the model: {key!r} is {list(stored_shape)} in the "
                                  f"file, the model described in {META_FILE} needs {list(shape)}")
        if floating and stored_dtype not in FLOAT_DTYPES:
            # loading would cast the integers silently: a model of garbage, NaN embeddings later
            raise CheckpointError(f"{weights}: weights do not fit the model: {key!r} is {stored_dtype} in the "
                                  "file, the model needs floating point numbers")
    missing = [key for key in wanted if key not in stored]
    if missing:
        raise CheckpointError(f"{weights}: weights are from another model: missing {len(missing)} tensor(s), "
                              f"e.g. {missing[0]!r}")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# ---- meta.json ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """What ``MODELS.build`` gets: the registered name and its exact keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunMeta(Mapping):
    """The contract of ``meta.json``: how to rebuild the model and what it was trained on.

    Written by :func:`save_for_inference`, read by :func:`read_meta` / :func:`load_for_inference`
    and, through them, by evaluation, index build, serving and export. Keys this version does not
    know (from a newer or older writer) are kept in ``extra`` and written back unchanged. As a
    read-only mapping it also answers ``meta["image_size"]`` with the JSON value.
    """

    model: ModelSpec
    image_size: list[int] | None = None  # [height, width] the model was trained at
    feat_dim: int = 0
    attribute_conditioned: bool = False
    attributes: list[str] = field(default_factory=list)  # attribute names, in the model's index order
    label_space: dict[str, Any] | None = None  # LabelSpace.to_dict()
    dataset: dict[str, Any] | None = None  # format, root, train_split, train_images
    benchmark: str | None = None
    experiment: str | None = None
    seed: int | None = None
    epoch: int | None = None  # epochs completed when saved
    step: int | None = None
    git_commit: str | None = None
    package_version: str | None = None
    format_version: int = FORMAT_VERSION
    save_id: str | None = None  # the same random id in the weights' header: one save wrote both
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path = "meta") -> "RunMeta":
        """Check ``data`` (a parsed meta.json) and build the meta; errors are one line naming ``source``."""
        if isinstance(data, RunMeta):
            return data
        data = dict(data)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{source}: checkpoint format version {version!r} is not supported "
                                  f"(this is fashion-retrieval {__version__}, format {FORMAT_VERSION})")
        spec = data.get("model")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) \
                or not isinstance(spec.get("kwargs", {}), Mapping):
            raise CheckpointError(f"{source}: 'model' must be {{'name': str, 'kwargs': {{...}}}}")
        size = data.get("image_size")
        if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 2
                                     and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_IMAGE_SIDE
                                             for v in size)):
            raise CheckpointError(f"{source}: 'image_size' must be [height, width] in pixels, at most "
                                  f"{MAX_IMAGE_SIDE} each, got {quote(size, 60)}")
        known = {f.name for f in fields(cls)} - {"model", "extra"}
        values = {key: data[key] for key in known if data.get(key) is not None}
        if size is not None:
            values["image_size"] = list(size)
        values["attributes"] = list(data.get("attributes") or [])
        return cls(model=ModelSpec(spec["name"], dict(spec.get("kwargs", {}))), **values,
                   extra={k: v for k, v in data.items() if k not in known and k != "model"})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of meta.json (fields that are None are left out, as before this class)."""
        out: dict[str, Any] = {"model": {"name": self.model.name, "kwargs": dict(self.model.kwargs)}}
        for each in fields(self):
            if each.name not in ("model", "extra") and getattr(self, each.name) is not None:
                out[each.name] = getattr(self, each.name)
        return {**self.extra, **out}

    def replace(self, **changes: Any) -> "RunMeta":
        """A copy with ``changes``; a key that is no field of this class goes to ``extra``."""
        return RunMeta.from_dict({**self.to_dict(), **changes})

    # read-only mapping over the JSON form, for code written against the dict
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


# ---- inference checkpoints ------------------------------------------------------------------
def save_for_inference(model: nn.Module, meta: RunMeta | Mapping[str, Any], run_dir: str | Path) -> Path:
    """Write ``model.safetensors`` and ``meta.json`` into ``run_dir`` (atomically, fsynced).

    ``meta``: a :class:`RunMeta`, or its dict with at least ``model: {name, kwargs}`` (the exact
    ``MODELS.build`` arguments); ``format_version``, ``package_version``, ``feat_dim``,
    ``attribute_conditioned`` and ``save_id`` are filled in. Returns the weights path.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = meta.get("model")
    if not isinstance(spec, Mapping) or "name" not in spec or not isinstance(spec.get("kwargs", {}), Mapping):
        raise CheckpointError("meta['model'] must be {'name': ..., 'kwargs': {...}} to rebuild the model")
    plain = unwrap_model(model)
    given = meta.get("feat_dim")
    meta = RunMeta.from_dict({
        **dict(meta), "format_version": FORMAT_VERSION, "package_version": __version__,
        "feat_dim": int(given if given is not None else plain.feat_dim),
        "attribute_conditioned": plain.attribute_conditioned, "save_id": uuid.uuid4().hex,
    }, "meta")
    document = meta.to_dict()
    try:
        json.dumps(document)
    except TypeError as exc:
        raise CheckpointError(f"meta is not JSON-serialisable: {exc}") from None
    weights = run_dir / WEIGHTS_FILE
    try:
        _save_weights(plain, weights, {"format_version": str(FORMAT_VERSION), "model": meta.model.name,
                                       "save_id": meta.save_id})
    except OSError as exc:
        raise CheckpointError(f"{weights}: could not write the model ({exc.strerror or exc}); "
                              "the previous model is unchanged") from exc
    try:
        atomic.write_json(run_dir / META_FILE, document)
    except OSError as exc:
        # the new weights are in place but the meta.json beside them is the old one: their save
        # ids differ, so loading refuses the pair instead of rebuilding a mismatched model
        raise CheckpointError(f"{run_dir / META_FILE}: could not write ({exc.strerror or exc}); this model "
                              "cannot be loaded until a save completes") from exc
    return weights


def resolve_zoo(path: str | Path) -> Path:
    """``zoo:NAME`` -> the verified folder of that shipped model (fashion_retrieval/zoo); other paths unchanged."""
    from ..zoo import ZooError, is_zoo_spec, resolve

    if not is_zoo_spec(path):
        return Path(path)
    try:
        return resolve(path)
    except ZooError as exc:
        raise CheckpointError(str(exc)) from None


def _locate(path: str | Path) -> tuple[Path, Path]:
    path = resolve_zoo(path)
    if path.is_dir():
        weights, meta = path / WEIGHTS_FILE, path / META_FILE
    elif path.suffix == ".safetensors":
        weights, meta = path, path.with_name(META_FILE)
    elif path.name == META_FILE:
        weights, meta = path.with_name(WEIGHTS_FILE), path
    elif not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    else:
        raise CheckpointError(f"{path}: expected a run directory or a .safetensors file")
    for required in (weights, meta):
        if not required.is_file():
            raise CheckpointError(f"{required}: file not found (a checkpoint needs {WEIGHTS_FILE} and {META_FILE})")
    return weights, meta


def read_meta(path: str | Path) -> RunMeta:
    """meta.json of a run directory / weights file, checked for format version and model spec."""
    _, meta_path = _locate(path)
    return RunMeta.from_dict(read_json(meta_path, CheckpointError, max_bytes=MAX_META_BYTES), meta_path)


def load_for_inference(path: str | Path, expected_model: str | None = None,
                       device: str | torch.device = "cpu") -> tuple[nn.Module, RunMeta]:
    """Rebuild the model named in meta.json and load its weights strictly; returns ``(model.eval(), meta)``.

    ``path`` is a run directory, its ``model.safetensors`` or its ``meta.json``. With
    ``expected_model`` a checkpoint of another architecture is refused.
    """
    from ..models import build_model
    from ..registry import ConfigError

    weights, meta_path = _locate(path)
    meta = read_meta(meta_path)
    name = meta.model.name
    if expected_model is not None and name != expected_model:
        raise CheckpointError(f"{meta_path}: checkpoint is a '{name}' model, expected '{expected_model}'")
    header = _weights_metadata(weights)
    if header.get("format_version", str(FORMAT_VERSION)) != str(FORMAT_VERSION):
        raise CheckpointError(f"{weights}: weights format version {header.get('format_version')!r} is not "
                              f"supported (expected {FORMAT_VERSION})")
    if "model" in header and header["model"] != name:
        raise CheckpointError(f"{weights}: weights are of model '{header['model']}' but {meta_path.name} "
                              f"describes '{name}'")
    if "save_id" in header and meta.save_id is not None and header["save_id"] != meta.save_id:
        raise CheckpointError(f"{weights}: weights and {meta_path.name} come from different saves "
                              "(an interrupted save?); re-export the checkpoint")
    # The weights replace any pretrained initialisation: never download or read it again.
    def rebuild() -> nn.Module:
        return build_model(name, meta.model.kwargs, attribute_names=meta.attributes, initialise_backbone=False)

    _check_weights_fit(rebuild, weights)
    try:
        model = rebuild()
    except ConfigError as exc:
        raise CheckpointError(f"{meta_path}: cannot rebuild the model: {exc}") from None
    _load_weights(model, weights)
    return model.to(device).eval(), meta


# ---- training state -------------------------------------------------------------------------
@dataclass
class TrainingState:
    """What ``train --resume`` needs besides the model weights."""

    epoch: int  # epochs fully completed
    step: int  # optimizer steps taken in total
    step_in_epoch: int = 0  # > 0 for a checkpoint taken in the middle of epoch ``epoch``
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] | None = None
    objective: dict[str, Any] | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # counters, best metric, config digest...


# Written by checkpoints before issue 17 and never read: bf16 autocast needs no grad scaler, and
# the sampler's position is (epoch, step_in_epoch) above. Dropped when such a checkpoint loads.
RETIRED_TRAINING_STATE_KEYS = ("grad_scaler", "sampler")


def capture_rng_states() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and python RNG states, as weights-only-loadable data."""
    numpy_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": numpy_state[0], "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
                  "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]),
                  "cached_gaussian": float(numpy_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def save_training_state(run_dir: str | Path, model: nn.Module, state: TrainingState) -> Path:
    """Write ``run_dir/checkpoint-last/`` atomically: build it under a temporary name, then swap.

    The previous checkpoint is moved aside only once the new one is complete on disk, and removed
    only after the swap; on any error (a full disk: ``OSError``) it stays in place and the error
    names the directory.
    """
    run_dir = Path(run_dir)
    final = run_dir / TRAINING_DIR
    previous = run_dir / PREVIOUS_TRAINING_DIR
    writing = final  # what the error names: the file as it will be called, not its temporary name
    for each in (final, previous):  # a planted symlink must not make rmtree/rename leave the run
        _inside_run(each, run_dir)
    try:
        with atomic.new_dir(final) as tmp:
            _inside_run(tmp, run_dir)
            writing = final / WEIGHTS_FILE
            _save_weights(model, tmp / WEIGHTS_FILE, {"format_version": str(FORMAT_VERSION)})
            writing = final / TRAINING_STATE_FILE
            with atomic.replacing(tmp / TRAINING_STATE_FILE, "wb") as handle:
                torch.save({"format_version": FORMAT_VERSION, **state.__dict__}, handle)
            writing = final
    except OSError as exc:
        raise CheckpointError(f"{writing}: could not write the training checkpoint ({exc.strerror or exc}); "
                              "the previous checkpoint is unchanged") from exc
    return atomic.swap_dir(tmp, final, previous)


def training_checkpoint_dir(run_dir: str | Path) -> Path | None:
    """The newest complete training checkpoint of ``run_dir``, or None.

    A crash between the two renames of :func:`save_training_state` leaves only the previous one.
    """
    run_dir = Path(run_dir)
    for candidate in (run_dir / TRAINING_DIR, run_dir / PREVIOUS_TRAINING_DIR):
        if (candidate / TRAINING_STATE_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    return None


def load_training_state(run_dir: str | Path, model: nn.Module) -> TrainingState:
    """Load the weights into ``model`` and return the rest; raises CheckpointError when absent."""
    directory = training_checkpoint_dir(run_dir)
    if directory is None:
        raise CheckpointError(f"{Path(run_dir) / TRAINING_DIR}: no training checkpoint to resume from")
    _load_weights(unwrap_model(model), directory / WEIGHTS_FILE)
    state_path = directory / TRAINING_STATE_FILE
    try:
        # weights_only: a run directory may come from someone else, and a full unpickle runs code
        payload = torch.load(state_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, the one thing not to do with such a file
        raise CheckpointError(f"{state_path}: refused: it holds objects other than tensors and plain data "
                              "(not a training state this project wrote)") from None
    except Exception as exc:  # noqa: BLE001 - zip/EOF errors of a corrupt file
        raise CheckpointError(f"{state_path}: corrupt training state ({_first_line(exc)})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{state_path}: corrupt training state (not a mapping)")
    version = payload.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{state_path}: training state format version {version!r} is not supported "
                              f"(expected {FORMAT_VERSION})")
    for retired in RETIRED_TRAINING_STATE_KEYS:
        payload.pop(retired, None)
    try:
        return TrainingState(**payload)
    except TypeError as exc:
        raise CheckpointError(f"{state_path}: unexpected training state ({exc})") from None
