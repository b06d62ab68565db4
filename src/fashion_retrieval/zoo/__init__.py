"""The model zoo: small converged models shipped inside the package, loaded by name (``zoo:NAME``).

Each model is a folder ``zoo/<name>/`` with the two files of a run directory (``model.safetensors``
in float16, ``meta.json``), pinned in ``zoo/registry.json`` by size and sha256, together with what
it was trained on, under which licence, with which command, and what it scored. Only models trained
on data whose licence allows redistribution of derived weights are admitted (fashion-product,
clothing); a run that read VITON (research use only) is refused by :func:`add_to_zoo`.

Every command that takes ``--checkpoint`` accepts ``zoo:NAME``: :func:`resolve` verifies the files
against the registry before anything reads them, so a zoo model that was changed on disk is
refused (one line naming the file) instead of silently giving other results. This module only
reads (checkpoint loading resolves ``zoo:NAME`` through it); ``zoo/publish.py`` adds a run to a
zoo, with the engine's meta.json reader.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHIPPED_ZOO = Path(__file__).resolve().parent
REGISTRY_NAME = "registry.json"
PREFIX = "zoo:"
WEIGHTS_FILE, META_FILE = "model.safetensors", "meta.json"
# Data a zoo model may be trained on: their licences allow publishing weights trained on them.
REDISTRIBUTABLE_DATA = {"fashion_product": "fashion-product (Myntra catalog, public Kaggle release)",
                        "clothing": "clothing dataset subset (CC0 1.0)",
                        "clothing_to_shop": "clothing (CC0 1.0) + fashion-product (public Kaggle release)"}


class ZooError(ValueError):
    """A zoo name that does not exist, a zoo file that does not match its pin, or a run refused."""


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    task: str  # "consumer-to-shop" | "attributes"
    trained_on: str
    files: dict[str, dict[str, Any]]  # file name -> {"sha256": ..., "size": ...}
    metrics: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    commit: str = ""
    zoo_dir: Path = SHIPPED_ZOO

    @property
    def folder(self) -> Path:
        return self.zoo_dir / self.name


def zoo_dir() -> Path:
    """The package's own zoo, or the folder named by $FASHION_RETRIEVAL_ZOO (tests, a private zoo)."""
    return Path(os.environ.get("FASHION_RETRIEVAL_ZOO") or SHIPPED_ZOO)


def is_zoo_spec(spec: str | Path) -> bool:
    return str(spec).startswith(PREFIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def registry(folder: Path | None = None) -> dict[str, ZooModel]:
    from ..files import quote, read_json

    folder = folder or zoo_dir()
    path = folder / REGISTRY_NAME
    if not path.is_file():
        return {}
    from ..names import is_component

    data = read_json(path, ZooError)
    models = {}
    for name, entry in data.get("models", {}).items():
        # a private zoo's registry is a file someone hands you: its names become folders
        if not is_component(name):
            raise ZooError(f"{path}: model name {quote(name, 80)} is not a plain folder name")
        pinned = entry.get("files") if isinstance(entry, dict) else None
        if isinstance(pinned, dict) and not set(pinned) <= {WEIGHTS_FILE, META_FILE}:
            raise ZooError(f"{path}: entry {quote(name, 80)} pins files other than {WEIGHTS_FILE} and {META_FILE}")
        try:
            models[name] = ZooModel(name=name, **entry, zoo_dir=folder)
        except TypeError as exc:
            raise ZooError(f"{path}: entry {name!r} is malformed ({exc})") from None
    return models


def resolve(spec: str | Path, folder: Path | None = None) -> Path:
    """``zoo:NAME`` -> the verified folder of that model (sizes and sha256 as pinned)."""
    name = str(spec)[len(PREFIX):] if is_zoo_spec(spec) else str(spec)
    models = registry(folder)
    if name not in models:
        known = ", ".join(sorted(models)) or "none shipped in this installation"
        raise ZooError(f"zoo:{name}: no such zoo model (known: {known}); `fashion-retrieval zoo list` lists them")
    model = models[name]
    for file_name, pin in model.files.items():
        file = model.folder / file_name
        if not file.is_file():
            raise ZooError(f"{file}: zoo file missing (zoo:{name} pins it in {REGISTRY_NAME})")
        if file.stat().st_size != pin["size"] or _sha256(file) != pin["sha256"]:
            raise ZooError(f"{file}: does not match the sha256 pinned for zoo:{name} in {REGISTRY_NAME}; "
                           "reinstall the package")
    return model.folder
