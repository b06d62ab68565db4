"""The decoded-image cache: same tensors as decoding on the fly, invalidated by a changed file
or size, safe against a kill mid-build and a corrupt entry, failures still skipped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from fashion_retrieval.data.image_cache import DecodedImageCache
from fashion_retrieval.data.images import ImageDataset, default_transform, tensor_stage
from fashion_retrieval.data.table import Sample, SampleTable

SIZE = (40, 30)


def _photos(folder, count=6, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"p{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (60 + i, 45, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _table(folder, paths, bbox=None):
    return SampleTable([Sample(path=p.name, item_id=p.stem, bbox=bbox) for p in paths], folder)


@pytest.mark.parametrize("train", [False, True])
def test_cached_batches_equal_decoding_on_the_fly(tmp_path, train):
    paths = _photos(tmp_path / "img")
    (tmp_path / "img" / "broken.jpg").write_bytes(b"not a jpeg")
    table = _table(tmp_path / "img", paths + [tmp_path / "img" / "broken.jpg"], bbox=(2, 3, 40, 50))
    plain = ImageDataset(table, default_transform(SIZE, train=train), crop_bbox=True)
    cache = DecodedImageCache(tmp_path / "cache", SIZE)
    cached = ImageDataset(table, tensor_stage(SIZE, train=train), crop_bbox=True, cache=cache)
    for epoch in range(2):  # the first epoch fills the cache, the second reads it
        for i in range(len(table)):
            torch.manual_seed(100 * epoch + i)
            expected = plain[i]
            torch.manual_seed(100 * epoch + i)
            got = cached[i]
            if "error" in expected:
                assert got == expected  # skipped with the same message, cached or not
            else:
                assert torch.equal(got["image"], expected["image"])
    stats = cache.stats()
    assert (stats.entries, stats.failures) == (len(paths), 1)
    assert stats.misses == len(table) and stats.hits == len(table)
    assert stats.bytes_on_disk >= len(paths) * 3 * SIZE[0] * SIZE[1]


def test_changed_file_and_changed_size_are_never_served_stale(tmp_path):
    [path] = _photos(tmp_path / "img", count=1)
    cache = DecodedImageCache(tmp_path / "cache", SIZE)
    before = cache.get(path)
    Image.new("RGB", (45, 60), (255, 0, 0)).save(path)
    os.utime(path, ns=(1, 1))  # even with an old mtime the content key changes
    after = cache.get(path)
    assert not torch.equal(before, after) and int(after[0].float().mean()) > 240
    assert cache.misses == 2
    other = DecodedImageCache(tmp_path / "cache", (20, 15))
    assert other.get(path).shape == (3, 20, 15) and other.misses == 1


def test_corrupt_entry_is_decoded_again(tmp_path):
    [path] = _photos(tmp_path / "img", count=1)
    cache = DecodedImageCache(tmp_path / "cache", SIZE)
    good = cache.get(path)
    pixels = cache.folder / "pixels.bin"
    data = bytearray(pixels.read_bytes())
    data[10] ^= 0xFF
    pixels.write_bytes(bytes(data))
    again = DecodedImageCache(tmp_path / "cache", SIZE)
    assert torch.equal(again.get(path), good) and again.misses == 1
    assert torch.equal(DecodedImageCache(tmp_path / "cache", SIZE).get(path), good)


def test_damaged_index_starts_afresh(tmp_path):
    [path] = _photos(tmp_path / "img", count=1)
    cache = DecodedImageCache(tmp_path / "cache", SIZE)
    good = cache.get(path)
    cache.close()
    for name in ("index.sqlite-wal", "index.sqlite-shm"):
        (cache.folder / name).unlink(missing_ok=True)
    (cache.folder / "index.sqlite").write_bytes(b"garbage" * 1000)
    fresh = DecodedImageCache(tmp_path / "cache", SIZE)
    assert torch.equal(fresh.get(path), good) and fresh.misses == 1


def test_kill_mid_build_leaves_no_entry_that_is_read(tmp_path):
    """SIGKILL a process between writing an entry's pixels and committing its row, and one
    between filling entries: the next process reads every image correctly."""
    paths = _photos(tmp_path / "img", count=4)
    script = textwrap.dedent(f"""
        import os, signal, sys
        from fashion_retrieval.data import image_cache
        cache = image_cache.DecodedImageCache({str(tmp_path / 'cache')!r}, {SIZE!r})
        paths = {[str(p) for p in paths]!r}
        cache.get(paths[0])
        real_pwrite = os.pwrite
        def pwrite_then_die(fd, data, offset):
            real_pwrite(fd, data[: len(data) // 2], offset)  # a torn write, then the kill
            os.kill(os.getpid(), signal.SIGKILL)
        image_cache.os.pwrite = pwrite_then_die
        cache.get(paths[1])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    cache = DecodedImageCache(tmp_path / "cache", SIZE)
    reference = DecodedImageCache(tmp_path / "fresh", SIZE)
    for path in paths:
        assert torch.equal(cache.get(path), reference.get(path))
    assert cache.hits == 1 and cache.misses == 3  # only the committed entry was trusted


def test_cache_is_shared_by_dataloader_workers(tmp_path):
    paths = _photos(tmp_path / "img", count=8)
    cache = DecodedImageCache(tmp_path / "cache", SIZE)
    dataset = ImageDataset(_table(tmp_path / "img", paths), tensor_stage(SIZE), cache=cache)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    first = torch.cat([b["image"] for b in loader])
    second = torch.cat([b["image"] for b in loader])
    assert torch.equal(first, second)
    assert cache.stats().entries == len(paths)


def test_a_cache_that_cannot_be_written_decodes_on_the_fly_and_says_so(tmp_path):
    """A full disk (here: a file-size limit in a child process) under the cache must not stop
    training: the images come out as without the cache and the summary says it was turned off."""
    paths = _photos(tmp_path / "img", count=3)
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from pathlib import Path
        from fashion_retrieval.data.image_cache import DecodedImageCache
        from fashion_retrieval.data.images import load_rgb, resize_stage
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        cache = DecodedImageCache({str(tmp_path / 'cache')!r}, {SIZE!r})
        resize = resize_stage({SIZE!r})
        for path in {[str(p) for p in paths]!r}:
            expected = torch.as_tensor(resize(load_rgb(Path(path))).numpy())
            assert torch.equal(cache.get(path), expected), path
        summary = cache.stats().summary()
        assert "turned off" in summary and "decoded on the fly" in summary, summary
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
