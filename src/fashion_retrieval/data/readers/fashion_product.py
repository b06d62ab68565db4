"""``fashion_product``: the shared data's shop photos with their attributes (gender, articleType,
colour, season, usage, ...), split by the shared data's convention (``split_by_number``)."""
from __future__ import annotations

from pathlib import Path

from ..table import AnnotationError, Sample, SampleTable
from . import READERS
from ._annotations import csv_rows, split_by_number

FASHION_PRODUCT_ATTRIBUTES = ("gender", "masterCategory", "subCategory", "articleType", "baseColour",
                              "season", "usage")


@READERS.register("fashion_product")
def read_fashion_product(root: Path, styles: str = "styles.csv", images: str = "images") -> SampleTable:
    """``root/styles.csv`` (``id,gender,...,year,usage``) and ``root/images/<id>.jpg``.

    ``articleType`` is both the category and an attribute; ``year`` is not an attribute (it is
    when the product was listed, not what it looks like). Empty cells leave the attribute absent.
    """
    root = Path(root)
    path = root / styles
    header, rows = csv_rows(path, required=("id", *FASHION_PRODUCT_ATTRIBUTES))
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
