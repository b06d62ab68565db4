"""Reading a backbone's initial weights from a local file (``model.backbone.weights_path``),
safely: a weights file downloaded from elsewhere may be a crafted pickle."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from ..registry import ConfigError


def read_weights(path: Path) -> dict:
    """A state dict from a .safetensors file or a torch file, without running any code from it
    (``weights_only``: a weights file downloaded from elsewhere may be a crafted pickle)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(f"{path}: refused: it holds objects other than tensors (a weights file "
                          "saved with torch.save(model.state_dict()) or a .safetensors file is expected)") from None
    except Exception as exc:  # noqa: BLE001 - zip and safetensors errors of a corrupt file
        lines = str(exc).strip().splitlines()
        raise ConfigError(f"{path}: not a readable weights file ({lines[0] if lines else type(exc).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: not a state dict of tensors")
    return state


def load_state_dict_file(module: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    state = read_weights(path)
    try:
        missing, _ = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same keys, other shapes: a checkpoint of another depth
        raise ConfigError(f"{path} does not fit the model: {str(exc).splitlines()[1:3]}") from None
    if missing and len(missing) == len(module.state_dict()):
        raise ConfigError(f"{path}: no key matches the model (e.g. file has {next(iter(state))!r})")
    # The ImageNet classifier may be absent (a headless checkpoint); anything else missing would
    # silently stay random.
    missing_body = [key for key in missing if not key.startswith("fc.")]
    if missing_body:
        raise ConfigError(f"{path}: {len(missing_body)} backbone weights missing, e.g. {missing_body[:3]}")
