"""Safe image decoding, the image dataset and a collate function that drops bad images.

Real catalogs contain empty, truncated and mislabelled files. Every failure to read one
becomes an :class:`ImageLoadError` with a short reason; the dataset turns it into an
``{"index", "error"}`` record so one bad file costs one sample, never a training run.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate
from torchvision.transforms import v2

from .labels import LabelSpace
from .table import SampleTable, printable_path

DEFAULT_IMAGE_SIZE = (256, 192)  # (H, W): garments and people are taller than wide
DEFAULT_MAX_PIXELS = 40_000_000

Transform = Callable[[Image.Image], torch.Tensor]

# load_rgb refuses images over max_pixels from their header, before decoding, and reports them
# as skipped; PIL's own warning for sizes between its thresholds would only add a stderr line per
# file (a filter, not catch_warnings: that one is not thread-safe and decoding runs in threads).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageLoadError(Exception):
    """An image file that cannot be decoded; ``reason`` is short enough for a report line."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{printable_path(path)}: {reason}")
        self.path = str(path)
        self.reason = reason


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB image, or raise :class:`ImageLoadError`."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ImageLoadError(path, "not a file" if path.exists() else "file not found")
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "empty file")
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read ({exc.strerror or exc})") from None
    try:
        with Image.open(path) as image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise ImageLoadError(
                    path, f"too large: {width}x{height} pixels exceeds the limit of {max_pixels}")
            image.load()
            return _to_rgb(_upright(image), path)
    except ImageLoadError:
        raise
    except PermissionError as exc:
        raise ImageLoadError(path, f"cannot read ({exc.strerror or exc})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError:
        raise ImageLoadError(path, "too large: PIL refuses it as a decompression bomb") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ImageLoadError(path, f"truncated or corrupt ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost a readable image
        return image


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        # Transparent pixels would turn black under a plain convert; shops show them on white.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_rgb(image)
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageLoadError(path, f"unsupported colour mode {image.mode}") from exc


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grayscale: rescale to 8 bits instead of clipping to white."""
    values = np.asarray(image, dtype=np.float64)
    peak = float(values.max()) if values.size else 0.0
    if image.mode == "F" and peak <= 1.0:
        values = values * 255.0
    elif peak > 255.0:
        values = values / 257.0  # 65535 -> 255
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def default_transform(image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, train: bool = False) -> Transform:
    """PIL image -> float tensor [3, H, W] in [0, 1]; models normalise inside themselves."""
    return v2.Compose([*resize_stage(image_size).transforms, *tensor_stage(image_size, train).transforms])


def resize_stage(image_size: tuple[int, int]) -> v2.Compose:
    """The deterministic head of :func:`default_transform`: PIL image -> uint8 [3, H, W]
    (what the decoded-image cache stores)."""
    height, width = image_size
    return v2.Compose([v2.ToImage(), v2.Resize((height, width), antialias=True)])


def tensor_stage(image_size: tuple[int, int], train: bool = False) -> v2.Compose:
    """The rest of :func:`default_transform`, on the resized uint8 tensor: augmentation, then floats."""
    height, width = image_size
    steps: list[Any] = []
    if train:
        aspect = width / height
        steps += [
            v2.RandomResizedCrop((height, width), scale=(0.8, 1.0), ratio=(0.9 * aspect, 1.1 * aspect),
                                 antialias=True),
            v2.RandomHorizontalFlip(),
            # No hue jitter: colour is itself a label (baseColour) that retrieval must keep.
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1),
        ]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


class ImageDataset(Dataset):
    """Rows of a :class:`SampleTable` as tensors plus their encoded labels.

    With a :class:`~fashion_retrieval.data.image_cache.DecodedImageCache`, images come from the
    cache as resized uint8 tensors and ``transform`` must be the matching :func:`tensor_stage`.

    ``dataset[i]`` gives one image; ``dataset[(i, attribute)]`` (what
    :class:`~fashion_retrieval.data.samplers.AttributeBatchSampler` yields) also gives the
    attribute index and the image's value id for it.
    """

    def __init__(self, table: SampleTable, transform: Transform | None = None,
                 labels: LabelSpace | None = None, crop_bbox: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, cache: Any = None):
        self.table = table
        self.cache = cache
        self.transform = transform if transform is not None else default_transform()
        self.labels = labels
        self.crop_bbox = crop_bbox
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, attribute = (key if isinstance(key, tuple) else (key, None))
        index = int(index)
        if attribute is not None and self.labels is None:
            raise ValueError("indexing with (index, attribute) needs a LabelSpace")
        sample = self.table[index]
        path = self.table.resolve(sample)
        box = sample.bbox if self.crop_bbox else None
        try:
            if self.cache is not None:
                image = self.cache.get(path, box)
            else:
                image = load_rgb(path, self.max_pixels)
                if box is not None:
                    image = crop_to_box(image, box)
        except ImageLoadError as exc:
            return {"index": index, "error": str(exc)}
        record: dict[str, Any] = {"image": self.transform(image), "index": index}
        if self.labels is not None:
            record.update(self.labels.encode(sample))
        if attribute is not None:
            attribute = int(attribute)
            record["attribute"] = attribute
            record["attr_value"] = int(record["attrs"][attribute])
        return record


def crop_to_box(image: Image.Image, bbox: Sequence[float]) -> Image.Image:
    x1, y1, x2, y2 = bbox
    left, top = max(0, int(x1)), max(0, int(y1))
    right, bottom = min(image.width, int(round(x2))), min(image.height, int(round(y2)))
    if right - left < 2 or bottom - top < 2:
        return image  # a box outside the picture says nothing useful; keep the whole image
    return image.crop((left, top, right, bottom))


def collate_skipping(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the readable samples; ``"skipped"`` lists the others' error messages.

    When every sample failed the result holds only ``"skipped"``: callers must check.
    """
    good = [record for record in batch if "error" not in record]
    skipped = [record["error"] for record in batch if "error" in record]
    if not good:
        return {"skipped": skipped}
    collated = default_collate(good)
    collated["skipped"] = skipped
    return collated


class SkipCounter:
    """Accumulates the files a run had to skip, for one summary line instead of a log flood."""

    def __init__(self, keep: int = 20):
        self.keep = keep
        self.count = 0
        self.messages: list[str] = []
        self._seen: set[str] = set()

    def update(self, batch: dict[str, Any]) -> int:
        """Record a collated batch's skipped files; returns how many this batch skipped."""
        skipped = batch.get("skipped", [])
        for message in skipped:
            self.count += 1
            if message not in self._seen and len(self.messages) < self.keep:
                self._seen.add(message)
                self.messages.append(message)
        return len(skipped)

    def summary(self) -> str:
        if not self.count:
            return "no unreadable images"
        shown = "; ".join(self.messages)
        more = f" (first {len(self.messages)} distinct shown)" if self.count > len(self.messages) else ""
        return f"skipped {self.count} unreadable image(s){more}: {shown}"
