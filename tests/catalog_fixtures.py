"""Tiny trained-looking checkpoints and photo-like catalogs for the index, serve, export and
browser tests (randomly initialised models: the tests check plumbing, ranking consistency and
error handling, not retrieval quality)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = (64, 48)  # (H, W): small enough for a quick CPU test, big enough for resnet18's strides
ATTRIBUTES = ["colour", "sleeve"]
SHARED_PHOTO_FOLDERS = ("fashion-product/images", "clothing/validation/dress", "clothing/validation/shoes")

# each model's MODELS.build arguments; resnet18 without pretrained weights (no download)
MODEL_KWARGS = {
    "global_net": {"backbone": "resnet18", "num_items": 10},
    "asen": {"backbone": "resnet18", "attribute_sizes": [4, 3], "embedding_dim": 64, "attr_dim": 16,
             "joint_dim": 32},
    "attribute_classifier": {"backbone": "resnet18", "attribute_sizes": [4, 3], "embedding": "softmax"},
}


def photo_like(seed: int, size: tuple[int, int] = (96, 128)) -> Image.Image:
    """A garment-like picture (size is width, height): a soft background and a few coloured shapes,
    different for every seed, smooth enough that JPEG keeps its structure."""
    rng = np.random.default_rng(seed)
    width, height = size
    top, bottom = rng.integers(150, 256, 3), rng.integers(120, 230, 3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp).repeat(width, axis=1).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 5))):
        x0, y0 = int(rng.integers(0, width * 2 // 3)), int(rng.integers(0, height * 2 // 3))
        x1, y1 = x0 + int(rng.integers(width // 5, width // 2)), y0 + int(rng.integers(height // 5, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(1))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_catalog(folder: Path, count: int, first_seed: int = 0, prefix: str = "item",
                  broken: bool = False) -> list[Path]:
    """``count`` photo-like JPEGs named ``{prefix}{seed:03d}.jpg``; with ``broken`` also a truncated
    JPEG and a text file named .jpg, which a build must skip and list. Returns the good files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(first_seed, first_seed + count):
        path = folder / f"{prefix}{seed:03d}.jpg"
        path.write_bytes(jpeg_bytes(photo_like(seed)))
        paths.append(path)
    if broken:
        whole = jpeg_bytes(photo_like(999), quality=95)
        (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
        (folder / "notes.jpg").write_text("this is a text file with an image name\n")
    return paths


def save_tiny_checkpoint(run_dir: Path, name: str, seed: int = 0) -> Path:
    """A randomly initialised model saved the way training saves it; returns ``run_dir``."""
    import torch

    from fashion_retrieval.engine.checkpoint import save_for_inference
    from fashion_retrieval.models import MODELS

    torch.manual_seed(seed)
    kwargs = MODEL_KWARGS[name]
    model = MODELS.build(name, **kwargs)
    meta = {"model": {"name": name, "kwargs": kwargs}, "image_size": list(IMAGE_SIZE)}
    if getattr(model, "attribute_conditioned", False):
        meta["attributes"] = list(ATTRIBUTES)
    save_for_inference(model.eval(), meta, run_dir)
    return run_dir


def model_ranking(checkpoint: Path, query: Path, catalog: list[Path], attribute: str | None = None) -> list[str]:
    """Catalog file stems ranked for ``query`` by the model itself (exact cosine), independently of
    any index: what every search path must reproduce."""
    from fashion_retrieval.data.images import load_rgb
    from fashion_retrieval.engine.checkpoint import load_for_inference
    from fashion_retrieval.engine.embed import embed_images

    model, meta = load_for_inference(checkpoint)
    index = None if attribute is None else meta["attributes"].index(attribute)
    vectors = embed_images(model, [load_rgb(p) for p in catalog], meta["image_size"], attribute=index)
    query_vector = embed_images(model, [load_rgb(query)], meta["image_size"], attribute=index)[0]
    scores = vectors @ query_vector
    return [catalog[i].stem for i in np.argsort(-scores, kind="stable")]


def shared_photos(root: Path | None, count: int) -> list[Path]:
    """Real photos from the shared data (shop and consumer), when it is there."""
    if root is None:
        return []
    photos: list[Path] = []
    for folder in SHARED_PHOTO_FOLDERS:
        if (root / folder).is_dir():
            photos += sorted((root / folder).glob("*.jpg"))[: max(1, count // len(SHARED_PHOTO_FOLDERS))]
    return photos[:count]
