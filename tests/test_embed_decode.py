"""``decode="device"``: JPEG bytes decoded by torchvision on the embedding device give the same
embeddings, rows and skipped files as the default PIL path (run on CPU here; on CUDA the same
code decodes with nvJPEG)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_jpeg, write_truncated_jpeg
from test_checkpoint import TinyNet

from fashion_retrieval.data.table import Sample, SampleTable
from fashion_retrieval.engine.embed import _EncodedJpegDataset, embed_table
from fashion_retrieval.data.images import ImageDataset


def _photo(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB", **save) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize(size, Image.BILINEAR)  # smooth: JPEG keeps it close
    image.convert(mode).save(path, **save)
    return path


def _mixed_table(root: Path) -> SampleTable:
    """Plain JPEGs of two sizes (one resize call per size), and every kind the device path hands
    back to PIL or must skip: grey, CMYK, EXIF-rotated, PNG, two truncated, empty, missing."""
    names = []
    for i in range(5):
        names.append(_photo(root / f"rgb{i}.jpg", (80, 60) if i % 2 else (60, 80), i, quality=95).name)
    names.append(_photo(root / "grey.jpg", (60, 80), 10, mode="L", quality=95).name)
    names.append(_photo(root / "cmyk.jpg", (60, 80), 11, mode="CMYK", quality=95).name)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: PIL turns it upright, torchvision would not
    names.append(_photo(root / "rotated.jpg", (80, 60), 12, quality=95, exif=exif).name)
    names.append(_photo(root / "photo.png", (60, 80), 13).name)
    names.append(write_truncated_jpeg(root / "truncated.jpg").name)  # its header is cut too: PIL path
    cut = _photo(root / "cut.jpg", (200, 240), 14, quality=95)
    cut.write_bytes(cut.read_bytes()[:3000])  # header intact, scan cut: decode_jpeg fails, PIL names it
    names.append(cut.name)
    (root / "empty.jpg").write_bytes(b"")
    names += ["empty.jpg", "missing.jpg"]
    return SampleTable([Sample(path=name, item_id=name) for name in names], root=root)


@pytest.mark.parametrize("batch_size", [4, 64])
def test_device_decode_matches_pil(tmp_path: Path, batch_size: int) -> None:
    torch.manual_seed(0)
    model = TinyNet(num_items=3)
    table = _mixed_table(tmp_path)
    pil = embed_table(model, table, (64, 48), batch_size=batch_size, progress=False)
    device = embed_table(model, table, (64, 48), batch_size=batch_size, progress=False, decode="device")
    assert device.indices.tolist() == pil.indices.tolist() == list(range(9))
    assert sorted(device.skipped) == sorted(pil.skipped) and len(pil.skipped) == 4
    # Two JPEG decoders may differ by a grey level here and there; the embeddings barely move.
    np.testing.assert_allclose(device.embeddings, pil.embeddings, atol=2e-3)


def test_device_decode_takes_only_plain_jpegs(tmp_path: Path) -> None:
    table = _mixed_table(tmp_path)
    encoded = _EncodedJpegDataset(ImageDataset(table))
    raw = [table[i].path for i in range(len(table)) if "jpeg" in encoded[i]]
    assert raw == ["rgb0.jpg", "rgb1.jpg", "rgb2.jpg", "rgb3.jpg", "rgb4.jpg", "grey.jpg", "cut.jpg"]


def test_unknown_decoder_is_refused(tmp_path: Path) -> None:
    table = SampleTable([Sample(path=write_jpeg(tmp_path / "a.jpg").name, item_id="a")], root=tmp_path)
    with pytest.raises(ValueError, match="decode must be one of"):
        embed_table(TinyNet(num_items=1), table, (32, 24), progress=False, decode="gpu")
