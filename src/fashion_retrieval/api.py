"""The Python API: load a model, embed photos, build or open an index, search it with filters.

Everything here is re-exported by the package (``from fashion_retrieval import open_index``);
the CLI's ``search`` is built on it. README.md ("Python") shows it in use, and
``tests/test_api.py`` runs that README code as written.

- :func:`load_model` → :class:`Model` (a run directory, its ``model.safetensors``, an index's
  model copy, an ONNX export, or ``zoo:NAME``); ``Model.embed(images, attribute=None)`` takes PIL images or
  paths and returns L2-normalised float32 vectors [N, D].
- :func:`build_index` / :func:`open_index` → :class:`Index`; ``Index.search(query, k,
  attribute=None, filters=None, ids=None)`` → a list of :class:`Hit`, best first. ``query`` is a
  photo (path or PIL image) or a vector; ``filters`` maps a metadata field (``category``,
  ``domain``, ``item_id`` or an attribute such as ``gender``) to one value or a list of accepted
  values; ``ids`` lists the allowed item ids. ``Index.search_files`` does the same for many
  photos, in batches, reporting unreadable ones instead of failing. ``query_expansion="k,alpha"``
  (both) searches again with the α-expanded query (docs/metrics.md, "Test-time options": it
  gains mAP and top-1 on the consumer-to-shop category benchmark, loses top-5 … top-50; off by
  default).

Errors are the project's one-line exceptions (``StoreError``, ``CheckpointError``,
``ImageLoadError``, ``FilterError``, ``UnknownSpaceError``), all naming the file or field.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np

from .index.filters import FilterError, SearchFilter

ZOO_PREFIX = "zoo:"

ImageLike = Union[str, os.PathLike, "Image.Image"]  # noqa: F821 - PIL is imported where images are decoded
Filters = Union[Mapping[str, Union[str, Sequence[str]]], SearchFilter, None]
Expansion = Union[str, "QueryExpansion", None]  # noqa: F821 - rerank (torch) is imported when one is given


@dataclass
class Hit:
    """One search result: ``id`` is the image's id in the index, ``item_id`` the catalog item's."""

    rank: int
    id: str
    item_id: str
    score: float  # cosine similarity of the two embeddings, in [-1, 1]
    category: str | None = None
    path: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Model:
    """A trained model ready to embed photos (PyTorch or ONNX runtime, same vectors)."""

    def __init__(self, embedder):
        self._embedder = embedder

    @property
    def attributes(self) -> list[str]:
        """The attributes an attribute-conditioned model embeds by (``[]`` for a plain model)."""
        return list(self._embedder.attributes) if self._embedder.attribute_conditioned else []

    @property
    def feat_dim(self) -> int:
        return self._embedder.feat_dim

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self._embedder.image_size)

    def embed(self, images: ImageLike | Sequence[ImageLike], attribute: str | None = None,
              batch_size: int = 32) -> np.ndarray:
        """L2-normalised embeddings [N, feat_dim] of PIL images or image paths (one image: N = 1);
        ``attribute`` picks the space of an attribute-conditioned model."""
        images = _as_list(images)
        self._embedder.attribute_index(attribute)  # an unknown attribute fails before any decode
        parts = [self._embedder.embed([_open(image) for image in images[start:start + batch_size]], attribute)
                 for start in range(0, len(images), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.feat_dim), np.float32)


def load_model(source: str | os.PathLike, device: str = "cpu", flip: bool | None = None) -> Model:
    """A run directory, its ``model.safetensors``, an index directory (its model copy), an ONNX
    export (``model.onnx`` with its sidecar), or ``zoo:NAME`` (a model shipped in the package;
    ``fashion-retrieval zoo list``). ``flip``: flip-averaged embeddings (each photo averaged with
    its mirror); default off, and for an index directory as its catalog was embedded."""
    from .index.embedders import OnnxEmbedder, TorchEmbedder

    text = os.fspath(source)
    if text.startswith(ZOO_PREFIX):  # a shipped model, verified against its pinned sha256 (zoo/)
        from .engine.checkpoint import resolve_zoo

        return Model(TorchEmbedder(resolve_zoo(text), device, bool(flip)))
    path = Path(text)
    if path.suffix == ".onnx":
        return Model(OnnxEmbedder(path, bool(flip)))
    if (path / "index.json").is_file():
        if flip is None:
            from .index.catalog import recorded_flip

            flip = recorded_flip(path)
        path = path / "model"
    return Model(TorchEmbedder(path, device, bool(flip)))


class Index:
    """A catalog index on disk (see docs/serving.md), searched with the model that built it."""

    def __init__(self, catalog, device: str = "cpu", onnx: str | os.PathLike | None = None,
                 flip: bool | None = None):
        self._catalog = catalog
        self._device = device
        self._onnx = onnx
        self._flip = flip  # None: as the catalog was embedded (index build --flip)
        self._model: Model | None = None

    @property
    def path(self) -> Path:
        return self._catalog.path

    @property
    def model(self) -> Model:
        """The index's own model (loaded at the first photo query): queries must be embedded by
        exactly the model that embedded the catalog, and flip-averaged when the catalog was."""
        if self._model is None:
            from .index.embedders import embedder_for_index

            self._model = Model(embedder_for_index(self._catalog, self._onnx, self._device, self._flip))
        return self._model

    @property
    def flip(self) -> bool:
        """Whether the catalog's vectors are flip-averaged (``index build --flip``)."""
        return self._catalog.flip

    @property
    def attributes(self) -> list[str]:
        """The attribute spaces (``[]``: one space, search without ``attribute``)."""
        return list(self._catalog.spaces) if self._catalog.attribute_conditioned else []

    @property
    def filter_fields(self) -> list[str]:
        """Metadata fields ``filters`` may name: category, domain, item_id and the catalog's attributes."""
        return self._catalog.filter_fields()

    def facets(self) -> dict[str, dict[str, int]]:
        """Items per value of each filter field, e.g. ``{"gender": {"Men": 120, "Women": 98}}``."""
        return self._catalog.facets()

    def __len__(self) -> int:
        return len(self._catalog)

    def get(self, id: str) -> dict[str, Any] | None:
        """The metadata recorded for an image id (item_id, path, category, domain, attributes)."""
        return self._catalog.get_metadata(id)

    def search(self, query: ImageLike | np.ndarray, k: int = 10, attribute: str | None = None,
               filters: Filters = None, ids: Iterable[str] | None = None,
               query_expansion: Expansion = None) -> list[Hit]:
        """The ``k`` best catalog images for one photo (or one embedding vector), best first,
        among those ``filters`` and ``ids`` allow: exactly ``k`` whenever ``k`` match.
        ``query_expansion``: ``"k,alpha"`` or a ``rerank.QueryExpansion``; the scores are then
        the expanded query's cosine similarities."""
        where = self.prepare(attribute, filters, ids)  # a bad filter fails before the model loads
        expansion = _expansion(query_expansion)
        vectors = query.reshape(1, -1) if isinstance(query, np.ndarray) else self.model.embed([query], attribute)
        return self._hits(vectors, k, attribute, where, expansion)[0]

    def search_files(self, queries: Sequence[str | os.PathLike], k: int = 10, attribute: str | None = None,
                     filters: Filters = None, ids: Iterable[str] | None = None,
                     batch_size: int = 32, query_expansion: Expansion = None
                     ) -> Iterator[tuple[str, list[Hit] | None, str | None]]:
        """``(query, hits, None)`` for each photo, or ``(query, None, reason)`` for one that cannot
        be read; photos are decoded and embedded ``batch_size`` at a time."""
        from .data.images import ImageLoadError, load_rgb

        where = self.prepare(attribute, filters, ids)
        expansion = _expansion(query_expansion)
        queries = list(queries)
        for start in range(0, len(queries), batch_size):
            chunk = [os.fspath(q) for q in queries[start:start + batch_size]]
            photos, errors = {}, {}
            for query in chunk:
                try:
                    photos[query] = load_rgb(query)
                except ImageLoadError as exc:
                    errors[query] = exc.reason
            found = iter(self._hits(self.model.embed(list(photos.values()), attribute), k, attribute, where,
                                    expansion) if photos else [])
            for query in chunk:
                yield (query, None, errors[query]) if query in errors else (query, next(found), None)

    def prepare(self, attribute: str | None = None, filters: Filters = None,
                ids: Iterable[str] | None = None) -> SearchFilter | None:
        """Check ``attribute`` (``UnknownSpaceError``) and the filter fields (``FilterError``)
        without embedding anything; returns the filter the searches use."""
        self._catalog.store(attribute)
        if isinstance(filters, SearchFilter):
            if ids is not None:
                raise FilterError("pass ids inside the SearchFilter or as ids=, not both")
            where = filters
        else:
            where = SearchFilter.build(filters, None if ids is None else list(ids))
        if where is not None:
            where.check_fields(self.filter_fields)
        return where

    def _hits(self, vectors: np.ndarray, k: int, attribute: str | None,
              where: SearchFilter | None, expansion=None) -> list[list[Hit]]:
        scores, ids = self._catalog.search(vectors, k, attribute, where, query_expansion=expansion)
        return [[self._hit(rank, item_id, score) for rank, (score, item_id) in enumerate(zip(row_scores.tolist(), row), 1)]
                for row_scores, row in zip(scores, ids)]

    def _hit(self, rank: int, item_id: str, score: float) -> Hit:
        meta = self._catalog.get_metadata(item_id) or {}
        return Hit(rank, item_id, str(meta.get("item_id", item_id)), round(float(score), 6), meta.get("category"),
                   meta.get("path"), dict(meta.get("attributes") or {}))


def open_index(path: str | os.PathLike, device: str = "cpu", onnx: str | os.PathLike | None = None,
               flip: bool | None = None) -> Index:
    """An index written by ``fashion-retrieval index build`` (or :func:`build_index`); ``onnx``:
    embed queries with this ONNX export of the index's model; ``flip``: flip-average the query
    photos or not (default: as the catalog was embedded)."""
    from .index.catalog import CatalogIndex

    return Index(CatalogIndex.open(path), device, onnx, flip)


def build_index(checkpoint: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
                **options: Any) -> Index:
    """Embed a catalog (a folder of photos, a CSV table, or a dataset root with ``format=``) and
    write an index at ``out``; ``options`` are ``index build``'s (kind, attributes, format,
    split, domain, batch_size, store, device, flip)."""
    from .index.build import build_index as build

    options.setdefault("progress", False)
    build(checkpoint, images, out, **options)
    return open_index(out, options.get("device", "cpu"))


def query_files(source: str | os.PathLike) -> list[Path]:
    """The photos a batch search runs over: one image file, the images under a folder (sorted,
    hidden ones left out), or the ``path`` column of a CSV (relative to the CSV's folder)."""
    import csv
    import io

    from .data.readers.catalog import IMAGE_SUFFIXES
    from .data.table import AnnotationError, read_utf8_text

    source = Path(source)
    if source.is_dir():
        photos = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                        and not any(part.startswith(".") for part in p.relative_to(source).parts))
        if not photos:
            raise AnnotationError(source, None, f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        return photos
    if source.suffix.lower() != ".csv":
        return [source]  # one photo: the image loader names what is wrong with it, missing included
    if not source.is_file():
        raise AnnotationError(source, None, "file not found")
    reader = csv.DictReader(io.StringIO(read_utf8_text(source), newline=""))
    if reader.fieldnames is None or "path" not in reader.fieldnames:
        raise AnnotationError(source, 1, f"header must contain a 'path' column, got {reader.fieldnames}")
    photos = []
    try:
        for row in reader:
            value = (row.get("path") or "").strip()
            if not value:
                raise AnnotationError(source, reader.line_num, "empty path")
            photos.append(source.parent / value)
    except csv.Error as exc:
        raise AnnotationError(source, reader.line_num, str(exc)) from None
    if not photos:
        raise AnnotationError(source, None, "no rows")
    return photos


def _expansion(value: Expansion):
    """``"k,alpha"`` → ``rerank.QueryExpansion`` (a malformed one raises ``RerankError``)."""
    if value is None:
        return None
    from .rerank import QueryExpansion

    return value if isinstance(value, QueryExpansion) else QueryExpansion.parse(value)


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    from PIL import Image

    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    return list(images)


def _open(image: ImageLike):
    from PIL import Image

    from .data.images import load_rgb

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    return load_rgb(image)


__all__ = ["Hit", "Index", "Model", "SearchFilter", "FilterError", "build_index", "load_model", "open_index",
           "query_files"]
