"""Readers for three DeepFashion benchmarks (Liu et al., CVPR 2016), from their official files.

* ``deepfashion_c2s``: Consumer-to-Shop Clothes Retrieval (consumer photo → shop photos of the
  same item), what MMFL-Net and DML report on.
* ``deepfashion_inshop``: In-Shop Clothes Retrieval (shop photo → other shop photos of the item).
* ``deepfashion_attributes``: Category and Attribute Prediction, which ASEN and M3-Net use for
  attribute-specific retrieval through its five attribute types.

All official lists share one layout: line 1 holds the number of rows, line 2 the column names.
docs/datasets.md describes each layout and how its columns become table fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ...registry import ConfigError
from ..table import AnnotationError, Sample, SampleTable
from . import READERS
from ._annotations import BBox, counted_rows, fields, image_folder_parts, parse_bbox, parse_int, require_file

CLOTHES_TYPES = {1: "upper-body", 2: "lower-body", 3: "full-body"}
C2S_SOURCES = {1: "shop", 2: "consumer"}
INSHOP_POSES = {1: "frontal", 2: "side", 3: "back", 4: "zoom-out", 5: "zoom-in", 6: "stand-alone"}
ATTRIBUTE_TYPES = {1: "texture", 2: "fabric", 3: "shape", 4: "part", 5: "style"}
ATTRIBUTE_LABELS = frozenset({"1", "-1", "0"})  # positive, negative, unknown
LOW_RES_FOLDER, HIGH_RES_FOLDER = "img/", "img_highres/"


@dataclass
class _Image:
    item_id: str
    domain: str
    split: str
    line: int  # where the image was first listed, for conflict messages
    bbox: BBox | None = None
    attributes: dict[str, str | tuple[str, ...]] = field(default_factory=dict)


# ---- consumer-to-shop ------------------------------------------------------------------

@READERS.register("deepfashion_c2s")
def read_deepfashion_c2s(root: Path | str, highres_scale: float | None = None,
                         attribute_names_encoding: str = "utf-8") -> SampleTable:
    """One row per image of ``Eval/list_eval_partition.txt`` (an image can be in many pairs).

    The first image of a pair is the consumer photo, the second the shop photo; splits are
    train/val/test as listed, so the official test protocol is consumer test images as queries
    against shop test images. ``highres_scale``: read ``img_highres/`` instead of ``img/`` and
    multiply the boxes (which belong to the low-resolution images) by this factor.
    ``attribute_names_encoding``: encoding of ``Anno/list_attr_cloth.txt`` (it has Chinese names).
    """
    root = Path(root)
    box_scale = _box_scale(highres_scale)
    partition = root / "Eval" / "list_eval_partition.txt"
    images: dict[str, _Image] = {}
    for line, text in counted_rows(partition, first_column="image_pair_name_1"):
        consumer, shop, item_id, status = fields(partition, line, text, count=4)
        split = _status(partition, line, status, ("train", "val", "test"))
        for name, domain in ((consumer, "consumer"), (shop, "shop")):
            _add_image(images, partition, line, name, _Image(item_id, domain, split, line))

    bbox_file = root / "Anno" / "list_bbox_consumer2shop.txt"
    if bbox_file.is_file():
        for line, text in counted_rows(bbox_file, first_column="image_name"):
            name, clothes_type, source_type, *box = fields(bbox_file, line, text, count=7)
            image = images.get(name)
            if image is None:
                continue  # boxed but in no pair: not part of the benchmark
            source = C2S_SOURCES[parse_int(bbox_file, line, source_type, "source_type", 1, 2)]
            if source != image.domain:
                raise AnnotationError(bbox_file, line, f"{name} has source_type {source_type} ({source}) but is "
                                      f"a {image.domain} image in {partition.name} line {image.line}")
            image.attributes["clothes_type"] = CLOTHES_TYPES[parse_int(bbox_file, line, clothes_type,
                                                                       "clothes_type", 1, 3)]
            image.bbox = parse_bbox(bbox_file, line, box, box_scale)

    _check_items(root / "Anno" / "list_item_consumer2shop.txt", images, partition)
    item_attributes = _item_attributes(root / "Anno", _c2s_attribute_name, attribute_names_encoding)
    return _table(root, images, item_attributes, highres_scale, "deepfashion_c2s")


# ---- in-shop ---------------------------------------------------------------------------

@READERS.register("deepfashion_inshop")
def read_deepfashion_inshop(root: Path | str, highres_scale: float | None = None) -> SampleTable:
    """One row per image of ``Eval/list_eval_partition.txt``; every image is a shop photo.

    Splits are train/query/gallery as listed. ``highres_scale`` as for ``deepfashion_c2s``.
    """
    root = Path(root)
    box_scale = _box_scale(highres_scale)
    partition = root / "Eval" / "list_eval_partition.txt"
    images: dict[str, _Image] = {}
    for line, text in counted_rows(partition, first_column="image_name"):
        name, item_id, status = fields(partition, line, text, count=3)
        split = _status(partition, line, status, ("train", "query", "gallery"))
        _add_image(images, partition, line, name, _Image(item_id, "shop", split, line))

    bbox_file = root / "Anno" / "list_bbox_inshop.txt"
    if bbox_file.is_file():
        for line, text in counted_rows(bbox_file, first_column="image_name"):
            name, clothes_type, pose_type, *box = fields(bbox_file, line, text, count=7)
            image = images.get(name)
            if image is None:
                continue
            image.attributes["clothes_type"] = CLOTHES_TYPES[parse_int(bbox_file, line, clothes_type,
                                                                       "clothes_type", 1, 3)]
            image.attributes["pose"] = INSHOP_POSES[parse_int(bbox_file, line, pose_type, "pose_type", 1, 6)]
            image.bbox = parse_bbox(bbox_file, line, box, box_scale)

    _check_items(root / "Anno" / "list_item_inshop.txt", images, partition)
    item_attributes = _item_attributes(root / "Anno", _inshop_attribute_name, "utf-8")
    return _table(root, images, item_attributes, highres_scale, "deepfashion_inshop")


# ---- category and attribute prediction ----------------------------------------------------

@READERS.register("deepfashion_attributes")
def read_deepfashion_attributes(root: Path | str, annotation_dir: str = "Anno") -> SampleTable:
    """One row per image of ``Eval/list_eval_partition.txt`` (train/val/test).

    The item is the image's folder (``img/<product>/<file>``), the category comes from
    ``list_category_img.txt``; attributes are ``attributes`` (every positive attribute name) and
    one multi-label attribute per attribute type: texture, fabric, shape, part, style.
    ``annotation_dir``: ``Anno`` (original release) or ``Anno_coarse`` (the 2020 re-release).
    """
    root = Path(root)
    anno = root / annotation_dir
    partition = root / "Eval" / "list_eval_partition.txt"
    images: dict[str, _Image] = {}
    for line, text in counted_rows(partition, first_column="image_name"):
        name, status = fields(partition, line, text, count=2)
        split = _status(partition, line, status, ("train", "val", "test"))
        _, folder = image_folder_parts(name)
        _add_image(images, partition, line, name, _Image(folder or Path(name).stem, "unknown", split, line))

    categories = _category_names(anno)
    category_of: dict[str, str] = {}
    if categories is not None:
        category_file = require_file(anno / "list_category_img.txt", "needed with list_category_cloth.txt")
        for line, text in counted_rows(category_file, first_column="image_name"):
            name, label = fields(category_file, line, text, count=2)
            number = parse_int(category_file, line, label, "category_label", 1, len(categories))
            category_of[name] = categories[number - 1]

    bbox_file = anno / "list_bbox.txt"
    if bbox_file.is_file():
        for line, text in counted_rows(bbox_file, first_column="image_name"):
            name, *box = fields(bbox_file, line, text, count=5)
            if name in images:
                images[name].bbox = parse_bbox(bbox_file, line, box)

    multi_label: list[str] = []
    attribute_list = _attribute_names_and_types(anno)
    if attribute_list is not None:
        multi_label = ["attributes", *ATTRIBUTE_TYPES.values()]
        names = [name for name, _ in attribute_list]
        type_names = [ATTRIBUTE_TYPES[kind] for _, kind in attribute_list]
        labels_file = require_file(anno / "list_attr_img.txt", "needed with list_attr_cloth.txt")
        for line, name, positives in _positive_labels(labels_file, "image_name", len(names)):
            image = images.get(name)
            if image is None:
                continue
            grouped: dict[str, list[str]] = {kind: [] for kind in ATTRIBUTE_TYPES.values()}
            for index in positives:
                grouped[type_names[index]].append(names[index])
            image.attributes["attributes"] = _unique(names[i] for i in positives)
            image.attributes.update({kind: _unique(values) for kind, values in grouped.items()})

    samples = [Sample(path=name, item_id=image.item_id, domain=image.domain, split=image.split,
                      category=category_of.get(name), attributes=image.attributes, bbox=image.bbox)
               for name, image in images.items()]
    return SampleTable(samples, root=root, name="deepfashion_attributes", multi_label=multi_label)


def _category_names(anno: Path) -> list[str] | None:
    path = anno / "list_category_cloth.txt"
    if not path.is_file():
        return None
    names = []
    for line, text in counted_rows(path, first_column="category_name"):
        name, kind = fields(path, line, text, count=2)
        parse_int(path, line, kind, "category_type", 1, 3)
        names.append(name)
    return names


def _attribute_names_and_types(anno: Path) -> list[tuple[str, int]] | None:
    path = anno / "list_attr_cloth.txt"
    return read_attribute_list(path) if path.is_file() else None


def read_attribute_list(path: Path) -> list[tuple[str, int]]:
    """``list_attr_cloth.txt``: names may hold spaces (``"a-line dress"``), the type is last."""
    attributes = []
    for line, text in counted_rows(path, first_column="attribute_name"):
        columns = text.rsplit(None, 1)
        if len(columns) != 2:
            raise AnnotationError(path, line, "expected an attribute name and its type (1-5)")
        attributes.append((columns[0].strip(), parse_int(path, line, columns[1], "attribute_type", 1, 5)))
    return attributes


# ---- shared ------------------------------------------------------------------------------

def _box_scale(highres_scale: float | None) -> float:
    if highres_scale is None:
        return 1.0
    if not highres_scale > 0:
        raise ConfigError(f"highres_scale must be a positive factor, got {highres_scale!r}")
    return float(highres_scale)


def _status(path: Path, line: int, status: str, allowed: tuple[str, ...]) -> str:
    if status not in allowed:
        raise AnnotationError(path, line, f"evaluation_status must be one of {', '.join(allowed)}, got {status!r}")
    return status


def _add_image(images: dict[str, _Image], path: Path, line: int, name: str, image: _Image) -> None:
    """Record an image, or check that a repeated mention agrees with the first one."""
    first = images.get(name)
    if first is None:
        images[name] = image
        return
    for what in ("item_id", "domain", "split"):
        if getattr(first, what) != getattr(image, what):
            raise AnnotationError(path, line, f"{name} has {what} {getattr(image, what)!r} here but "
                                  f"{getattr(first, what)!r} on line {first.line}")


def _check_items(path: Path, images: dict[str, _Image], partition: Path) -> None:
    """The item list is optional; when present, every partition item must be in it."""
    if not path.is_file():
        return
    known = {fields(path, line, text, count=1)[0] for line, text in counted_rows(path, has_header=False)}
    for name, image in images.items():
        if image.item_id not in known:
            raise AnnotationError(partition, image.line, f"item {image.item_id} of {name} is not in {path}")


def _c2s_attribute_name(text: str) -> str:
    """``<Chinese name> <English name> <type>`` → the English name (which may hold spaces)."""
    tokens = text.split()
    while len(tokens) > 1 and not tokens[0].isascii():
        tokens.pop(0)
    if len(tokens) > 1:
        tokens.pop()
    return " ".join(tokens)


def _inshop_attribute_name(text: str) -> str:
    return text.strip()


def _item_attributes(anno: Path, name_of: Callable[[str], str], encoding: str) -> dict[str, tuple[str, ...]] | None:
    """Positive attribute names per item from ``list_attr_items.txt`` (None if absent)."""
    labels_file = anno / "list_attr_items.txt"
    if not labels_file.is_file():
        return None
    names_file = anno / "list_attr_cloth.txt"
    names: list[str] | None = None
    if names_file.is_file():
        names = [name_of(text) for _, text in counted_rows(names_file, encoding=encoding)]
    attributes = {}
    for _, item_id, positives in _positive_labels(labels_file, "item_id", len(names) if names else None):
        attributes[item_id] = _unique(names[i] if names else f"attr_{i + 1}" for i in positives)
    return attributes


def _positive_labels(path: Path, first_column: str, count: int | None) -> Iterator[tuple[int, str, list[int]]]:
    """``(line, name, indices of the 1 labels)`` of a ``<name> <label>*`` file (-1/0/1 labels)."""
    for line, text in counted_rows(path, first_column=first_column):
        name, *labels = text.split()
        if count is None:
            count = len(labels)
        if len(labels) != count:
            raise AnnotationError(path, line, f"expected {count} attribute labels after the name, got {len(labels)}")
        unexpected = set(labels) - ATTRIBUTE_LABELS
        if unexpected:
            raise AnnotationError(path, line, f"attribute labels must be 1, -1 or 0, got {sorted(unexpected)[0]!r}")
        yield line, name, [i for i, label in enumerate(labels) if label == "1"]


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def _table(root: Path, images: dict[str, _Image], item_attributes: dict[str, tuple[str, ...]] | None,
           highres_scale: float | None, name: str) -> SampleTable:
    samples = []
    for path, image in images.items():
        category, _ = image_folder_parts(path)
        attributes = dict(image.attributes)
        if item_attributes is not None and image.item_id in item_attributes:
            attributes["attributes"] = item_attributes[image.item_id]
        if highres_scale is not None and path.startswith(LOW_RES_FOLDER):
            path = HIGH_RES_FOLDER + path[len(LOW_RES_FOLDER):]
        samples.append(Sample(path=path, item_id=image.item_id, domain=image.domain, split=image.split,
                              category=category, attributes=attributes, bbox=image.bbox))
    multi_label = ["attributes"] if item_attributes is not None else []
    return SampleTable(samples, root=root, name=name, multi_label=multi_label)
