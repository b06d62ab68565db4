"""A decoded-image cache: every image is decoded and resized once per (file content, size).

On a few-core machine JPEG decoding and resizing cost as much as the model's step; training
revisits every image once per epoch. The cache keeps the output of the deterministic part of
the transform (decode → optional box crop → resize to the training size, as uint8 [3, H, W])
and the random part (crop, flip, jitter) runs on the cached tensor, so a cached epoch gives
the same batches as decoding on the fly (bit-identical with augmentation off, and with it on
under the same seeds).

Layout of ``FOLDER/v1-<H>x<W>/``::

    pixels.bin     fixed-size slots of H·W·3 bytes, written with pwrite, read with pread
    index.sqlite   entries (content key → slot, CRC-32 of its bytes, or the decode error) and
                   file fingerprints (path → size, mtime, inode, sha256), in WAL mode

An entry is keyed by the sha256 of the file's bytes and the crop box, so a changed file (or a
changed size, which is another folder) is never served stale; a path whose size, mtime and
inode are unchanged is not re-hashed. An entry row is committed only after its pixels are
written, so a process killed mid-build leaves at most an unused slot, never a half-written
entry that is read; every read is checked against its CRC and a mismatch (a torn write after
a power loss, a damaged disk) is decoded again. Images that fail to decode are recorded with
their reason and keep being skipped, and counted, as without the cache. Several DataLoader
worker processes share one cache (each opens its own connection).

A cache only saves time, so it never stops a run: when its folder cannot be written (a full
disk, a file-size limit, a read-only mount) or its index cannot be opened, that process stops
using it, says so once in :meth:`CacheStats.summary`, and decodes on the fly. The run then
fails, if at all, where its own files cannot be written, with the error that names them.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .images import DEFAULT_MAX_PIXELS, ImageLoadError, crop_to_box, load_rgb, resize_stage

CACHE_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS slots (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, slot INTEGER, crc INTEGER, error TEXT);
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER,
                                  sha256 TEXT NOT NULL);
"""


class _UnreadableImage(Exception):
    """The image file itself cannot be read (an OSError of the cache's own files is another matter)."""


@dataclass
class CacheStats:
    entries: int
    failures: int
    bytes_on_disk: int
    hits: int
    misses: int
    disabled: str | None = None

    def summary(self) -> str:
        # hits and misses of DataLoader workers stay in their processes: the totals are what count
        text = (f"decoded-image cache: {self.entries} images ({self.bytes_on_disk / 2**20:.1f} MiB on disk), "
                f"{self.failures} unreadable recorded")
        if self.disabled:
            text += f"; turned off in this process, images decoded on the fly ({self.disabled})"
        return text


class DecodedImageCache:
    def __init__(self, folder: str | Path, image_size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS):
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.folder = Path(folder) / f"v{CACHE_VERSION}-{self.image_size[0]}x{self.image_size[1]}"
        self.slot_bytes = 3 * self.image_size[0] * self.image_size[1]
        self.max_pixels = max_pixels
        self._resize = resize_stage(self.image_size)
        self._pid: int | None = None
        self._db: sqlite3.Connection | None = None
        self._fd: int | None = None
        self.hits = 0
        self.misses = 0
        self.disabled: str | None = None  # why this process stopped using the cache

    # ---- per-process handles (DataLoader workers fork after the cache is made) ---------------
    def _open(self) -> tuple[sqlite3.Connection, int]:
        if self._pid != os.getpid():
            self.folder.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.folder / "index.sqlite", timeout=60, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(SCHEMA)
            except sqlite3.DatabaseError:
                # a cache is disposable: a damaged index is started afresh, never trusted
                db.close()
                self._discard_index()
                db = sqlite3.connect(self.folder / "index.sqlite", timeout=60, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(SCHEMA)
            self._db = db
            self._fd = os.open(self.folder / "pixels.bin", os.O_RDWR | os.O_CREAT, 0o644)
            self._pid = os.getpid()
        return self._db, self._fd  # type: ignore[return-value]

    def _discard_index(self) -> None:
        for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "pixels.bin"):
            (self.folder / name).unlink(missing_ok=True)

    def close(self) -> None:
        if self._pid == os.getpid():
            self._db.close()
            os.close(self._fd)
        self._pid = self._db = self._fd = None

    def __getstate__(self) -> dict:  # connections do not cross process boundaries
        state = dict(self.__dict__)
        state.update(_pid=None, _db=None, _fd=None)
        return state

    # ---- lookups ------------------------------------------------------------------------------
    def _content_hash(self, db: sqlite3.Connection, path: Path) -> str:
        try:
            stat = path.stat()
        except OSError as exc:
            raise _UnreadableImage from exc
        row = db.execute("SELECT size, mtime_ns, inode, sha256 FROM files WHERE path = ?", (str(path),)).fetchone()
        if row is not None and tuple(row[:3]) == (stat.st_size, stat.st_mtime_ns, stat.st_ino):
            return row[3]
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise _UnreadableImage from exc
        db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                   (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, digest))
        return digest

    def get(self, path: str | Path, bbox: Sequence[float] | None = None) -> torch.Tensor:
        """uint8 [3, H, W] of ``path`` (cropped to ``bbox`` first), or :class:`ImageLoadError`."""
        path = Path(path)
        if self.disabled is None:
            try:
                return self._cached(path, bbox)
            except (OSError, sqlite3.Error) as exc:  # cannot write or read the cache: not the image
                self.disabled = f"{self.folder}: {exc}"
                self._drop_handles()
        return self._decode(path, bbox)

    def _drop_handles(self) -> None:
        try:
            if self._db is not None:
                self._db.close()
            if self._fd is not None:
                os.close(self._fd)
        except (OSError, sqlite3.Error):
            pass
        self._pid = self._db = self._fd = None

    def _cached(self, path: Path, bbox: Sequence[float] | None) -> torch.Tensor:
        db, fd = self._open()
        try:
            key = self._content_hash(db, path)
        except _UnreadableImage:
            return self._decode(path, bbox)  # missing / unreadable: load_rgb names the reason
        if bbox is not None:
            key += ":" + ",".join(f"{float(v):.6g}" for v in bbox)
        row = db.execute("SELECT slot, crc, error FROM entries WHERE key = ?", (key,)).fetchone()
        if row is not None:
            slot, crc, error = row
            if error is not None:
                self.hits += 1
                raise ImageLoadError(path, error)
            data = os.pread(fd, self.slot_bytes, slot * self.slot_bytes)
            if len(data) == self.slot_bytes and zlib.crc32(data) == crc:
                self.hits += 1
                return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(3, *self.image_size)
        self.misses += 1
        try:
            pixels = self._decode(path, bbox)
        except ImageLoadError as exc:
            db.execute("INSERT OR REPLACE INTO entries VALUES (?, NULL, NULL, ?)", (key, exc.reason))
            raise
        data = pixels.numpy().tobytes()
        slot = row[0] if row is not None and row[0] is not None else \
            db.execute("INSERT INTO slots (key) VALUES (?)", (key,)).lastrowid - 1
        os.pwrite(fd, data, slot * self.slot_bytes)
        # the row comes after the bytes: a kill in between leaves an unused slot, not a bad entry
        db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, NULL)", (key, slot, zlib.crc32(data)))
        return pixels

    def _decode(self, path: Path, bbox: Sequence[float] | None) -> torch.Tensor:
        image = load_rgb(path, self.max_pixels)
        if bbox is not None:
            image = crop_to_box(image, bbox)
        pixels = self._resize(image)
        return torch.as_tensor(np.ascontiguousarray(pixels.numpy()), dtype=torch.uint8)

    def stats(self) -> CacheStats:
        try:
            db, _ = self._open()
            entries = db.execute("SELECT COUNT(*) FROM entries WHERE error IS NULL").fetchone()[0]
            failures = db.execute("SELECT COUNT(*) FROM entries WHERE error IS NOT NULL").fetchone()[0]
            size = sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())
        except (OSError, sqlite3.Error) as exc:
            return CacheStats(0, 0, 0, self.hits, self.misses, self.disabled or f"{self.folder}: {exc}")
        return CacheStats(entries, failures, size, self.hits, self.misses, self.disabled)
