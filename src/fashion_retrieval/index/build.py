"""Embed a catalog with a trained model and write (or update) a catalog index."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..data.table import AnnotationError, Sample, SampleTable
from .catalog import DEFAULT_SPACE, CatalogIndex, file_sha256
from .store import StoreError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class BuildReport:
    index_dir: Path
    added: int
    spaces: list[str]
    skipped: list[str] = field(default_factory=list)


def load_catalog_table(images: str | Path, format: str | None = None, split: str | Sequence[str] | None = None,
                       domain: str | None = None) -> SampleTable:
    """A folder of images, a folder in a known dataset format, or a CSV sample table."""
    from ..data.readers import READERS

    images = Path(images)
    if not images.exists():
        raise AnnotationError(images, None, "no such file or folder")
    if images.is_file():
        table = SampleTable.from_csv(images)
    elif format is not None:
        table = READERS.build(format, root=images)
    elif any(p.suffix.lower() in IMAGE_SUFFIXES for p in images.iterdir() if p.is_file()):
        files = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        table = SampleTable([Sample(path=p.name, item_id=p.stem, domain="shop") for p in files], images, images.name)
    else:
        table = READERS.build("folder", root=images)
    if split or domain:
        table = table.filter(split=split, domain=domain)
    if not len(table):
        raise AnnotationError(images, None, f"no images selected (split={split}, domain={domain})")
    return table


def _image_ids(table: SampleTable, rows: Sequence[int]) -> list[str]:
    """Item ids when they are unique, else item id plus file name: one vector per image."""
    item_ids = [table[i].item_id for i in rows]
    if len(set(item_ids)) == len(item_ids):
        return item_ids
    return [f"{table[i].item_id}:{Path(table[i].path).stem}" for i in rows]


def _metadata(table: SampleTable, index: int) -> dict[str, Any]:
    sample = table[index]
    attributes = {k: list(v) if isinstance(v, tuple) else v for k, v in sample.attributes.items()}
    return {"item_id": sample.item_id, "path": str(table.resolve(sample).resolve()), "category": sample.category,
            "domain": sample.domain, "attributes": attributes}


def _embed_into(catalog: CatalogIndex, model, meta: dict, table: SampleTable, batch_size: int,
                progress: bool, device: str) -> tuple[int, list[str]]:
    from ..engine.embed import embed_table

    image_size = tuple(meta["image_size"])
    attributes = list(meta.get("attributes") or [])
    skipped: list[str] = []
    added = 0
    for space in catalog.spaces:
        attribute = attributes.index(space) if catalog.attribute_conditioned else None
        result = embed_table(model, table, image_size, batch_size=batch_size, attribute=attribute,
                             device=device, progress=progress)
        rows = [int(i) for i in result.indices]
        if not skipped:
            skipped = list(result.skipped)
        catalog.add(space, _image_ids(table, rows), result.embeddings, [_metadata(table, i) for i in rows])
        added = len(rows)
    return added, skipped


def build_index(checkpoint: str | Path, images: str | Path, out: str | Path, kind: str = "flat",
                attributes: Sequence[str] | None = None, format: str | None = None,
                split: str | Sequence[str] | None = None, domain: str | None = None, batch_size: int = 64,
                store: str = "faiss", device: str = "cpu", progress: bool = True) -> BuildReport:
    from ..engine.checkpoint import load_for_inference

    model, meta = load_for_inference(checkpoint)
    table = load_catalog_table(images, format, split, domain)
    model_attributes = list(meta.get("attributes") or [])
    if getattr(model, "attribute_conditioned", False):
        spaces = list(attributes or model_attributes)
        unknown = [a for a in spaces if a not in model_attributes]
        if unknown:
            raise StoreError(f"the model has no attribute {unknown[0]!r}; it knows {', '.join(model_attributes)}")
    else:
        if attributes:
            raise StoreError("--attribute needs an attribute-conditioned model (ASEN, M3-Net, attribute_classifier)")
        spaces = [DEFAULT_SPACE]
    weights = Path(checkpoint) / "model.safetensors" if Path(checkpoint).is_dir() else Path(checkpoint)
    model_info = {"checkpoint": str(Path(checkpoint).resolve()), "sha256": file_sha256(weights),
                  "name": meta.get("model", {}).get("name"), "image_size": list(meta["image_size"]),
                  "attributes": model_attributes}
    catalog = CatalogIndex(out, model_info, spaces, int(model.feat_dim), kind, store)
    added, skipped = _embed_into(catalog, model, meta, table, batch_size, progress, device)
    catalog.save()
    return BuildReport(Path(out), added, spaces, skipped)


def add_to_index(index_dir: str | Path, images: str | Path, format: str | None = None,
                 split: str | Sequence[str] | None = None, domain: str | None = None, batch_size: int = 64,
                 device: str = "cpu", progress: bool = True) -> BuildReport:
    """Embed more images with the index's own model and add them; existing ids are replaced."""
    from ..engine.checkpoint import load_for_inference

    catalog = CatalogIndex.open(index_dir)
    checkpoint = Path(catalog.model_info["checkpoint"])
    model, meta = load_for_inference(checkpoint)
    weights = checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint
    if file_sha256(weights) != catalog.model_info.get("sha256"):
        raise StoreError(f"{checkpoint} changed since {index_dir} was built: rebuild the index with it")
    table = load_catalog_table(images, format, split, domain)
    added, skipped = _embed_into(catalog, model, meta, table, batch_size, progress, device)
    catalog.save()
    return BuildReport(Path(index_dir), added, catalog.spaces, skipped)


def remove_from_index(index_dir: str | Path, ids: Sequence[str]) -> int:
    catalog = CatalogIndex.open(index_dir)
    removed = catalog.remove(ids)
    catalog.save()
    return removed
