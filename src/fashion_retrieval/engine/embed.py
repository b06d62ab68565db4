"""Embed images with a trained model: the one code path shared by evaluate, index and serve.

Embeddings are L2-normalised float32, so inner product = cosine similarity everywhere
downstream. Unreadable images are skipped and reported, never fatal: ``indices`` says which
table rows the embedding rows belong to.

``decode="device"`` moves JPEG decoding from the DataLoader workers (PIL) to the embedding device
(``torchvision.io.decode_jpeg``, nvJPEG on CUDA): on a fast GPU the workers' PIL decode and
resize, not the model, limit the images per second.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..data.images import ImageDataset, Transform, collate_skipping, default_transform
from ..data.table import SampleTable
from ..models.base import RetrievalModel
from ..models.inference import folded_for_inference
from .execution import channels_last_inference


@dataclass
class EmbedResult:
    embeddings: np.ndarray  # float32 [N_ok, D], rows L2-normalised (first attribute's when several)
    indices: np.ndarray  # int64 [N_ok]: the table row of each embedding row
    skipped: list[str] = field(default_factory=list)  # "path: reason" of each unreadable image
    by_attribute: dict[int, np.ndarray] = field(default_factory=dict)  # attribute index -> [N_ok, D]

    def __len__(self) -> int:
        return len(self.indices)


def image_size_of(meta_or_size: Mapping[str, Any] | Sequence[int]) -> tuple[int, int]:
    size = meta_or_size["image_size"] if isinstance(meta_or_size, Mapping) else meta_or_size
    height, width = (int(v) for v in size)
    return height, width


def inference_transform(meta_or_size: Mapping[str, Any] | Sequence[int]) -> Transform:
    """The evaluation transform for a checkpoint's meta (or an ``(H, W)`` size): resize, to [0, 1]."""
    return default_transform(image_size_of(meta_or_size), train=False)


def flip_averaged(plain: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
    """The flip-averaged embedding: the mean of the L2-normalised embeddings of an image and of its
    horizontal mirror, L2-normalised again (as every embedding here is).

    Each view is normalised before the mean so that both count equally whatever their norms; a
    mirror-symmetric image gives back its plain embedding."""
    return F.normalize(F.normalize(plain.float(), dim=1) + F.normalize(mirrored.float(), dim=1), dim=1)


def _forward_embeddings(model: RetrievalModel, images: torch.Tensor, attributes: Sequence[int | None],
                        amp: bool, flip: bool = False) -> list[torch.Tensor]:
    """L2-normalised float32 ``model.embed`` of ``images`` for each attribute index; with
    ``flip``, :func:`flip_averaged` over the images and their horizontal mirrors."""
    # An unconditioned model has one embedding for every attribute: compute it once.
    keys = list(dict.fromkeys(attributes)) if model.attribute_conditioned else [None]

    def embeddings(batch: torch.Tensor) -> list[torch.Tensor]:
        if model.attribute_conditioned:  # the backbone once for all the attributes
            # (a model that only has ``embed``, such as a wrapper around a model, runs once per attribute)
            if hasattr(model, "embed_attributes"):
                return model.embed_attributes(batch, keys)
            return [model.embed(batch, key) for key in keys]
        return [model.embed(batch)]

    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        plain = embeddings(images)
        # The mirrors get a forward of their own: one batch of twice the size cost 1.2-1.5x the
        # two passes on the CPU (zoo models, one thread; the activations no longer fit the caches).
        mirrored = embeddings(images.flip(-1)) if flip else None
    if flip:
        outputs = {key: flip_averaged(a, b) for key, a, b in zip(keys, plain, mirrored)}
    else:
        outputs = {key: F.normalize(embedding.float(), dim=1) for key, embedding in zip(keys, plain)}
    return [outputs[a if model.attribute_conditioned else None] for a in attributes]


DECODERS = ("pil", "device")
EXIF_ORIENTATION = 0x0112


def _plain_jpeg_bytes(path: Path, max_pixels: int) -> torch.Tensor | None:
    """The file's bytes when decoding them without PIL gives the same picture: a JPEG in RGB or
    grey, upright (no EXIF rotation to apply), within the pixel limit. None otherwise, and for
    any file that fails here: the PIL path then decodes it or names the error."""
    try:
        data = path.read_bytes()
        # JPEG only: other formats go to load_rgb (an ICO decodes its hidden PNG while opening)
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:  # parses the header only
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            if image.width * image.height > max_pixels or image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                return None
    except Exception:  # noqa: BLE001 - any problem is the PIL path's to report
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class _EncodedJpegDataset(Dataset):
    """Rows as ``{"index", "jpeg": bytes}`` for device decoding; rows it cannot take that way
    (other formats, CMYK, EXIF-rotated, cropped to a box) come decoded by the PIL dataset."""

    def __init__(self, decoded: ImageDataset):
        self.decoded = decoded

    def __len__(self) -> int:
        return len(self.decoded)

    def __getitem__(self, index: int) -> dict[str, Any]:
        table = self.decoded.table
        sample = table[index]
        if not (self.decoded.crop_bbox and sample.bbox is not None):
            data = _plain_jpeg_bytes(table.resolve(sample), self.decoded.max_pixels)
            if data is not None:
                return {"index": int(index), "jpeg": data}
        return self.decoded[index]


def _collate_encoded(batch: list[dict[str, Any]]) -> dict[str, Any]:
    collated = collate_skipping([record for record in batch if "jpeg" not in record])
    encoded = [record for record in batch if "jpeg" in record]
    collated["jpeg"] = [record["jpeg"] for record in encoded]
    collated["jpeg_index"] = [record["index"] for record in encoded]
    return collated


def _decode_on_device(batch: dict[str, Any], transform: Transform, fallback: ImageDataset,
                      device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """(images [B, 3, H, W] on ``device``, their table rows, skip messages) of a collated batch of
    :func:`_collate_encoded`, rows in table order like the PIL path's."""
    from torchvision.io import ImageReadMode, decode_jpeg

    by_row: dict[int, torch.Tensor] = {}
    skipped: list[str] = []
    if "image" in batch:
        for row, image in zip(batch["index"].tolist(), batch["image"].to(device, non_blocking=True)):
            by_row[row] = image
    rows, data = batch["jpeg_index"], batch["jpeg"]
    if data:
        try:  # one batched call: nvJPEG decodes the whole batch at once
            decoded: list[torch.Tensor | None] = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):  # one bad file fails the batch: find it (them) one by one
            decoded = []
            for item in data:
                try:
                    decoded.append(decode_jpeg(item, mode=ImageReadMode.RGB, device=device))
                except (RuntimeError, ValueError):
                    decoded.append(None)
        # Catalog photos often share a size: resize each size's images in one call, not one by one.
        by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
        for row, image in zip(rows, decoded):
            if image is None:
                record = fallback[row]  # decodes it after all, or says why it cannot be read
                if "error" in record:
                    skipped.append(record["error"])
                else:
                    by_row[row] = record["image"].to(device)
                continue
            by_shape.setdefault(tuple(image.shape), []).append((row, image))
        for group in by_shape.values():
            resized = transform(torch.stack([image for _, image in group]))
            by_row.update((row, image) for (row, _), image in zip(group, resized))
    if not by_row:
        return None, None, skipped
    order = sorted(by_row)
    return (torch.stack([by_row[row].as_subclass(torch.Tensor) for row in order]),
            torch.tensor(order, dtype=torch.long), skipped)


@torch.inference_mode()
def embed_table_attributes(model: RetrievalModel, table: SampleTable, image_size: Sequence[int],
                           attributes: Sequence[int | None], batch_size: int = 64,
                           device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = True,
                           crop_bbox: bool = False, amp: bool = False, desc: str = "embedding",
                           decode: str = "pil", flip: bool = False, channels_last: bool = True,
                           fold_norms: bool = True) -> EmbedResult:
    """Embed every row once per attribute index in ``attributes``, decoding each image only once.

    ``channels_last``: on the CPU, run the model with channels_last weights and inputs (faster
    there; the weights get their format back afterwards). CUDA inputs are channels_last anyway.
    ``fold_norms``: on the CPU, embed with a copy whose BatchNorms are folded into their
    convolutions (:func:`~fashion_retrieval.models.inference.folded_for_inference`; the same
    embeddings to float rounding, faster there).

    ``decode``: ``"pil"`` decodes and resizes in the DataLoader workers; ``"device"`` has the
    workers only read JPEG bytes and decodes and resizes them on ``device`` (other files still
    go through PIL). ``flip``: flip-averaged embeddings (:func:`flip_averaged`; twice the
    forward cost)."""
    if not attributes:
        raise ValueError("attributes must name at least one attribute index (or None)")
    if decode not in DECODERS:
        raise ValueError(f"decode must be one of {', '.join(DECODERS)}, got {decode!r}")
    from tqdm.auto import tqdm

    device = torch.device(device)
    transform = inference_transform(image_size)
    dataset = ImageDataset(table, transform, labels=None, crop_bbox=crop_bbox)
    on_device = decode == "device"
    loader = DataLoader(_EncodedJpegDataset(dataset) if on_device else dataset, batch_size=batch_size,
                        shuffle=False, num_workers=num_workers,
                        collate_fn=_collate_encoded if on_device else collate_skipping,
                        pin_memory=device.type == "cuda",
                        # Its own generator: embedding must not consume the training RNG stream.
                        generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    forward_model = folded_for_inference(model, image_size_of(image_size), device) \
        if fold_norms and device.type == "cpu" else model
    chunks: list[list[np.ndarray]] = [[] for _ in attributes]
    kept: list[np.ndarray] = []
    skipped: list[str] = []
    try:
        with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress, leave=False) as bar, \
                channels_last_inference(forward_model, enabled=device.type == "cpu" and channels_last):
            for batch in loader:
                batch_skipped = list(batch["skipped"])
                if on_device:
                    images, rows, failed = _decode_on_device(batch, transform, dataset, device)
                    batch_skipped += failed
                else:
                    images = batch["image"].to(device, non_blocking=True) if "image" in batch else None
                    rows = batch.get("index")
                skipped += batch_skipped
                if images is not None:
                    if device.type == "cuda" or channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    for slot, embedding in enumerate(_forward_embeddings(forward_model, images, attributes, amp, flip)):
                        chunks[slot].append(embedding.cpu().numpy())
                    kept.append(rows.numpy())
                bar.update(len(batch_skipped) + (len(rows) if rows is not None else 0))
    finally:
        model.train(was_training)
    stacked = [np.concatenate(c).astype(np.float32, copy=False) if c else np.zeros((0, model.feat_dim), np.float32)
               for c in chunks]
    indices = np.concatenate(kept).astype(np.int64) if kept else np.zeros(0, np.int64)
    by_attribute = {a: e for a, e in zip(attributes, stacked) if a is not None}
    return EmbedResult(stacked[0], indices, skipped, by_attribute)


def embed_table(model: RetrievalModel, table: SampleTable, image_size: Sequence[int], batch_size: int = 64,
                attribute: int | None = None, device: str | torch.device = "cpu", num_workers: int = 0,
                progress: bool = True, crop_bbox: bool = False, amp: bool = False, decode: str = "pil",
                flip: bool = False, channels_last: bool = True, fold_norms: bool = True) -> EmbedResult:
    """L2-normalised embeddings of every readable row of ``table`` (for ``attribute`` when the
    model is attribute-conditioned); ``decode``, ``flip``, ``channels_last`` and ``fold_norms`` as
    in :func:`embed_table_attributes`."""
    return embed_table_attributes(model, table, image_size, [attribute], batch_size=batch_size, device=device,
                                  num_workers=num_workers, progress=progress, crop_bbox=crop_bbox, amp=amp,
                                  decode=decode, flip=flip, channels_last=channels_last, fold_norms=fold_norms)


@torch.inference_mode()
def embed_images(model: RetrievalModel, images: Iterable[Image.Image], image_size: Sequence[int],
                 attribute: int | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64, flip: bool = False) -> np.ndarray:
    """Embeddings [N, D] (L2-normalised float32) of decoded RGB PIL images, e.g. uploaded queries
    (``flip``: flip-averaged)."""
    device = torch.device(device)
    transform = inference_transform(image_size)
    tensors = [transform(image.convert("RGB") if image.mode != "RGB" else image) for image in images]
    if not tensors:
        return np.zeros((0, model.feat_dim), np.float32)
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, len(tensors), batch_size):
            batch = torch.stack(tensors[start:start + batch_size]).to(device)
            out.append(_forward_embeddings(model, batch, [attribute], amp=False, flip=flip)[0].cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float32, copy=False)
