"""Readers for your own catalog: a CSV sample table, or image folders named by class.

``csv`` reads the table format of :meth:`SampleTable.to_csv`, one row per image:

========== ======== ===============================================================
column     required meaning
========== ======== ===============================================================
path       yes      image file, relative to the CSV's folder (or absolute)
item_id    yes      product id: images with the same id show the same product
domain     no       ``consumer`` (a customer's photo), ``shop`` or ``unknown``
split      no       ``train``, ``val``, ``test``, ``query``, ``gallery`` or ``unknown``
category   no       category name
attributes no       JSON object ``{"colour": "red", "style": ["casual", "sport"]}``;
                    a list value makes that attribute multi-label, ``null`` leaves
                    it unlabelled
bbox       no       ``x1 y1 x2 y2`` in pixels of the file
========== ======== ===============================================================

A path listed twice, an empty path or item id, a value outside those lists and text that is
not UTF-8 stop the reader with the file and line; image files are only opened later, where an
unreadable one is skipped and reported.

``folder`` reads ``<root>/<class>/<image>`` or ``<root>/<split>/<class>/<image>``; names that
are not UTF-8 are refused by name (they would become ids and index metadata).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..table import AnnotationError, Sample, SampleTable
from . import READERS

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test",
                 "query": "query", "gallery": "gallery"}


@READERS.register("csv")
def read_csv(root: Path, file: str = "catalog.csv") -> SampleTable:
    """``root/file`` (``file`` may also be absolute); image paths are relative to ``root``."""
    root = Path(root)
    path = Path(file) if Path(file).is_absolute() else root / file
    if not path.is_file():
        raise AnnotationError(path, None, "catalog file not found")
    return SampleTable.from_csv(path, root=root, name=path.stem)


@READERS.register("folder")
def read_folder(root: Path, domain: str = "shop", item_from: Literal["file", "folder"] = "file") -> SampleTable:
    """A folder per class, optionally inside split folders (train/, val/ or validation/, test/...).

    ``item_from="file"``: every image is its own item (its file stem is the item id);
    ``item_from="folder"``: a folder per product, all its images share the folder's name as id.
    """
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(root, None, "not a folder")
    if item_from not in ("file", "folder"):
        raise ValueError(f"item_from must be 'file' or 'folder', got {item_from!r}")
    folders = visible_subfolders(root)
    if folders and all(f.name.lower() in SPLIT_FOLDERS for f in folders):
        parts = [(folder, SPLIT_FOLDERS[folder.name.lower()]) for folder in folders]
    else:
        parts = [(root, "unknown")]
    samples: list[Sample] = []
    for folder, split in parts:
        samples += class_folder_samples(root, folder, split=split, domain=domain, item_from=item_from)
    if not samples:
        raise AnnotationError(root, None, "no image files found (expected <class>/<image> or <split>/<class>/<image>)")
    if item_from == "file":
        check_unique_items(samples, root)
    return SampleTable(samples, root=root, name=root.name)


def visible_subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    for path in files:
        require_utf8_path(path)
    return files


def require_utf8_path(path: Path) -> None:
    """File and folder names become item ids, categories and index metadata, all UTF-8 text: a
    name in another encoding (Python keeps its bytes as lone surrogates) is refused here, by name,
    instead of failing when the index or a JSON answer is written."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise AnnotationError(path, None, "file name is not UTF-8; rename it (e.g. convmv -f latin1 -t utf8)") from None


def class_folder_samples(root: Path, folder: Path, split: str, domain: str,
                         item_from: str = "file") -> list[Sample]:
    """Images in ``folder/<class>/``; loose images in ``folder`` itself get no category."""
    samples = []
    for class_folder in [folder, *visible_subfolders(folder)]:
        category = None if class_folder == folder else class_folder.name
        for image in image_files(class_folder):
            item = image.stem if item_from == "file" else (category or image.stem)
            samples.append(Sample(path=image.relative_to(root).as_posix(), item_id=item, domain=domain,
                                  split=split, category=category))
    return samples


def check_unique_items(samples: list[Sample], root: Path) -> None:
    """One image per item: two files with the same stem would silently become one product."""
    first: dict[str, str] = {}
    for sample in samples:
        if sample.item_id in first:
            raise AnnotationError(root / sample.path, None,
                                  f"file name '{sample.item_id}' is also used by {first[sample.item_id]}; "
                                  "image names must be unique because each image is its own item")
        first[sample.item_id] = sample.path
