"""atomic.py: a failed write leaves the previous file and no temporary one; a folder swap keeps
the previous folder until the new one is in place."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fashion_retrieval import atomic


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("write", [
    lambda path: atomic.write_text(path, "new"),
    lambda path: atomic.write_bytes(path, b"new"),
    lambda path: atomic.write_json(path, {"new": 1}),
    lambda path: atomic.write_with(path, lambda tmp: tmp.write_text("new")),
])
def test_a_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write) -> None:
    target = tmp_path / "file.json"
    target.write_text("old")
    monkeypatch.setattr(atomic, "fsync_file", _disk_full)  # the data is written, flushing it fails
    monkeypatch.setattr(atomic.os, "fsync", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        write(target)
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.json"]
    write(target)
    assert "new" in target.read_text() and [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_replacing_writes_only_when_the_block_succeeds(tmp_path: Path) -> None:
    target = tmp_path / "rows.csv"
    with atomic.replacing(target, "w", encoding="utf-8") as handle:
        handle.write("a\n")
    with pytest.raises(RuntimeError):
        with atomic.replacing(target, "w", encoding="utf-8") as handle:
            handle.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "a\n" and [p.name for p in tmp_path.iterdir()] == ["rows.csv"]
    with pytest.raises(ValueError, match="writes a new file"):
        with atomic.replacing(target, "a"):
            pass


def test_a_folder_is_swapped_in_whole(tmp_path: Path) -> None:
    final, previous = tmp_path / "checkpoint", tmp_path / "checkpoint-previous"
    for content in ("one", "two"):
        with atomic.new_dir(final) as building:
            (building / "state").write_text(content)
        atomic.swap_dir(building, final, previous)
        assert (final / "state").read_text() == content and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    with pytest.raises(OSError):
        with atomic.new_dir(final) as building:
            (building / "state").write_text("three")
            _disk_full()
    assert (final / "state").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
