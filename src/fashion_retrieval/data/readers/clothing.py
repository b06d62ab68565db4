"""``clothing``: the shared data's consumer photos in category folders, and ``clothing_to_shop``,
which joins them with the fashion-product shop photos into one cross-domain category table
(through the category map, ``data/category_map.py``)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..category_map import CATEGORY_MAP_PATH, load_category_map
from ..table import AnnotationError, Sample, SampleTable
from . import READERS
from .catalog import SPLIT_FOLDERS, check_unique_items, class_folder_samples, visible_subfolders
from .fashion_product import read_fashion_product


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
