"""Readers for the three public datasets of the shared data folder.

``fashion_product`` (shop photos with attributes), ``clothing`` (consumer photos in category
folders) and ``viton`` (person/product pairs of the same garment). Their splits follow the
shared data's conventions so that numbers are comparable between runs and projects.
``clothing_to_shop`` joins the first two into one cross-domain category table.
"""
from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from ..table import AnnotationError, Sample, SampleTable, read_utf8_text
from . import READERS
from .catalog import SPLIT_FOLDERS, check_unique_items, class_folder_samples, visible_subfolders

FASHION_PRODUCT_ATTRIBUTES = ("gender", "masterCategory", "subCategory", "articleType", "baseColour",
                              "season", "usage")


def split_by_number(number: int) -> str:
    """The shared convention: last digit 0 or 5 is test, 9 is validation, the rest train."""
    last_digit = number % 10
    if last_digit in (0, 5):
        return "test"
    return "val" if last_digit == 9 else "train"


@READERS.register("fashion_product")
def read_fashion_product(root: Path, styles: str = "styles.csv", images: str = "images") -> SampleTable:
    """``root/styles.csv`` (``id,gender,...,year,usage``) and ``root/images/<id>.jpg``.

    ``articleType`` is both the category and an attribute; ``year`` is not an attribute (it is
    when the product was listed, not what it looks like). Empty cells leave the attribute absent.
    """
    root = Path(root)
    path = root / styles
    header, rows = _csv_rows(path, required=("id", *FASHION_PRODUCT_ATTRIBUTES))
    column = {name: header.index(name) for name in header}
    first_line: dict[int, int] = {}
    samples = []
    for line, row in rows:
        raw_id = row[column["id"]].strip()
        if not raw_id.isdigit():
            raise AnnotationError(path, line, f"id {raw_id!r} is not a non-negative integer")
        number = int(raw_id)
        if number in first_line:
            raise AnnotationError(path, line, f"duplicate id {number} (first on line {first_line[number]})")
        first_line[number] = line
        attributes = {name: row[column[name]].strip() for name in FASHION_PRODUCT_ATTRIBUTES
                      if row[column[name]].strip()}
        samples.append(Sample(path=f"{images}/{number}.jpg", item_id=str(number), domain="shop",
                              split=split_by_number(number), category=attributes.get("articleType"),
                              attributes=attributes))
    return SampleTable(samples, root=root, name="fashion_product")


@READERS.register("clothing")
def read_clothing(root: Path) -> SampleTable:
    """``root/{train,validation}/<category>/<uuid>.jpg``: consumer photos, each its own item."""
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(root, None, "not a folder")
    split_folders = [f for f in visible_subfolders(root) if f.name.lower() in SPLIT_FOLDERS]
    if not split_folders:
        raise AnnotationError(root, None, "expected train/ and validation/ folders of category folders")
    samples: list[Sample] = []
    for folder in split_folders:
        samples += class_folder_samples(root, folder, split=SPLIT_FOLDERS[folder.name.lower()], domain="consumer")
    check_unique_items(samples, root)
    return SampleTable(samples, root=root, name="clothing")


@READERS.register("clothing_to_shop")
def read_clothing_to_shop(root: Path, clothing: str = "clothing", shop: str = "fashion-product",
                          category_map: str | None = None) -> SampleTable:
    """Both sides of the cross-domain category benchmark, for training on both domains.

    ``root`` is the data root: the consumer photos of ``root/clothing`` (category = folder) and the
    shop photos of ``root/fashion-product`` whose articleType the category map (``category_map.csv``
    by default, see docs/benchmarks.md) sends to a clothing category, with that category as theirs.
    Splits are each dataset's own, so training on ``train`` never sees a benchmark query (clothing
    validation) or gallery image (fashion-product test). Paths are relative to ``root``.
    Every row also carries its category as the attribute ``category``, so that attribute models
    (the classifier baseline) can learn it from both domains.
    """
    from ..benchmarks import CATEGORY_MAP_PATH, load_category_map

    root = Path(root)
    category_of = load_category_map(category_map or CATEGORY_MAP_PATH)
    consumer = read_clothing(root / clothing)
    samples = [replace(s, path=f"{clothing}/{s.path}", attributes={"category": s.category}) for s in consumer
               if s.category is not None]
    for s in read_fashion_product(root / shop):
        category = category_of.get(str(s.attributes.get("articleType")))
        if category is not None:
            samples.append(replace(s, path=f"{shop}/{s.path}", item_id=f"{shop}/{s.item_id}", category=category,
                                   attributes={**s.attributes, "category": category}))
    return SampleTable(samples, root=root, name="clothing_to_shop")


@READERS.register("viton")
def read_viton(root: Path, pairs: str = "pairs.csv") -> SampleTable:
    """``root/pairs.csv`` (``pair_id,person,product``): each pair is one item seen twice, worn by
    a person (consumer side) and alone as the shop shows it (shop side)."""
    root = Path(root)
    path = root / pairs
    header, rows = _csv_rows(path, required=("pair_id", "person", "product"))
    column = {name: header.index(name) for name in header}
    first_line: dict[str, int] = {}
    samples = []
    for line, row in rows:
        pair_id = row[column["pair_id"]].strip()
        if not pair_id.isdigit():
            raise AnnotationError(path, line, f"pair_id {pair_id!r} is not a non-negative integer")
        if pair_id in first_line:
            raise AnnotationError(path, line, f"duplicate pair_id {pair_id} (first on line {first_line[pair_id]})")
        first_line[pair_id] = line
        split = split_by_number(int(pair_id))
        for side, domain in (("person", "consumer"), ("product", "shop")):
            image = row[column[side]].strip()
            if not image:
                raise AnnotationError(path, line, f"empty {side} path")
            samples.append(Sample(path=image, item_id=pair_id, domain=domain, split=split))
    return SampleTable(samples, root=root, name="viton")


def _csv_rows(path: Path, required: tuple[str, ...]) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Header and ``(line, row)`` pairs of a CSV whose rows must all have the header's width."""
    if not path.is_file():
        raise AnnotationError(path, None, "file not found")
    reader = csv.reader(io.StringIO(read_utf8_text(path), newline=""))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise AnnotationError(path, 1, "empty file: expected a header line") from None
    except csv.Error as exc:
        raise AnnotationError(path, 1, str(exc)) from None
    missing = [name for name in required if name not in header]
    if missing:
        raise AnnotationError(path, 1, f"header lacks column(s) {', '.join(missing)}; got {','.join(header)}")

    def rows() -> Iterator[tuple[int, list[str]]]:
        try:
            for row in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise AnnotationError(path, line, f"expected {len(header)} columns, got {len(row)}")
                yield line, row
        except csv.Error as exc:
            raise AnnotationError(path, reader.line_num, str(exc)) from None

    return header, rows()
