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
# the peak memory of one decode (see decode_bytes): any 8-bit image of DEFAULT_MAX_PIXELS fits
DEFAULT_MAX_DECODE_BYTES = 512 * 2**20
EXIF_ORIENTATION = 0x0112
# The formats photo catalogs come in, the only ones PIL may open for us. The others it knows cost
# what their header does not tell: ICO/CUR decode an embedded PNG while opening (a 580 KB icon
# held 550 MiB before any size check), JPEG 2000 and AVIF decoders hold several times the bytes a
# pixel of PIL's copy (a 1 KB 6000x6000 JPEG 2000: 663 MiB against 137 estimated), EPS runs
# Ghostscript. (PIL's JPEG opener also gives MPO, the multi-picture JPEGs of cameras.)
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
READ_FORMATS_TEXT = "JPEG, PNG, WebP, BMP, GIF or TIFF"

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


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
             max_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB image, or raise :class:`ImageLoadError`.

    Refused from the header, before any pixel is decoded: more than ``max_pixels`` pixels, or a
    decode that would hold more than ``max_bytes`` at its peak (:func:`decode_bytes`: a 16-bit or
    transparent image costs more per pixel than an 8-bit RGB one).
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise ImageLoadError(path, "not a file" if path.exists() else "file not found")
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "empty file")
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read ({exc.strerror or exc})") from None
    try:
        # our own file object: PIL then holds no reference to it, and each conversion step
        # below rebinds `image`, so the previous stage's pixels are freed as the next is made
        with open(path, "rb") as file:
            image = open_image(file)
            _check_size(image, path, max_pixels, max_bytes)
            image.load()
            _upright(image)
            if _is_transparent(image):
                if image.mode != "RGBA":
                    image = image.convert("RGBA")
                image = _on_white(image)
            elif image.mode.startswith("I") or image.mode == "F":
                image = _high_depth_to_gray(image)
            if image.mode != "RGB":
                try:
                    image = image.convert("RGB")
                except ValueError:
                    raise ImageLoadError(path, f"unsupported colour mode {image.mode}") from None
            return image
    except ImageLoadError:
        raise
    except PermissionError as exc:
        raise ImageLoadError(path, f"cannot read ({exc.strerror or exc})") from None
    except UnsupportedFormatError as exc:
        raise ImageLoadError(path, f"not an image this tool reads ({exc.format}; use {READ_FORMATS_TEXT})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError:
        raise ImageLoadError(path, "too large: PIL refuses it as a decompression bomb") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ImageLoadError(path, f"truncated or corrupt ({_first_line(exc)})") from None


class UnsupportedFormatError(UnidentifiedImageError):
    """A file PIL would recognise (``format``), in a format we do not open."""

    def __init__(self, kind: str):
        super().__init__(f"{kind} images are not read")
        self.format = kind


def open_image(file, formats: tuple[str, ...] = DECODED_FORMATS) -> Image.Image:
    """``Image.open`` limited to ``formats``: anything else is refused from its first bytes,
    unopened (:class:`UnsupportedFormatError` naming what it is, when PIL can tell)."""
    Image.init()
    try:
        return Image.open(file, formats=[kind for kind in formats if kind in Image.OPEN])
    except UnidentifiedImageError:
        file.seek(0)
        prefix = file.read(16)
        file.seek(0)
        for kind, (_, accept) in Image.OPEN.items():
            try:
                known = kind not in formats and accept is not None and accept(prefix)
            except Exception:  # noqa: BLE001 - a plugin's check on odd bytes: not this format
                known = False
            if known:
                raise UnsupportedFormatError(kind) from None
        raise


def _check_size(image: Image.Image, path: Path, max_pixels: int, max_bytes: int) -> None:
    width, height = image.size  # from the header: nothing decoded yet
    if width * height > max_pixels:
        raise ImageLoadError(path, f"too large: {width}x{height} pixels exceeds the limit of {max_pixels}")
    needed = decode_bytes(image)
    if needed > max_bytes:
        raise ImageLoadError(path, f"too large: decoding {width}x{height} {image.mode} pixels needs "
                                   f"{needed / 2**20:.0f} MiB, over the limit of {max_bytes / 2**20:.0f} MiB")


def decode_bytes(image: Image.Image) -> int:
    """Peak memory :func:`load_rgb` holds for an opened, not yet decoded image, from its header.

    Stage by stage (bytes per pixel): the decoded pixels in PIL's layout (1 for 1/L/P, 2 for
    16-bit grayscale, 4 for every multi-band or 32-bit mode, RGB included) plus the decoder's own
    whole-image buffers (progressive JPEG coefficients, WebP's frame); a second copy while an
    EXIF rotation is applied (assumed for PNG, whose EXIF may follow the pixels); then each
    conversion holds its input and its output (RGBA on white: 4 + 4; 16-bit to 8-bit: 2 + 1,
    then 1 + 4 for RGB). The largest stage, times the pixel count.
    """
    pixels = image.width * image.height
    mode = image.mode
    stored = _stored_bytes(mode)
    decoding = stored + _decoder_bytes(image)
    turning = 2 * stored if _may_rotate(image) else stored
    if _is_transparent(image):
        converting = max(stored + 4 if mode != "RGBA" else 0, 4 + 4)
    elif mode.startswith("I") or mode == "F":
        converting = max(stored + 1, 1 + 4)
        # plus the uint32 or float64 temporaries of one block (32 bytes a pixel at most)
        return pixels * max(decoding, turning, converting) + 32 * min(pixels, HIGH_DEPTH_BLOCK)
    elif mode != "RGB":
        converting = stored + 4
    else:
        converting = 0
    return pixels * max(decoding, turning, converting)


def _stored_bytes(mode: str) -> int:
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4  # PIL keeps RGB, RGBA, LA, CMYK, YCbCr, I and F as 32-bit pixels


def _decoder_bytes(image: Image.Image) -> int:
    if image.format == "JPEG" and image.info.get("progressive"):
        # libjpeg keeps every DCT coefficient (2 bytes per sample) of a multi-scan image
        layers = getattr(image, "layer", None) or []
        if layers:
            h_max = max(layer[1] for layer in layers) or 1
            v_max = max(layer[2] for layer in layers) or 1
            return -(-2 * sum(layer[1] * layer[2] for layer in layers) // (h_max * v_max))
        return 2 * len(image.getbands())
    if image.format == "WEBP":
        return 12  # libwebp's decoded frame and PIL's copies of it before the pixels land (measured)
    if image.format == "TIFF" and image.tile and image.tile[0][0] == "libtiff":
        return _tiff_block_bytes(image)
    return 0


def _tiff_block_bytes(image: Image.Image) -> int:
    """libtiff decodes a compressed TIFF one strip (or tile) at a time into a buffer of its own,
    in the file's sample size; one strip for the whole picture is common, and then a 16-bit RGBA
    file costs 8 bytes a pixel on top of PIL's 4 (a 460 KB 6300x6300 one held 457 MiB). Bytes
    a pixel of the image, rounded up."""
    tags = image.tag_v2
    width, height = image.size
    if 322 in tags and 323 in tags:  # TileWidth, TileLength
        block = int(tags[322]) * int(tags[323])
    else:
        block = width * min(height, int(tags.get(278, height) or height))  # RowsPerStrip
    bits = tags.get(258, (8,))
    sample_bits = sum(bits) if isinstance(bits, tuple) else int(bits) * int(tags.get(277, 1))
    return -(-block * sample_bits // (8 * max(1, width * height)))


def _may_rotate(image: Image.Image) -> bool:
    exif = image.info.get("exif")
    if exif is None:
        if image.format == "PNG":
            return True  # an eXIf chunk after the pixels is only seen once they are decoded
        if image.format in ("TIFF", "MPO"):
            return image.getexif().get(EXIF_ORIENTATION, 1) != 1  # TIFF tags are read with the header
        return False
    try:
        data = Image.Exif()
        data.load(exif)
        return data.get(EXIF_ORIENTATION, 1) != 1
    except Exception:  # noqa: BLE001 - a broken EXIF block: assume the worst
        return True


def _is_transparent(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _upright(image: Image.Image) -> None:
    """Apply the EXIF orientation in place (no copy when there is none)."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost a readable image
        pass


def _on_white(rgba: Image.Image) -> Image.Image:
    """Transparent pixels would turn black under a plain convert; shops show them on white.
    (A masked paste gives exactly alpha_composite onto opaque white, without two more copies.)"""
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, (0, 0), rgba)
    return white


HIGH_DEPTH_BLOCK = 1 << 20  # pixels converted at a time: a few MB of temporaries whatever the image


def _high_depth_to_gray(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grayscale to 8 bits, rescaled instead of clipped to white:
    round(v / 257) when values exceed 255 (65535 -> 255), ×255 for float images in [0, 1].

    Converted in blocks of rows into one 8-bit array, never as a whole-image float copy (a
    6300x6300 16-bit PNG of 92 KB would otherwise cost 1 GB).
    """
    low, peak = image.getextrema()
    if image.mode == "F" and peak <= 1.0:
        scale = 255.0
    elif peak > 255:
        scale = 1 / 257
    else:
        scale = 1.0
    width, height = image.size
    gray = np.empty((height, width), dtype=np.uint8)
    rows = max(1, HIGH_DEPTH_BLOCK // max(width, 1))
    unsigned16 = image.mode.startswith("I;16")
    for top in range(0, height, rows):
        block = np.asarray(image.crop((0, top, width, min(height, top + rows))))
        if unsigned16 and scale == 1 / 257:
            # integer round(v / 257): exact, since v / 257 is never halfway for an integer v
            gray[top:top + rows] = (block.astype(np.uint32) + 128) // 257
        else:
            gray[top:top + rows] = np.clip(np.rint(block.astype(np.float64) * scale), 0, 255)
    return Image.fromarray(gray, "L")


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
    attribute index, the image's value id for it (``attr_value``, the lowest when it has several)
    and all its values of that attribute (``attr_value_multi_hot`` [max_values]).
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
            # every value of that attribute (several for a multi-label one): the losses' targets
            record["attr_value_multi_hot"] = self.labels.attribute_multi_hot(record["attr_multi_hot"], attribute)
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
