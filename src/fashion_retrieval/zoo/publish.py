"""Adding a trained run to a zoo (``fashion-retrieval zoo add``): float16 weights, its meta.json,
then the pin in the registry. Kept apart from the zoo's reading side (``zoo/__init__.py``), which
checkpoint loading uses, because publishing reads the run with the engine's meta.json reader.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import META_FILE, REDISTRIBUTABLE_DATA, REGISTRY_NAME, WEIGHTS_FILE, ZooError, ZooModel, _sha256, zoo_dir


def _training_format(meta: dict[str, Any]) -> str:
    return str((meta.get("dataset") or {}).get("format") or "")


def add_to_zoo(run_dir: str | Path, name: str, description: str, task: str, metrics: dict[str, Any] | None = None,
               command: str = "", folder: Path | None = None) -> ZooModel:
    """Copy a run's model into the zoo as float16 and pin it; refuses data that may not be redistributed."""
    import torch
    from safetensors.torch import load_file, save_file

    from ..atomic import write_json, write_with
    from ..engine.checkpoint import read_meta
    from ..names import check_name

    check_name(name, "zoo model name", "zoo add", ZooError, component=True)
    run_dir = Path(run_dir)
    meta = read_meta(run_dir / META_FILE).to_dict()
    data_format = _training_format(meta)
    if data_format not in REDISTRIBUTABLE_DATA:
        raise ZooError(f"{run_dir / META_FILE}: trained on {data_format or 'unknown data'!r}; the zoo only takes "
                       f"models trained on {', '.join(sorted(REDISTRIBUTABLE_DATA))} (their licences allow it)")
    from safetensors import safe_open

    with safe_open(str(run_dir / WEIGHTS_FILE), framework="pt") as handle:
        header = handle.metadata() or {}
    tensors = {key: (value.to(torch.float16) if value.is_floating_point() else value)
               for key, value in load_file(str(run_dir / WEIGHTS_FILE)).items()}
    root = folder or zoo_dir()
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    # Local paths of the machine it was trained on say nothing to a user and may say too much.
    meta = {**meta, "zoo": {"name": name, "weights_dtype": "float16"}}
    meta["dataset"] = {key: value for key, value in meta.get("dataset", {}).items() if key != "root"}
    def write_weights(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=header)
        os.chmod(tmp, 0o644)  # safetensors writes 0600; a shipped file is for every user of the package

    write_with(folder / WEIGHTS_FILE, write_weights)
    write_json(folder / META_FILE, meta)
    files = {file_name: {"sha256": _sha256(folder / file_name), "size": (folder / file_name).stat().st_size}
             for file_name in (WEIGHTS_FILE, META_FILE)}
    entry = ZooModel(name=name, description=description, task=task, trained_on=REDISTRIBUTABLE_DATA[data_format],
                     files=files, metrics=dict(metrics or {}), command=command, commit=str(meta.get("git_commit", "")),
                     zoo_dir=root)
    path = root / REGISTRY_NAME
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"models": {}}
    data["models"][name] = {key: value for key, value in entry.__dict__.items() if key not in ("name", "zoo_dir")}
    data["models"] = dict(sorted(data["models"].items()))
    write_json(path, data)  # last: a model whose files were not all written is never pinned
    return entry
