from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from conftest import write_jpeg, write_truncated_jpeg
from fashion_retrieval.data.images import (ImageDataset, ImageLoadError, SkipCounter, collate_skipping,
                                           default_transform, load_rgb)
from fashion_retrieval.data.labels import LabelSpace
from fashion_retrieval.data.table import Sample, SampleTable

AS_TENSOR = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def reason_for(path: Path, **kwargs) -> str:
    with pytest.raises(ImageLoadError) as caught:
        load_rgb(path, **kwargs)
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)
    return caught.value.reason


# ---- load_rgb: failures --------------------------------------------------------------

def test_missing_file(tmp_path):
    assert reason_for(tmp_path / "nope.jpg") == "file not found"


def test_folder_is_not_an_image(tmp_path):
    (tmp_path / "d.jpg").mkdir()
    assert reason_for(tmp_path / "d.jpg") == "not a file"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    assert reason_for(path) == "empty file"


def test_truncated_jpeg(tmp_path):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    assert reason_for(write_truncated_jpeg(tmp_path / "cut.jpg")).startswith("truncated or corrupt")


def test_text_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    assert reason_for(path) == "not an image (unrecognised format)"


def test_too_many_pixels_is_refused_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(path)

    def decode(self):
        raise AssertionError("the pixels must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    assert reason_for(path, max_pixels=300 * 200 - 1) == "too large: 300x200 pixels exceeds the limit of 59999"


def test_pil_decompression_bomb_becomes_load_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (300, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises above twice this
    assert "decompression bomb" in reason_for(path, max_pixels=10**9)


# ---- load_rgb: modes and orientation -------------------------------------------------

def test_jpeg_is_rgb_with_its_size(tmp_path):
    image = load_rgb(write_jpeg(tmp_path / "a.jpg", size=(12, 16)))
    assert image.mode == "RGB" and image.size == (12, 16)


def test_transparent_png_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "alpha.png")
    image = load_rgb(tmp_path / "alpha.png")
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (255, 0, 0)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    image = load_rgb(tmp_path / "p.png")
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (0, 255, 0)


@pytest.mark.parametrize("mode, color, suffix", [("L", 77, "png"), ("CMYK", (0, 0, 0, 0), "jpg"),
                                                 ("1", 1, "png"), ("P", 3, "png")])
def test_other_modes_become_rgb(tmp_path, mode, color, suffix):
    Image.new(mode, (5, 7), color).save(tmp_path / f"x.{suffix}")
    image = load_rgb(tmp_path / f"x.{suffix}")
    assert image.mode == "RGB" and image.size == (5, 7)


def test_cmyk_white_stays_white(tmp_path):
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "c.jpg", quality=100)
    assert all(v > 245 for v in load_rgb(tmp_path / "c.jpg").getpixel((1, 1)))


def test_16_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 0x8000, 0xFFFF]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = load_rgb(tmp_path / "deep.png")
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_every_16_bit_value_becomes_its_nearest_8_bit_value(tmp_path):
    """The block-wise integer conversion equals round(v / 257) for all 65,536 values."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(values).save(tmp_path / "all.png")
    image = load_rgb(tmp_path / "all.png")
    expected = np.rint(values.astype(np.float64) / 257).astype(np.uint8)
    assert np.array_equal(np.asarray(image)[..., 0], expected)
    assert np.array_equal(np.asarray(image)[..., 2], expected)


@pytest.mark.parametrize("mode, per_pixel", [("RGB", 4), ("I;16", 5), ("RGBA", 8), ("L", 5)])
def test_decode_memory_is_bounded_by_bytes_not_only_pixels(tmp_path, monkeypatch, mode, per_pixel):
    from fashion_retrieval.data.images import decode_bytes

    path = tmp_path / f"x.{'jpg' if mode == 'RGB' else 'png'}"
    (Image.fromarray(np.zeros((200, 300), np.uint16)) if mode == "I;16" else Image.new(mode, (300, 200))).save(path)
    with Image.open(path) as image:
        assert image.mode == mode
        needed = decode_bytes(image)
    assert needed >= 300 * 200 * per_pixel

    def decode(self):
        raise AssertionError("the pixels must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    assert reason_for(path, max_bytes=needed - 1).startswith(f"too large: decoding 300x200 {mode} pixels needs")


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90° clockwise when shown
    write_jpeg(tmp_path / "rotated.jpg", size=(20, 10), exif=exif.tobytes())
    assert load_rgb(tmp_path / "rotated.jpg").size == (10, 20)


# ---- transforms ----------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("size", [(60, 80), (533, 400), (10, 300)])
def test_default_transform_gives_exact_size_in_unit_range(size, train):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8))
    out = default_transform((32, 24), train=train)(image)
    assert out.shape == (3, 32, 24) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_default_size_is_tall():
    out = default_transform()(Image.new("RGB", (60, 80)))
    assert out.shape == (3, 256, 192)


def test_train_transform_is_random_and_eval_is_not():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    train, evaluate = default_transform((16, 12), train=True), default_transform((16, 12), train=False)
    torch.manual_seed(0)
    assert not all(torch.equal(train(image), train(image)) for _ in range(3))
    assert torch.equal(evaluate(image), evaluate(image))


# ---- dataset and collate -------------------------------------------------------------

@pytest.fixture
def table(tmp_path) -> SampleTable:
    write_jpeg(tmp_path / "a.jpg", size=(20, 30), color=(255, 0, 0))
    write_jpeg(tmp_path / "b.jpg", size=(20, 30), color=(0, 0, 255))
    (tmp_path / "bad.jpg").write_text("oops")
    return SampleTable([
        Sample("a.jpg", "item-a", "shop", "train", "tee", {"colour": "red", "tags": ("cotton", "plain")},
               bbox=(5, 10, 15, 30)),
        Sample("b.jpg", "item-b", "consumer", "train", "dress", {"colour": "blue"}),
        Sample("bad.jpg", "item-b", "consumer", "train", "dress", {}),
    ], root=tmp_path, multi_label=["tags"])


def test_dataset_record_with_labels(table):
    labels = LabelSpace.from_table(table)
    record = ImageDataset(table, default_transform((8, 6)), labels)[0]
    assert record["image"].shape == (3, 8, 6) and record["index"] == 0
    assert record["item"] == 0 and record["category"] == labels.categories.index("tee")
    assert record["attrs"].tolist() == [labels.attributes["colour"].index("red"), 0]
    assert record["attr_multi_hot"].sum() == 3  # red + cotton + plain


def test_dataset_tuple_index_gives_attribute_value(table):
    labels = LabelSpace.from_table(table)
    record = ImageDataset(table, default_transform((8, 6)), labels)[(1, 0)]
    assert record["attribute"] == 0 and record["attr_value"] == labels.attributes["colour"].index("blue")


def test_dataset_without_labels_has_only_image_and_index(table):
    dataset = ImageDataset(table, default_transform((8, 6)))
    assert set(dataset[1]) == {"image", "index"}
    with pytest.raises(ValueError, match="needs a LabelSpace"):
        dataset[(1, 0)]


def test_dataset_crops_to_bbox(table):
    image = ImageDataset(table, AS_TENSOR, crop_bbox=True)[0]["image"]
    assert image.shape == (3, 20, 10)
    assert ImageDataset(table, AS_TENSOR)[0]["image"].shape == (3, 30, 20)


def test_unreadable_image_gives_error_record(table):
    record = ImageDataset(table, default_transform((8, 6)))[2]
    assert record == {"index": 2, "error": f"{table.root / 'bad.jpg'}: not an image (unrecognised format)"}


def test_loader_skips_bad_images_and_counts_them(table):
    dataset = ImageDataset(table, default_transform((8, 6)), LabelSpace.from_table(table))
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate_skipping)
    batch = next(iter(loader))
    assert batch["image"].shape == (3 - 1, 3, 8, 6)
    assert batch["index"].tolist() == [0, 1]
    assert batch["attrs"].shape == (2, 2)
    assert len(batch["skipped"]) == 1 and "bad.jpg" in batch["skipped"][0]
    counter = SkipCounter()
    assert counter.update(batch) == 1
    assert counter.count == 1 and "bad.jpg" in counter.summary()


def test_collate_all_failed_returns_only_skipped():
    batch = collate_skipping([{"index": 0, "error": "x: empty file"}, {"index": 1, "error": "y: empty file"}])
    assert batch == {"skipped": ["x: empty file", "y: empty file"]}


def test_skip_counter_keeps_a_bounded_list():
    counter = SkipCounter(keep=2)
    for n in range(5):
        counter.update({"skipped": [f"f{n}: empty file"]})
    assert counter.count == 5 and len(counter.messages) == 2
    assert counter.summary().startswith("skipped 5 unreadable image(s) (first 2 distinct shown)")
    assert SkipCounter().summary() == "no unreadable images"
