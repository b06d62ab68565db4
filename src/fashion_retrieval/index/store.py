"""The vector store interface: what index build, search and the server rely on.

A store maps string ids (catalog item ids or image ids) to L2-normalised vectors plus a
metadata dict, and answers inner-product (cosine) top-k queries. FAISS is the embedded default;
Milvus is the path for a catalog larger than one machine.
"""
from __future__ import annotations

import abc
import hashlib
import glob
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..files import require_keys

HASH_BLOCK = 8 << 20  # large reads: hashing runs at sha256's speed, not at the syscall rate
from ..atomic import fsync_dir, write_file_synced  # noqa: F401  (the stores import them from here)
from ..files import OutsideDirectoryError, ensure_inside


class StoreError(RuntimeError):
    """A store that cannot be opened or written; the message names the path."""


class VectorStore(abc.ABC):
    dim: int

    @abc.abstractmethod
    def add(self, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict[str, Any]] | None = None) -> None:
        """Add vectors; an id already present is replaced."""

    @abc.abstractmethod
    def remove(self, ids: Sequence[str]) -> int:
        """Remove ids; returns how many were present."""

    @abc.abstractmethod
    def search(self, vectors: np.ndarray, k: int, where=None) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k by inner product: scores [Q, k'] and ids (k' = min(k, len(self))); ``where``
        (an ``index.filters.SearchFilter``): only among the items it accepts, k' = min(k, matches)."""

    @abc.abstractmethod
    def get_metadata(self, item_id: str) -> dict[str, Any] | None: ...

    def vectors_of(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors [len(ids), dim] of items present (query expansion's neighbours)."""
        raise StoreError(f"{type(self).__name__} cannot return stored vectors")

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def save(self) -> None:
        """Persist atomically: after a crash at any point the previous or the new state loads."""

    @classmethod
    @abc.abstractmethod
    def open(cls, path: str | Path) -> "VectorStore": ...

    def __contains__(self, item_id: str) -> bool:
        return self.get_metadata(item_id) is not None


def check_vectors(vectors: np.ndarray, dim: int, what: str = "vectors") -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"{what} must have shape [N, {dim}], got {list(vectors.shape)}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return vectors


def check_add(ids: Sequence[Any], vectors: np.ndarray, metadata: Sequence[dict[str, Any]] | None,
              dim: int) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
    """The arguments of a store's ``add``, checked and normalised: string ids, one per row,
    none repeated; float32 [N, dim] finite vectors; one metadata dict per id ({} when none)."""
    ids = [str(i) for i in ids]
    vectors = check_vectors(vectors, dim)
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate ids in one add call")
    metadata = list(metadata) if metadata is not None else [{} for _ in ids]
    if len(metadata) != len(ids):
        raise ValueError(f"{len(metadata)} metadata entries for {len(ids)} ids")
    return ids, vectors, metadata


# ---- checksums of the files a store writes ------------------------------------------------
def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(HASH_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def file_record(data: bytes) -> dict[str, Any]:
    """What a manifest records of a file it lists, computed from the bytes about to be written."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def verify_size(path: Path, record: Any, manifest: Path) -> None:
    """``path`` has the size ``manifest`` recorded: a truncated or replaced file, found without reading it."""
    where = f"{manifest}: files[{path.name!r}]"
    if not isinstance(record, dict):
        raise StoreError(f"{where} must be an object with size and sha256")
    require_keys(record, {"size": int, "sha256": str}, where, StoreError)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise StoreError(f"{path}: file not found, but {manifest.name} lists it; rebuild the index") from None
    except OSError as exc:
        raise StoreError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size != record["size"]:
        raise StoreError(f"{path}: {size} bytes, but {manifest.name} records {record['size']} "
                         "(truncated or overwritten); rebuild the index")


def verify_file(path: Path, record: Any, manifest: Path) -> None:
    """``path`` has the size and then the sha256 that ``manifest`` recorded when it was written."""
    verify_size(path, record, manifest)
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise StoreError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if digest != record["sha256"]:
        raise StoreError(f"{path}: sha256 differs from the one {manifest.name} records (corrupt file); "
                         "rebuild the index")


# ---- atomic directory writes, shared by every store that lives in a directory ------------
# fsync_dir and write_file_synced are atomic.py's (imported above), re-exported for the stores.


def guard(path: str | Path, owner: str | Path, what: str = "index directory") -> Path:
    """:func:`ensure_inside` as a StoreError: every command reports those as one line."""
    try:
        return ensure_inside(path, owner, what)
    except OutsideDirectoryError as exc:
        raise StoreError(str(exc)) from None


def _foreign(path: Path, marker: str | None) -> bool:
    """``path`` exists and is not a directory this project wrote: a symlink, a file, or a
    non-empty folder without a file matching ``marker``."""
    if path.is_symlink():
        return True
    if not path.exists():
        return False
    if not path.is_dir():
        return True
    # ``marker`` may be a pattern ("manifest*.json"): a store names its manifest by generation
    return marker is not None and not any(p.is_file() for p in path.glob(marker)) and any(path.iterdir())


def swap_in(tmp: Path, path: Path, owner: Path | None = None, marker: str | None = None) -> None:
    """Replace directory ``path`` by the complete directory ``tmp`` with two renames.

    ``owner``: the folder both must lie in (default: ``path``'s parent), checked after resolving
    symlinks. ``marker``: the file every directory of this kind holds; an existing ``path``
    without it is not ours and is never moved aside or removed.
    """
    owner = Path(owner) if owner is not None else path.parent
    old = path.with_name(path.name + ".old")
    for each in (tmp, path, old):
        guard(each, owner)
    # the old name is only needed to move an existing ``path`` aside
    for each in (path, old) if path.exists() or path.is_symlink() else ():
        if _foreign(each, marker):
            why = "a link" if each.is_symlink() else f"no {marker}" if marker else "not a folder"
            raise StoreError(f"{each}: exists and is not a store of ours ({why}); refusing to replace or remove it")
    fsync_dir(tmp)
    moved_aside = path.exists()
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    fsync_dir(path.parent)
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)


def recover(path: Path, owner: Path | None = None, marker: str | None = None) -> None:
    """Complete or roll back a swap that a crash interrupted.

    With ``marker``, a ``.old`` folder is only brought back or removed when it holds that file
    (a user's ``photos.old`` beside ``--out photos`` is not a swapped-out index), and only
    leftovers named exactly as ``tempfile.mkdtemp`` names them are removed.
    """
    path = Path(path)
    owner = Path(owner) if owner is not None else path.parent
    old = path.with_name(path.name + ".old")
    if old.exists() and not _foreign(old, marker):  # a foreign one is left alone
        guard(old, owner)
        if not path.exists() and not path.is_symlink():
            guard(path, owner)
            old.rename(path)  # crashed between the two renames: the previous state comes back
        elif not _foreign(path, marker):
            shutil.rmtree(old, ignore_errors=True)  # crashed after the swap, before the clean-up
    leftover_name = re.compile(re.escape(path.name) + r"\.tmp-[a-z0-9_]{8}")
    for leftover in path.parent.glob(glob.escape(path.name) + ".tmp-*"):
        if marker is not None and not leftover_name.fullmatch(leftover.name):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            guard(leftover, owner)
            shutil.rmtree(leftover, ignore_errors=True)
