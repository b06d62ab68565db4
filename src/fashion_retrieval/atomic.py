"""Atomic writes: every file or folder the project writes is either the old one or the whole new one.

One level of care everywhere: the new content goes to a temporary name beside its target, is
flushed to the disk (``fsync``), renamed over the target, and the folder holding it is flushed
too (a rename is only durable once the directory entry is on disk). A failure (a full disk)
removes the temporary file and re-raises; the previous file is untouched. Callers name the
target in their own one-line error.

- :func:`replacing` — a handle to write a file through (CSV writers, ``torch.save``, ``np.savez``);
- :func:`write_bytes`, :func:`write_text`, :func:`write_json` — whole contents at once;
- :func:`write_with` — for libraries that only write to a path (safetensors, ONNX export);
- :func:`new_dir` + :func:`swap_dir` — a folder built under a temporary name, then swapped in;
- :func:`write_file_synced` — a file inside such a temporary folder (no rename of its own).

Imports nothing heavy (no torch, no numpy): any module may use it.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (the renames into it); POSIX only, a no-op elsewhere."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: str | Path) -> Path:
    """A hidden name beside ``path``, unique per process and call (two writers never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def replacing(path: str | Path, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """``with replacing(path, "w", encoding="utf-8") as handle:`` — what is written to ``handle``
    replaces ``path`` when the block ends without an error, and never otherwise."""
    if not any(m in mode for m in "wx"):
        raise ValueError(f"replacing() writes a new file; mode {mode!r} would not")
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_with(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(temporary_path)`` writes the file (a library that only takes a path); it is then
    flushed and renamed over ``path``."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    with replacing(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    # Path.write_text on the temporary file: one call that fails as a whole on a full disk
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented UTF-8 JSON; a value JSON cannot hold fails before anything is written."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_file_synced(path: str | Path, data: bytes) -> None:
    """A file inside a folder that :func:`swap_dir` will swap in: flushed, not renamed."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def new_dir(final: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``final`` to build the new content in; removed if the block
    fails, flushed when it ends. Swap it in with :func:`swap_dir`."""
    tmp = temporary_name(final)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_dir(built: str | Path, final: str | Path, previous: str | Path) -> Path:
    """Replace folder ``final`` by the complete folder ``built`` with two renames.

    The old ``final`` is moved to ``previous`` first and removed only after the swap, so a crash
    between the renames leaves ``previous`` complete (readers fall back to it). Callers check
    that all three paths are theirs (:func:`fashion_retrieval.files.ensure_inside`) before.
    """
    built, final, previous = Path(built), Path(final), Path(previous)
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(built, final)
    fsync_dir(final.parent)
    shutil.rmtree(previous, ignore_errors=True)
    return final
