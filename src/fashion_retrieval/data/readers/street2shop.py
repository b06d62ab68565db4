"""Reader for Street2Shop (Kiapour et al., ICCV 2015) from its ``meta/json`` files.

The release lists photo ids and URLs, not images: users download the photos themselves, so
where a photo lies is a pattern (``images/{photo}.jpg`` by default). Each street photo can show
several products; every (street photo, product) pair is its own row with its own box, because
the benchmark asks one query per pair.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ...registry import ConfigError
from ..table import AnnotationError, Sample, SampleTable
from . import READERS
from ._annotations import MissingAnnotationFile, checked_bbox, parse_number, read_json

PAIR_SPLITS = ("train", "test")


@READERS.register("street2shop")
def read_street2shop(root: Path | str, image_pattern: str = "images/{photo}.jpg",
                     categories: Sequence[str] | None = None) -> SampleTable:
    """Street photos of ``{train,test}_pairs_<category>.json`` (consumer, with box) and shop
    photos of ``retrieval_<category>.json`` (shop).

    A shop photo's split is ``test`` when its product is in a test pair or in no pair at all
    (the official gallery is every shop photo of the category), else ``train``. ``categories``
    restricts the categories read (default: every ``retrieval_*.json`` found).
    """
    root = Path(root)
    meta = root / "meta" / "json"
    _check_pattern(image_pattern)
    categories = list(categories) if categories is not None else _found_categories(meta)

    samples: list[Sample] = []
    for category in categories:
        test_products: set[int] = set()
        paired_products: set[int] = set()
        for split in PAIR_SPLITS:
            path = meta / f"{split}_pairs_{category}.json"
            for index, entry in enumerate(_entries(path), start=1):
                photo, product = _ids(path, index, entry)
                paired_products.add(product)
                if split == "test":
                    test_products.add(product)
                samples.append(Sample(path=image_pattern.format(photo=photo), item_id=str(product),
                                      domain="consumer", split=split, category=category,
                                      bbox=_bbox(path, index, entry)))
        retrieval = meta / f"retrieval_{category}.json"
        for index, entry in enumerate(_entries(retrieval), start=1):
            photo, product = _ids(retrieval, index, entry)
            split = "test" if product in test_products or product not in paired_products else "train"
            samples.append(Sample(path=image_pattern.format(photo=photo), item_id=str(product), domain="shop",
                                  split=split, category=category))
    return SampleTable(_without_repeats(samples), root=root, name="street2shop")


def _check_pattern(pattern: str) -> None:
    try:
        pattern.format(photo=1)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"image_pattern {pattern!r} must contain {{photo}} and nothing else in braces ({exc})") \
            from None
    if "{photo" not in pattern:
        raise ConfigError(f"image_pattern {pattern!r} must contain {{photo}}")


def _found_categories(meta: Path) -> list[str]:
    categories = sorted(p.name[len("retrieval_"):-len(".json")] for p in meta.glob("retrieval_*.json"))
    if not categories:
        raise MissingAnnotationFile(meta / "retrieval_<category>.json",
                                    "expected the Street2Shop meta/json folder under the dataset root")
    return categories


def _entries(path: Path) -> list[Any]:
    data = read_json(path)
    if not isinstance(data, list):
        raise AnnotationError(path, None, f"expected a JSON list of entries, got {type(data).__name__}")
    return data


def _ids(path: Path, index: int, entry: Any) -> tuple[int, int]:
    if not isinstance(entry, dict):
        raise AnnotationError(path, None, f"entry {index}: expected an object, got {type(entry).__name__}")
    ids = []
    for key in ("photo", "product"):
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
            raise AnnotationError(path, None, f"entry {index}: '{key}' must be a non-negative integer id, got {value!r}")
        ids.append(int(value))
    return ids[0], ids[1]


def _bbox(path: Path, index: int, entry: dict) -> tuple[float, float, float, float]:
    """``{"left", "top", "width", "height"}`` → ``(x1, y1, x2, y2)``."""
    box = entry.get("bbox")
    if not isinstance(box, dict):
        raise AnnotationError(path, None, f"entry {index}: expected a 'bbox' object, got {box!r}")
    where = f"entry {index}: "
    left, top, width, height = (parse_number(path, None, box.get(key), f"{where}bbox {key}")
                                for key in ("left", "top", "width", "height"))
    return checked_bbox(path, None, (left, top, left + width, top + height), where)


def _without_repeats(samples: list[Sample]) -> list[Sample]:
    """Drop verbatim repeats of an entry, which would otherwise count twice in evaluation."""
    seen: set[tuple] = set()
    kept = []
    for sample in samples:
        key = (sample.path, sample.item_id, sample.domain, sample.split, sample.category, sample.bbox)
        if key not in seen:
            seen.add(key)
            kept.append(sample)
    return kept
