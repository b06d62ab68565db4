"""Reader for the FashionAI attribute dataset (Alibaba FashionAI Global Challenge 2018).

``Annotations/label.csv`` has no header; each line is ``<image path>,<attribute key>,<labels>``
where ``<labels>`` has one letter per value of that attribute: ``y`` the image has it, ``m``
maybe, ``n`` no. ASEN and M3-Net evaluate attribute-specific retrieval on it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ...registry import ConfigError
from ..table import AnnotationError, Sample, SampleTable
from . import READERS
from ._annotations import MissingAnnotationFile, fields, iter_lines, require_file
from .darn import AsenSchema, load_schema, read_asen_lists

# The challenge's value names, in label-string order (as ASEN's meta.json lists them; the
# misspelling "Sweat Heart Neck" is the official one).
FASHIONAI_VALUES: dict[str, tuple[str, ...]] = {
    "skirt_length": ("Invisible", "Short Length", "Knee Length", "Midi Length", "Ankle Length", "Floor Length"),
    "sleeve_length": ("Invisible", "Sleeveless", "Cup Sleeves", "Short Sleeves", "Elbow Sleeves", "3/4 Sleeves",
                      "Wrist Length", "Long Sleeves", "Extra Long Sleeves"),
    "coat_length": ("Invisible", "High Waist Length", "Regular Length", "Long Length", "Micro Length",
                    "Knee Length", "Midi Length", "Ankle&Floor Length"),
    "pant_length": ("Invisible", "Short Pant", "Mid Length", "3/4 Length", "Cropped Pant", "Full Length"),
    "collar_design": ("Invisible", "Shirt Collar", "Peter Pan", "Puritan Collar", "Rib Collar"),
    "lapel_design": ("Invisible", "Notched", "Collarless", "Shawl Collar", "Plus Size Shawl"),
    "neckline_design": ("Invisible", "Strapless Neck", "Deep V Neckline", "Straight Neck", "V Neck",
                        "Square Neckline", "Off Shoulder", "Round Neckline", "Sweat Heart Neck",
                        "OneShoulder Neckline"),
    "neck_design": ("Invisible", "Turtle Neck", "Ruffle Semi-High Collar", "Low Turtle Neck", "Draped Collar"),
}
KEY_SUFFIX = "_labels"  # label.csv keys are the attribute names plus this suffix
DEFAULT_LABEL_FILES = ("Annotations/label.csv", "base/Annotations/label.csv", "web/Annotations/label.csv")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test",
               "query": "query", "gallery": "gallery"}


@READERS.register("fashionai")
def read_fashionai(root: Path | str, label_files: list[str] | None = None, split_file: str | None = None,
                   split_dir: str | None = None, eval_split: str = "test", meta: str | None = None) -> SampleTable:
    """One row per image; attribute ``collar_design`` etc. (the key without ``_labels``).

    ``label_files`` (relative to root; default: whichever of ``Annotations/label.csv``,
    ``base/...`` and ``web/...`` exist): image paths are relative to each file's grandparent.
    Split: ``split_file`` lines ``<image path> <split>``; without it a fixed hash of the file
    name puts 10% in test, 10% in val, 80% in train. ``split_dir``: read ASEN's released split
    lists instead (they carry their own labels; see the ``darn`` reader), with ``eval_split`` and
    ``meta`` as there.
    """
    root = Path(root)
    if split_dir is not None:
        if label_files is not None or split_file is not None:
            raise ConfigError("split_dir reads ASEN's split lists, which carry their own labels: "
                              "drop label_files and split_file")
        default = AsenSchema.from_counts({name: len(values) for name, values in FASHIONAI_VALUES.items()},
                                         FASHIONAI_VALUES)
        schema = load_schema(root / split_dir, root / meta if meta else None, default)
        return read_asen_lists(root, split_dir, schema, eval_split=eval_split, domain="shop", name="fashionai")

    rows: dict[str, dict[str, str]] = {}
    first_line: dict[tuple[str, str], tuple[Path, int]] = {}
    for label_file in _label_files(root, label_files):
        prefix = label_file.parent.parent.relative_to(root).as_posix()
        for line, text in iter_lines(label_file):
            image, key, letters = (column.strip() for column in fields(label_file, line, text.replace(",", " "),
                                                                       count=3))
            attribute = _attribute(label_file, line, key)
            path = image if prefix == "." else f"{prefix}/{image}"
            value = FASHIONAI_VALUES[attribute][_value_index(label_file, line, attribute, letters)]
            attributes = rows.setdefault(path, {})
            if attribute in attributes and attributes[attribute] != value:
                where, at = first_line[(path, attribute)]
                raise AnnotationError(label_file, line, f"{image} has {attribute} {value!r} here but "
                                      f"{attributes[attribute]!r} in {where.name} line {at}")
            attributes[attribute] = value
            first_line.setdefault((path, attribute), (label_file, line))

    split_of = _split_file(root / split_file) if split_file is not None else None
    samples = []
    for path, attributes in rows.items():
        item_id = Path(path).stem
        split = split_of.get(path, "unknown") if split_of is not None else hash_split(item_id)
        samples.append(Sample(path=path, item_id=item_id, domain="shop", split=split, attributes=attributes))
    return SampleTable(samples, root=root, name="fashionai")


def hash_split(key: str) -> str:
    """A split that depends on the name only, so it never changes when files are added."""
    bucket = int(hashlib.md5(key.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def _label_files(root: Path, label_files: list[str] | None) -> list[Path]:
    if label_files is not None:
        return [require_file(root / name) for name in label_files]
    found = [root / name for name in DEFAULT_LABEL_FILES if (root / name).is_file()]
    if not found:
        raise MissingAnnotationFile(root / DEFAULT_LABEL_FILES[0], f"nor {' or '.join(DEFAULT_LABEL_FILES[1:])}; "
                                    "pass label_files to name others")
    return found


def _attribute(path: Path, line: int, key: str) -> str:
    attribute = key.removesuffix(KEY_SUFFIX)
    if not key.endswith(KEY_SUFFIX) or attribute not in FASHIONAI_VALUES:
        known = ", ".join(name + KEY_SUFFIX for name in FASHIONAI_VALUES)
        raise AnnotationError(path, line, f"unknown attribute key {key!r}; known: {known}")
    return attribute


def _value_index(path: Path, line: int, attribute: str, letters: str) -> int:
    expected = len(FASHIONAI_VALUES[attribute])
    if len(letters) != expected or set(letters) - set("ymn"):
        raise AnnotationError(path, line, f"{attribute} needs {expected} letters of y/m/n, got {letters!r}")
    if letters.count("y") != 1:
        raise AnnotationError(path, line, f"label string {letters!r} must mark exactly one value with 'y', "
                              f"it marks {letters.count('y')}")
    return letters.index("y")


def _split_file(path: Path) -> dict[str, str]:
    """``<image path> <split>`` per line (a comma may separate them too)."""
    splits: dict[str, str] = {}
    for line, text in iter_lines(path):
        image, split = fields(path, line, text.replace(",", " "), count=2)
        if split.lower() not in SPLIT_NAMES:
            raise AnnotationError(path, line, f"unknown split {split!r}; use one of {', '.join(SPLIT_NAMES)}")
        split = SPLIT_NAMES[split.lower()]
        if splits.setdefault(image, split) != split:
            raise AnnotationError(path, line, f"{image} is listed again with another split ({splits[image]} before)")
    return splits
