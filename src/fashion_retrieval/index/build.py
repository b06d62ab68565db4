"""Embed a catalog with a trained model and write (or update) a catalog index."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..data.table import AnnotationError, Sample, SampleTable
from ..files import quote, refuse_other_artefact
from .catalog import (DEFAULT_SPACE, META_FILE, WEIGHTS_FILE, CatalogIndex, checkpoint_files, file_sha256,
                      refuse_foreign_directory, space_dirs_for)
from .store import StoreError

if TYPE_CHECKING:  # engine/checkpoint.py imports torch; build imports it only when it runs
    from ..engine.checkpoint import RunMeta

# A build embeds with a copy of the checkpoint in the temporary folder; the owner's host and
# process id in the name let a later build remove the copy of one that was killed.
STAGING_PREFIX = "fashion-retrieval-model-"


@dataclass
class BuildReport:
    index_dir: Path
    added: int
    spaces: list[str]
    skipped: list[str] = field(default_factory=list)
    total: int = 0  # catalog images in the build (added + skipped)


def load_catalog_table(images: str | Path, format: str | None = None, split: str | Sequence[str] | None = None,
                       domain: str | None = None, columns: Any = None) -> SampleTable:
    """One image, a folder of images, a folder in a known dataset format, or a CSV table (with
    an optional column mapping): ``data.readers.catalog.read_catalog``."""
    from ..data.readers.catalog import read_catalog

    table = read_catalog(images, format, columns)
    if split or domain:
        table = table.filter(split=split, domain=domain)
    if not len(table):
        raise AnnotationError(images, None, f"no images selected (split={split}, domain={domain})")
    return table


def _image_ids(table: SampleTable, rows: Sequence[int]) -> list[str]:
    """One id per image: item ids when they are unique, else item id and file stem; only the
    images whose stem repeats within their item (x.jpg and x.png, front.jpg in two folders) get
    item id and their path in the catalog, so such a pair does not rename every other image."""
    samples = [table[i] for i in rows]
    ids = [s.item_id for s in samples]
    if len(set(ids)) == len(ids):
        return ids
    ids = [f"{s.item_id}:{Path(s.path).stem}" for s in samples]
    counts = Counter(ids)
    ids = [f"{s.item_id}:{s.path}" if counts[image_id] > 1 else image_id for s, image_id in zip(samples, ids)]
    first: dict[str, Sample] = {}
    for sample, image_id in zip(samples, ids):
        if image_id not in first:
            first[image_id] = sample
        elif first[image_id].path == sample.path:
            raise AnnotationError(table.resolve(sample), None, "listed twice in the catalog; each image must appear once")
        else:
            raise AnnotationError(table.resolve(sample), None, f"gets the id {quote(image_id, 80)}, as does "
                                  f"{table.resolve(first[image_id])}; rename one of them")
    return ids


def _metadata(table: SampleTable, index: int) -> dict[str, Any]:
    sample = table[index]
    attributes = {k: list(v) if isinstance(v, tuple) else v for k, v in sample.attributes.items()}
    return {"item_id": sample.item_id, "path": str(table.resolve(sample).resolve()), "category": sample.category,
            "domain": sample.domain, "attributes": attributes}


def _catalog_roots(existing: Sequence[str], base: Path, paths: Sequence[str]) -> list[str]:
    """The folders the server may serve these images from: the catalog folder for the images
    inside it, the image's own folder for any other (a CSV naming files elsewhere), never wider."""
    base_str = os.path.realpath(base)
    roots = set(existing)
    for path in paths:
        parents = {str(p) for p in Path(path).parents}
        if not parents & roots:
            roots.add(base_str if base_str in parents else str(Path(path).parent))
    # a root inside another adds nothing
    return sorted(r for r in roots if not {str(p) for p in Path(r).parents} & roots)


def _embed_into(catalog: CatalogIndex, model, meta: "RunMeta", table: SampleTable, batch_size: int,
                progress: bool, device: str) -> tuple[int, list[str]]:
    """Embed every image once per space (decoding it once) and add the vectors."""
    import numpy as np

    from ..engine.embed import embed_table_attributes

    indices = ([model.attribute_names.index(s) for s in catalog.spaces] if catalog.attribute_conditioned
               else [None])
    result = embed_table_attributes(model, table, meta.image_size, indices, batch_size=batch_size,
                                    device=device, progress=progress, flip=catalog.flip)
    if not len(result):
        shown = "; ".join(result.skipped[:3])
        raise StoreError(f"none of the {len(table)} catalog images could be read (e.g. {shown})")
    rows = [int(i) for i in result.indices]
    ids = _image_ids(table, rows)
    metadata = [_metadata(table, i) for i in rows]
    if catalog.catalog_roots is not None:  # None: an index built before roots were recorded
        catalog.catalog_roots = _catalog_roots(catalog.catalog_roots, table.root, [m["path"] for m in metadata])
    for space, index in zip(catalog.spaces, indices):
        vectors = result.embeddings if index is None else result.by_attribute[index]
        if not np.isfinite(vectors).all():  # finite weights can still overflow
            raise StoreError(f"the model gives NaN or infinite embeddings for some images (space {space!r}); "
                             "its weights are broken: nothing was written")
        catalog.add(space, ids, vectors, metadata)
    return len(rows), list(result.skipped)


def _spaces_for(model, model_attributes: list[str], attributes: Sequence[str] | None) -> list[str]:
    if model.attribute_conditioned:
        spaces = list(dict.fromkeys(attributes or model_attributes))
        unknown = [a for a in spaces if a not in model_attributes]
        if unknown:
            raise StoreError(f"unknown attribute '{unknown[0]}'; the model knows {', '.join(model_attributes)}")
        return spaces
    if attributes:
        raise StoreError("--attribute needs an attribute-conditioned model (asen, m3_net, attribute_classifier); "
                         "this one has a single embedding space")
    return [DEFAULT_SPACE]


def build_index(checkpoint: str | Path, images: str | Path, out: str | Path, kind: str = "flat",
                attributes: Sequence[str] | None = None, format: str | None = None,
                split: str | Sequence[str] | None = None, domain: str | None = None, batch_size: int = 64,
                store: str = "faiss", device: str = "cpu", progress: bool = True,
                columns: Any = None, milvus_uri: str | None = None, flip: bool = False) -> BuildReport:
    """Write ``out`` from scratch; an index already there is replaced only once the new one is complete.
    ``milvus_uri``: with ``store="milvus"``, a Milvus server (``http://host:19530``) to hold the
    vectors instead of milvus-lite files under ``out`` (token: ``MILVUS_TOKEN``). ``flip``: store
    flip-averaged vectors (``engine.embed.flip_averaged``); index.json records it, and every
    later query and ``index add`` of this index is embedded the same way."""
    if milvus_uri is not None and (store != "milvus" or not milvus_uri.startswith(("http://", "https://"))):
        raise StoreError(f"--milvus-uri {quote(milvus_uri, 80)}: needs --store milvus and an http(s):// URI "
                         "such as http://localhost:19530")
    from ..engine.checkpoint import CheckpointError, load_for_inference

    out = Path(out)
    refuse_other_artefact(out, "index", StoreError)
    refuse_foreign_directory(out)
    weights, meta_file = checkpoint_files(checkpoint)
    for required in (weights, meta_file):
        if not required.is_file():
            raise CheckpointError(f"{required}: checkpoint file not found")
    table = load_catalog_table(images, format, split, domain, columns)
    # Copy the checkpoint first and embed with the copy: a training run that overwrites its
    # checkpoint meanwhile cannot pair new weights with vectors from the old ones.
    remove_abandoned_staging()
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{_owner_tag()}-") as staging:
        staged = {WEIGHTS_FILE: Path(staging) / WEIGHTS_FILE, META_FILE: Path(staging) / META_FILE}
        shutil.copyfile(weights, staged[WEIGHTS_FILE])
        shutil.copyfile(meta_file, staged[META_FILE])
        try:
            model, meta = load_for_inference(staging)
        except CheckpointError as exc:  # it read the copies: name the files the user gave
            raise CheckpointError(str(exc).replace(str(Path(staging)), str(weights.parent))) from None
        model_attributes = list(model.attribute_names)
        spaces = _spaces_for(model, model_attributes, attributes)
        # attribute names come from whoever wrote meta.json (a catalog CSV's keys): checked and
        # mapped to folder names before anything is written
        space_dirs = space_dirs_for(spaces, str(meta_file), "attribute")
        origin = str(checkpoint) if str(checkpoint).startswith("zoo:") else str(Path(checkpoint).resolve())
        model_info = {"checkpoint": origin, "sha256": file_sha256(staged[WEIGHTS_FILE]),
                      "name": meta.model.name, "image_size": list(meta.image_size),
                      "attributes": model_attributes}
        catalog = CatalogIndex(out, model_info, spaces, int(model.feat_dim), kind, store, model_files=staged,
                               space_dirs=space_dirs, milvus_uri=milvus_uri, flip=flip)
        catalog.catalog_roots = []
        added, skipped = _embed_into(catalog, model, meta, table, batch_size, progress, device)
        catalog.save()
    return BuildReport(out, added, spaces, skipped, len(table))


def _owner_tag() -> str:
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40]
    return f"{host}.{os.getpid()}"


def remove_abandoned_staging(folder: str | Path | None = None) -> list[Path]:
    """Remove the checkpoint copies of builds on this host whose process is gone (killed before
    its clean-up ran: each would keep a model's size in the temporary folder). Returns them."""
    if os.name != "posix":  # os.kill(pid, 0) only asks whether a process exists on POSIX
        return []
    host, _ = _owner_tag().rsplit(".", 1)
    removed = []
    for staging in Path(folder or tempfile.gettempdir()).glob(glob.escape(f"{STAGING_PREFIX}{host}.") + "*"):
        pid = staging.name[len(STAGING_PREFIX) + len(host) + 1:].split("-", 1)[0]
        if not pid.isdigit() or staging.is_symlink() or not staging.is_dir() or _process_exists(int(pid)):
            continue
        shutil.rmtree(staging, ignore_errors=True)
        removed.append(staging)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def add_to_index(index_dir: str | Path, images: str | Path, format: str | None = None,
                 split: str | Sequence[str] | None = None, domain: str | None = None, batch_size: int = 64,
                 device: str = "cpu", progress: bool = True, columns: Any = None) -> BuildReport:
    """Embed more images with the index's own model (flip-averaged when the index was built with
    ``flip``) and add them; existing ids are replaced."""
    from ..engine.checkpoint import load_for_inference

    catalog = CatalogIndex.open(index_dir)
    table = load_catalog_table(images, format, split, domain, columns)
    model, meta = load_for_inference(catalog.model_dir)
    added, skipped = _embed_into(catalog, model, meta, table, batch_size, progress, device)
    catalog.save()
    return BuildReport(Path(index_dir), added, catalog.spaces, skipped, len(table))


def remove_from_index(index_dir: str | Path, ids: Sequence[str]) -> int:
    catalog = CatalogIndex.open(index_dir)
    removed = catalog.remove(ids)
    if removed:
        catalog.save()
    return removed
