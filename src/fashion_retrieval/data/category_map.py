"""The category map: which clothing category (consumer photos, ``clothing/<category>/``) each
fashion-product ``articleType`` (shop photos) belongs to, for the cross-domain category table
(``clothing_to_shop`` reader) and its benchmark. ``category_map.csv`` beside this module is the
default; docs/benchmarks.md explains the choices."""
from __future__ import annotations

import csv
from pathlib import Path

from .table import AnnotationError

CATEGORY_MAP_PATH = Path(__file__).with_name("category_map.csv")


def load_category_map(path: str | Path = CATEGORY_MAP_PATH) -> dict[str, str]:
    """fashion-product articleType -> clothing category (``articleType,category`` CSV)."""
    path = Path(path)
    mapping: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        if next(reader, None) != ["articleType", "category"]:
            raise AnnotationError(path, 1, "header must be 'articleType,category'")
        for row in reader:
            if not row:
                continue
            if len(row) != 2 or not all(cell.strip() for cell in row):
                raise AnnotationError(path, reader.line_num, "expected two non-empty columns")
            article_type, category = (cell.strip() for cell in row)
            if article_type in mapping:
                raise AnnotationError(path, reader.line_num, f"articleType '{article_type}' is mapped twice")
            mapping[article_type] = category
    return mapping
