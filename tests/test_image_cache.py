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


# ---- whole training batches, through the loader the engine trains on ---------------------------
BATCH_SIZE = (40, 30)


def _photo_catalog(root, count=30):
    """fashion_product layout whose photos are noise of different sizes and aspect ratios, so
    any change to how the cache decodes or resizes (interpolation, antialiasing, rounding of
    the size, channel order) changes pixels; one unreadable photo must be skipped alike."""
    import csv as csv_module

    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    colours, genders, seasons = ["Blue", "Red", "Black"], ["Men", "Women"], ["Summer", "Fall", "Winter"]
    with open(root / "styles.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv_module.writer(handle)
        writer.writerow(["id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season",
                         "year", "usage"])
        for number in range(count):
            writer.writerow([number, genders[number % 2], "Apparel", "Topwear", ["Tshirts", "Shirts"][number % 3 == 0],
                             colours[number % 3], seasons[(number // 2) % 3], "2012", "Casual"])
            height, width = 50 + 7 * (number % 5), 37 + 5 * (number % 4)
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
                root / "images" / f"{number}.jpg", quality=85)
    (root / "images" / "7.jpg").write_bytes(b"\xff\xd8 not a whole jpeg")  # a train id (7 % 10 = 7)


def _training_recipe(augment: bool, decoded_cache: str, num_workers: int):
    from fashion_retrieval.config import config_from_dict

    return config_from_dict({
        "name": "cache-batches", "seed": 11,
        "data": {"format": "fashion_product", "root": "fashion-product", "image_size": list(BATCH_SIZE),
                 "attributes": ["gender", "articleType", "baseColour", "season"], "augment": augment,
                 "num_workers": num_workers, "decoded_cache": decoded_cache,
                 "sampler": {"kind": "attribute", "p": 2, "k": 3}},
        "model": {"name": "attribute_classifier", "backbone": {"name": "resnet18", "pretrained": False}},
        "loss": {"terms": [{"name": "multihead_ce"}]},
        "train": {"epochs": 2, "progress": False},
        "eval": {"benchmark": None},
    })


def _epochs_of_batches(data_root, run_dir, augment, decoded_cache, num_workers=0, epochs=2):
    from fashion_retrieval.data.training import build_training_data

    data = build_training_data(_training_recipe(augment, decoded_cache, num_workers), data_root, run_dir)
    loader = data.loader(num_workers=num_workers, pin_memory=False)  # what engine/train.py iterates
    per_epoch = []
    for epoch in range(epochs):
        data.batches.set_epoch(epoch)
        per_epoch.append(list(loader))
    return data, per_epoch


def _assert_same_batches(expected_epochs, got_epochs):
    assert len(got_epochs) == len(expected_epochs)
    for epoch, (expected, got) in enumerate(zip(expected_epochs, got_epochs)):
        assert len(got) == len(expected) > 0
        for step, (want, have) in enumerate(zip(expected, got)):
            where = f"epoch {epoch}, step {step}"
            assert want.keys() == have.keys(), where
            for key in want:
                if torch.is_tensor(want[key]):
                    assert want[key].dtype == have[key].dtype, f"{where}: {key}"
                    assert torch.equal(want[key], have[key]), f"{where}: {key} differs"
                else:
                    assert want[key] == have[key], f"{where}: {key}"


@pytest.mark.parametrize("augment", [False, True])
def test_training_batches_with_the_cache_equal_those_decoded_on_the_fly(tmp_path, augment):
    """The engine's DataLoader over two epochs, with and without the decoded-image cache: every
    batch's images bit-identical, labels, indices and skipped files the same. The design keeps
    the random part of the transform after the cache (image_cache.py), so with augmentation on
    under the recipe's seed the batches are identical too. The first epoch fills the cache, the
    second reads it: each image is decoded exactly once."""
    _photo_catalog(tmp_path / "data" / "fashion-product")
    _, plain = _epochs_of_batches(tmp_path / "data", tmp_path / "plain", augment, "off")
    data, cached = _epochs_of_batches(tmp_path / "data", tmp_path / "cached", augment, "run")
    assert data.cache is not None and not (tmp_path / "plain" / "decoded-images").exists()
    _assert_same_batches(plain, cached)
    assert any(batch["skipped"] for epoch in plain for batch in epoch), "the unreadable photo was never drawn"

    planned = []
    for epoch in range(2):
        data.batches.set_epoch(epoch)
        planned.append([key for batch in data.batches for (key, _seed) in batch])
    distinct = {index for index, _attribute in planned[0] + planned[1]}
    assert data.cache.misses == len(distinct)
    assert data.cache.hits == len(planned[0]) + len(planned[1]) - len(distinct) > 0


def test_cached_training_batches_do_not_depend_on_loader_workers(tmp_path):
    """Two loader worker processes sharing the cache give the batches one process decoding on the fly gives."""
    _photo_catalog(tmp_path / "data" / "fashion-product")
    _, plain = _epochs_of_batches(tmp_path / "data", tmp_path / "plain", True, "off", num_workers=0)
    _, cached = _epochs_of_batches(tmp_path / "data", tmp_path / "cached", True, "run", num_workers=2)
    _assert_same_batches(plain, cached)


def test_the_batch_comparison_catches_a_cache_that_resizes_differently(tmp_path, monkeypatch):
    """The comparison above must be able to fail: a cache whose resize skips antialiasing (the
    kind of change a faster resize would make) gives other pixels, and the comparison says so."""
    from torchvision.transforms import v2

    from fashion_retrieval.data import image_cache

    _photo_catalog(tmp_path / "data" / "fashion-product")
    _, plain = _epochs_of_batches(tmp_path / "data", tmp_path / "plain", False, "off", epochs=1)
    monkeypatch.setattr(image_cache, "resize_stage",
                        lambda size: v2.Compose([v2.ToImage(), v2.Resize(tuple(size), antialias=False)]))
    _, cached = _epochs_of_batches(tmp_path / "data", tmp_path / "cached", False, "run", epochs=1)
    with pytest.raises(AssertionError, match="image differs"):
        _assert_same_batches(plain, cached)
