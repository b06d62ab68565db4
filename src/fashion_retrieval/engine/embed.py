"""Embed images with a trained model: the one code path shared by evaluate, index and serve.

Embeddings are L2-normalised float32, so inner product = cosine similarity everywhere
downstream. Unreadable images are skipped and reported, never fatal: ``indices`` says which
table rows the embedding rows belong to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from ..data.images import ImageDataset, Transform, collate_skipping, default_transform
from ..data.table import SampleTable


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


def _attribute_tensor(attribute: int | None, batch_size: int, device: torch.device) -> torch.Tensor | None:
    if attribute is None:
        return None
    return torch.full((batch_size,), int(attribute), dtype=torch.long, device=device)


def _forward_embeddings(model: nn.Module, images: torch.Tensor, attributes: Sequence[int | None],
                        amp: bool) -> list[torch.Tensor]:
    conditioned = bool(getattr(model, "attribute_conditioned", False))
    outputs = []
    shared: torch.Tensor | None = None
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        for attribute in attributes:
            if conditioned:
                if attribute is None:
                    raise ValueError("this model is attribute-conditioned: pass attribute=<index>")
                embedding = model(images, attribute=_attribute_tensor(attribute, len(images), images.device))["embedding"]
            else:
                # An unconditioned model has one embedding for every attribute: compute it once.
                if shared is None:
                    shared = model(images)["embedding"]
                embedding = shared
            outputs.append(embedding)
    return [F.normalize(e.float(), dim=1) for e in outputs]


@torch.inference_mode()
def embed_table_attributes(model: nn.Module, table: SampleTable, image_size: Sequence[int],
                           attributes: Sequence[int | None], batch_size: int = 64,
                           device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = True,
                           crop_bbox: bool = False, amp: bool = False, desc: str = "embedding") -> EmbedResult:
    """Embed every row once per attribute index in ``attributes``, decoding each image only once."""
    if not attributes:
        raise ValueError("attributes must name at least one attribute index (or None)")
    from tqdm.auto import tqdm

    device = torch.device(device)
    dataset = ImageDataset(table, inference_transform(image_size), labels=None, crop_bbox=crop_bbox)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skipping, pin_memory=device.type == "cuda",
                        # Its own generator: embedding must not consume the training RNG stream.
                        generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    chunks: list[list[np.ndarray]] = [[] for _ in attributes]
    kept: list[np.ndarray] = []
    skipped: list[str] = []
    try:
        with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for batch in loader:
                skipped += batch["skipped"]
                if "image" in batch:
                    images = batch["image"].to(device, non_blocking=True)
                    if device.type == "cuda":
                        images = images.contiguous(memory_format=torch.channels_last)
                    for slot, embedding in enumerate(_forward_embeddings(model, images, attributes, amp)):
                        chunks[slot].append(embedding.cpu().numpy())
                    kept.append(batch["index"].numpy())
                bar.update(len(batch["skipped"]) + (len(batch["index"]) if "index" in batch else 0))
    finally:
        model.train(was_training)
    dim = int(getattr(model, "feat_dim", 0))
    stacked = [np.concatenate(c).astype(np.float32, copy=False) if c else np.zeros((0, dim), np.float32)
               for c in chunks]
    indices = np.concatenate(kept).astype(np.int64) if kept else np.zeros(0, np.int64)
    by_attribute = {a: e for a, e in zip(attributes, stacked) if a is not None}
    return EmbedResult(stacked[0], indices, skipped, by_attribute)


def embed_table(model: nn.Module, table: SampleTable, image_size: Sequence[int], batch_size: int = 64,
                attribute: int | None = None, device: str | torch.device = "cpu", num_workers: int = 0,
                progress: bool = True, crop_bbox: bool = False, amp: bool = False) -> EmbedResult:
    """L2-normalised embeddings of every readable row of ``table`` (for ``attribute`` when the
    model is attribute-conditioned)."""
    return embed_table_attributes(model, table, image_size, [attribute], batch_size=batch_size, device=device,
                                  num_workers=num_workers, progress=progress, crop_bbox=crop_bbox, amp=amp)


@torch.inference_mode()
def embed_images(model: nn.Module, images: Iterable[Image.Image], image_size: Sequence[int],
                 attribute: int | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64) -> np.ndarray:
    """Embeddings [N, D] (L2-normalised float32) of decoded RGB PIL images, e.g. uploaded queries."""
    device = torch.device(device)
    transform = inference_transform(image_size)
    tensors = [transform(image.convert("RGB") if image.mode != "RGB" else image) for image in images]
    if not tensors:
        return np.zeros((0, int(getattr(model, "feat_dim", 0))), np.float32)
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, len(tensors), batch_size):
            batch = torch.stack(tensors[start:start + batch_size]).to(device)
            out.append(_forward_embeddings(model, batch, [attribute], amp=False)[0].cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float32, copy=False)
