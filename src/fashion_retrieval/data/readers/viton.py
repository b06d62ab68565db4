"""``viton``: the shared data's person/product pairs: each pair is one garment seen twice, worn
(consumer side) and alone as the shop shows it (shop side)."""
from __future__ import annotations

from pathlib import Path

from ..table import AnnotationError, Sample, SampleTable
from . import READERS
from ._annotations import csv_rows, split_by_number


@READERS.register("viton")
def read_viton(root: Path, pairs: str = "pairs.csv") -> SampleTable:
    """``root/pairs.csv`` (``pair_id,person,product``): each pair is one item seen twice, worn by
    a person (consumer side) and alone as the shop shows it (shop side)."""
    root = Path(root)
    path = root / pairs
    header, rows = csv_rows(path, required=("pair_id", "person", "product"))
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
