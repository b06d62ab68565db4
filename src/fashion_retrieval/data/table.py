"""The one flat sample table every dataset reader produces.

One row per image: where it is, which product (item) it shows, which domain it comes from
(a consumer photo or a shop photo), its split, its category, its attributes and an optional
bounding box. Models, samplers, benchmarks and the index only ever see this table, never a
dataset's own files.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .. import atomic
from ..files import quote
from ..names import control_character, name_problem

DOMAINS = ("consumer", "shop", "unknown")
SPLITS = ("train", "val", "test", "query", "gallery", "unknown")

AttributeValue = str | tuple[str, ...]  # single label, or a tuple for multi-label attributes


def printable_path(path: str | Path) -> str:
    """``path`` as text that any terminal or UTF-8 file accepts: bytes of a name that is not
    UTF-8 (which Python keeps as lone surrogates) are shown as ``\\xe9`` escapes instead of
    making the print or the JSON write that reports the problem fail itself."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class AnnotationError(ValueError):
    """A malformed annotation file: the message names the file and the 1-based line."""

    def __init__(self, path: str | Path, line: int | None, problem: str):
        where = f"{printable_path(path)}:{line}" if line is not None else printable_path(path)
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


BBOX_CORNERS = ("x1", "y1", "x2", "y2")


def bbox_problem(box: Sequence[float]) -> str | None:
    """What is wrong with ``(x1, y1, x2, y2)`` as a box in pixels, or None. A NaN would crop to
    garbage (or crash the decoding worker) and an inverted box to nothing, so every reader
    refuses them where it reads them, naming the file and line."""
    if len(box) != 4:
        return f"needs 4 numbers x1 y1 x2 y2, got {len(box)}"
    for name, value in zip(BBOX_CORNERS, box):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{name} must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"{name} must be finite, got {value}"
    x1, y1, x2, y2 = box
    if x2 < x1 or y2 < y1:
        return f"bounding box {x1:g},{y1:g},{x2:g},{y2:g} has x2 < x1 or y2 < y1"
    return None


def parse_bbox_cell(cell: str, column: str = "bbox") -> tuple[float, float, float, float]:
    """A ``x1 y1 x2 y2`` cell of a CSV table, checked (see :func:`bbox_problem`)."""
    tokens = cell.split()
    if len(tokens) != 4:
        raise ValueError(f"{column} needs 4 numbers: x1 y1 x2 y2, got {len(tokens)} in {cell[:60]!r}")
    values = []
    for name, token in zip(BBOX_CORNERS, tokens):
        try:
            values.append(float(token))
        except ValueError:
            raise ValueError(f"{column} {name} must be a number, got {token[:40]!r}") from None
    problem = bbox_problem(values)
    if problem is not None:
        raise ValueError(f"{column} {problem}")
    return tuple(values)  # type: ignore[return-value]


@dataclass(frozen=True)
class Sample:
    path: str  # absolute, or relative to SampleTable.root
    item_id: str
    domain: str = "unknown"
    split: str = "unknown"
    category: str | None = None
    attributes: dict[str, AttributeValue] = field(default_factory=dict)
    bbox: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 in pixels of the file

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {self.domain!r} for {self.path}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r} for {self.path}")
        problem = bbox_problem(self.bbox) if self.bbox is not None else None
        if problem is not None:
            raise ValueError(f"bbox {problem} for {self.path}")


class SampleTable:
    """An ordered list of samples plus the facts a model needs about the label spaces."""

    def __init__(
        self,
        samples: Iterable[Sample],
        root: str | Path = ".",
        name: str = "table",
        multi_label: Sequence[str] = (),
    ):
        self.samples: list[Sample] = list(samples)
        self.root = Path(root)
        self.name = name
        self.multi_label = tuple(multi_label)  # attributes whose values are tuples of labels

    # ---- access -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def resolve(self, sample: Sample) -> Path:
        path = Path(sample.path)
        return path if path.is_absolute() else self.root / path

    def paths(self) -> list[Path]:
        return [self.resolve(s) for s in self.samples]

    def _derive(self, samples: Iterable[Sample], suffix: str = "") -> "SampleTable":
        return SampleTable(samples, self.root, self.name + suffix, self.multi_label)

    def filter(self, split: str | Sequence[str] | None = None, domain: str | Sequence[str] | None = None,
               predicate=None) -> "SampleTable":
        splits = {split} if isinstance(split, str) else set(split) if split else None
        domains = {domain} if isinstance(domain, str) else set(domain) if domain else None
        kept = [
            s for s in self.samples
            if (splits is None or s.split in splits)
            and (domains is None or s.domain in domains)
            and (predicate is None or predicate(s))
        ]
        return self._derive(kept)

    def with_split(self, assign) -> "SampleTable":
        """A copy whose split is ``assign(sample)`` for every row."""
        return self._derive(replace(s, split=assign(s)) for s in self.samples)

    def concat(self, other: "SampleTable") -> "SampleTable":
        if other.root != self.root:
            other = SampleTable([replace(s, path=str(other.resolve(s))) for s in other], self.root,
                                other.name, other.multi_label)
        return SampleTable(self.samples + other.samples, self.root, f"{self.name}+{other.name}",
                           tuple(dict.fromkeys(self.multi_label + other.multi_label)))

    # ---- label spaces -----------------------------------------------------------------
    def item_ids(self) -> list[str]:
        return sorted({s.item_id for s in self.samples})

    def categories(self) -> list[str]:
        return sorted({s.category for s in self.samples if s.category is not None})

    def attribute_names(self) -> list[str]:
        names: dict[str, None] = {}
        for s in self.samples:
            names.update(dict.fromkeys(s.attributes))
        return list(names)

    def attribute_values(self, name: str) -> list[str]:
        values: set[str] = set()
        for s in self.samples:
            value = s.attributes.get(name)
            if value is None or value == "":
                continue
            values.update(value if isinstance(value, tuple) else (value,))
        return sorted(values)

    def counts(self, column: str) -> Counter:
        return Counter(getattr(s, column) for s in self.samples)

    # ---- persistence: a plain CSV that is also the "own catalog" input format ---------
    COLUMNS = ("path", "item_id", "domain", "split", "category", "attributes", "bbox")

    def to_csv(self, path: str | Path) -> None:
        with atomic.replacing(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(self.COLUMNS)
            for s in self.samples:
                attrs = {k: list(v) if isinstance(v, tuple) else v for k, v in s.attributes.items()}
                writer.writerow([
                    s.path, s.item_id, s.domain, s.split, s.category or "",
                    json.dumps(attrs, ensure_ascii=False) if attrs else "",
                    " ".join(f"{v:g}" for v in s.bbox) if s.bbox else "",
                ])

    @classmethod
    def from_csv(cls, path: str | Path, root: str | Path | None = None, name: str | None = None) -> "SampleTable":
        """Read a table written by :meth:`to_csv` (only ``path`` and ``item_id`` are required).

        One row per image: a path listed twice is an error, as is any row that cannot become a
        sample; every error names the file and the line.
        """
        path = Path(path)
        samples = []
        multi: set[str] = set()
        first_line: dict[str, int] = {}
        reader = csv.DictReader(io.StringIO(read_utf8_text(path), newline=""))
        try:
            if reader.fieldnames is None or not {"path", "item_id"} <= set(reader.fieldnames):
                raise AnnotationError(path, 1, f"header must contain 'path' and 'item_id', got {reader.fieldnames}")
            for row in reader:
                line = reader.line_num
                if None in row or any(v is None for v in row.values()):
                    raise AnnotationError(path, line, "wrong number of columns")
                image, item_id = row["path"], row["item_id"]
                if not image.strip() or not item_id.strip():
                    raise AnnotationError(path, line, f"empty {'path' if not image.strip() else 'item_id'}")
                for column in ("item_id", "category"):  # printed by `search`, shown by the page
                    bad = control_character(row.get(column) or "")
                    if bad is not None:
                        raise AnnotationError(path, line, f"{column} {quote(row[column], 80)} contains a control "
                                                          f"character ({bad!r})")
                if image in first_line:
                    raise AnnotationError(path, line, f"{image} is listed again (first on line {first_line[image]}); "
                                          "the table has one row per image")
                first_line[image] = line
                try:
                    attrs = _attributes(row.get("attributes"))
                    multi.update(k for k, v in attrs.items() if isinstance(v, tuple))
                    bbox = parse_bbox_cell(row["bbox"]) if (row.get("bbox") or "").strip() else None
                    samples.append(Sample(
                        path=image, item_id=item_id,
                        domain=row.get("domain") or "unknown", split=row.get("split") or "unknown",
                        category=row.get("category") or None, attributes=attrs, bbox=bbox,
                    ))
                except (ValueError, TypeError) as exc:
                    raise AnnotationError(path, line, str(exc)) from None
        except csv.Error as exc:
            raise AnnotationError(path, reader.line_num, str(exc)) from None
        return cls(samples, root if root is not None else path.parent, name or path.stem, sorted(multi))


def _attributes(cell: str | None) -> dict[str, AttributeValue]:
    """The ``attributes`` cell: a JSON object of names to a value or a list of values.

    ``null`` means unlabelled (the attribute is left out), as an empty cell does in the other
    formats; numbers become their text. Nested objects have no label meaning and are refused.
    """
    if not cell:
        return {}
    try:
        parsed = json.loads(cell)
    except json.JSONDecodeError as exc:
        raise ValueError(f"attributes is not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError("attributes is not valid JSON (nested too deeply)") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"attributes must be a JSON object like {{\"colour\": \"red\"}}, got {cell[:60]}")
    attributes: dict[str, AttributeValue] = {}
    for name, value in parsed.items():
        # attribute names become a model's attributes and an index's space folders
        # (names.path_component); what no name may be is refused here, with its line
        problem = name_problem(name)
        if problem is not None:
            raise ValueError(f"attribute name {quote(name, 80)} {problem}")
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, (dict, list)) for v in values):
            raise ValueError(f"attribute '{name}' must be a value or a list of values, got {json.dumps(value)[:60]}")
        if value is None:
            continue
        bad = next((c for c in (control_character(str(v)) for v in values if v is not None) if c), None)
        if bad is not None:
            raise ValueError(f"attribute '{name}' has a value with a control character ({bad!r})")
        attributes[name] = tuple(str(v) for v in value if v is not None) if isinstance(value, list) else str(value)
    return attributes


def read_utf8_text(path: Path) -> str:
    """A whole annotation file as text (a byte-order mark is dropped); bytes that are not UTF-8
    raise an AnnotationError naming the line they are on."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise AnnotationError(path, line, f"not UTF-8 text ({exc.reason}); re-save the file as UTF-8") from None
