"""Integer ids for items, categories and attribute values, fixed once per training table.

The label space is saved with every checkpoint, so a model's output units keep their meaning
when it is evaluated or served on other data. Attribute values are sorted, so the same table
always yields the same ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .table import Sample, SampleTable

FORMAT_VERSION = 1


@dataclass
class LabelSpace:
    items: list[str]
    categories: list[str]
    attributes: dict[str, list[str]]  # attribute name -> sorted value vocabulary
    multi_label: tuple[str, ...] = ()

    _item_ids: dict[str, int] = field(init=False, repr=False, compare=False)
    _category_ids: dict[str, int] = field(init=False, repr=False, compare=False)
    _value_ids: dict[str, dict[str, int]] = field(init=False, repr=False, compare=False)
    _offsets: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.multi_label = tuple(self.multi_label)
        unknown = [name for name in self.multi_label if name not in self.attributes]
        if unknown:
            raise ValueError(f"multi-label attributes {unknown} are not among the attributes")
        self._item_ids = _index(self.items, "item")
        self._category_ids = _index(self.categories, "category")
        self._value_ids = {name: _index(values, f"value of '{name}'") for name, values in self.attributes.items()}
        self._offsets = []
        total = 0
        for size in self.attribute_sizes:
            self._offsets.append(total)
            total += size

    @classmethod
    def from_table(cls, table: SampleTable) -> "LabelSpace":
        """Attributes keep the table's first-seen order; values within each are sorted."""
        names = table.attribute_names()
        return cls(
            items=table.item_ids(),
            categories=table.categories(),
            attributes={name: table.attribute_values(name) for name in names},
            multi_label=tuple(name for name in table.multi_label if name in names),
        )

    # ---- persistence ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "items": list(self.items),
            "categories": list(self.categories),
            "attributes": {name: list(values) for name, values in self.attributes.items()},
            "multi_label": list(self.multi_label),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LabelSpace":
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"label space format version {version} is not supported (expected {FORMAT_VERSION})")
        missing = [key for key in ("items", "categories", "attributes") if key not in data]
        if missing:
            raise ValueError(f"label space is missing {', '.join(missing)}")
        return cls(
            items=[str(x) for x in data["items"]],
            categories=[str(x) for x in data["categories"]],
            attributes={str(k): [str(v) for v in values] for k, values in data["attributes"].items()},
            multi_label=tuple(data.get("multi_label", ())),
        )

    # ---- sizes ------------------------------------------------------------------------
    @property
    def attribute_names(self) -> list[str]:
        return list(self.attributes)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_categories(self) -> int:
        return len(self.categories)

    def num_values(self, name: str) -> int:
        return len(self._vocabulary(name))

    @property
    def attribute_sizes(self) -> list[int]:
        return [len(values) for values in self.attributes.values()]

    @property
    def total_attribute_values(self) -> int:
        return sum(self.attribute_sizes)

    @property
    def attribute_offsets(self) -> list[int]:
        """Where each attribute's values start in the flat multi-hot vector."""
        return list(self._offsets)

    def attribute_index(self, name: str) -> int:
        self._vocabulary(name)
        return self.attribute_names.index(name)

    def _vocabulary(self, name: str) -> list[str]:
        if name not in self.attributes:
            raise KeyError(f"unknown attribute '{name}'; known: {', '.join(self.attributes) or 'none'}")
        return self.attributes[name]

    # ---- encoding ---------------------------------------------------------------------
    def item_id(self, item: str) -> int:
        return self._item_ids.get(item, -1)

    def category_id(self, category: str | None) -> int:
        return -1 if category is None else self._category_ids.get(category, -1)

    def value_ids(self, name: str, value: str | tuple[str, ...] | None) -> list[int]:
        """Ids of the known values among ``value`` (several for a multi-label attribute)."""
        if value is None or value == "":
            return []
        ids = self._value_ids[name]
        values: Iterable[str] = value if isinstance(value, tuple) else (value,)
        return sorted({ids[v] for v in values if v in ids})

    def encode(self, sample: Sample) -> dict[str, Any]:
        """Labels of one row. ``attrs[a]`` is the value id of attribute ``a`` (-1 = missing or
        unseen); for a multi-label attribute it is its lowest positive id, and
        ``attr_multi_hot`` holds all of them."""
        attrs = torch.full((len(self.attributes),), -1, dtype=torch.long)
        multi_hot = torch.zeros(self.total_attribute_values, dtype=torch.float32)
        for a, name in enumerate(self.attributes):
            ids = self.value_ids(name, sample.attributes.get(name))
            if ids:
                attrs[a] = ids[0]
                multi_hot[[self._offsets[a] + i for i in ids]] = 1.0
        return {
            "item": self.item_id(sample.item_id),
            "category": self.category_id(sample.category),
            "attrs": attrs,
            "attr_multi_hot": multi_hot,
        }

    @property
    def max_values(self) -> int:
        """Values of the largest attribute: the width of a per-attribute value vector."""
        return max(self.attribute_sizes, default=0)

    def attribute_multi_hot(self, multi_hot: torch.Tensor, attribute: int) -> torch.Tensor:
        """The values of ``attribute`` (an index) taken from the flat ``attr_multi_hot`` of one
        row, padded with zeros to :attr:`max_values`: all the values the image has for that
        attribute (several for a multi-label one), as attribute-conditioned losses compare them."""
        start, size = self._offsets[attribute], self.attribute_sizes[attribute]
        out = torch.zeros(self.max_values, dtype=multi_hot.dtype)
        out[:size] = multi_hot[start:start + size]
        return out

    def value_id_sets(self, table: SampleTable, name: str) -> list[tuple[int, ...]]:
        """Every row's known value ids of attribute ``name`` (empty: missing), for samplers that
        group the images of a multi-label attribute by each of their values."""
        return [tuple(self.value_ids(name, sample.attributes.get(name))) for sample in table]

    def value_counts(self, table: SampleTable) -> list[int]:
        """Images of ``table`` that are positive for each entry of the flat multi-hot vector
        (``attr_multi_hot``'s layout), for frequency-based positive weights."""
        counts = [0] * self.total_attribute_values
        for sample in table:
            for a, name in enumerate(self.attributes):
                for i in self.value_ids(name, sample.attributes.get(name)):
                    counts[self._offsets[a] + i] += 1
        return counts

    def encode_table(self, table: SampleTable) -> dict[str, torch.Tensor]:
        """Whole-table labels without images, for samplers and benchmarks:
        ``item`` [N], ``category`` [N] and ``attrs`` [N, A] (-1 = missing)."""
        names = self.attribute_names
        attrs = torch.full((len(table), len(names)), -1, dtype=torch.long)
        for row, sample in enumerate(table):
            for a, name in enumerate(names):
                ids = self.value_ids(name, sample.attributes.get(name))
                if ids:
                    attrs[row, a] = ids[0]
        return {
            "item": torch.tensor([self.item_id(s.item_id) for s in table], dtype=torch.long),
            "category": torch.tensor([self.category_id(s.category) for s in table], dtype=torch.long),
            "attrs": attrs,
        }


def _index(names: list[str], what: str) -> dict[str, int]:
    ids: dict[str, int] = {}
    for position, name in enumerate(names):
        if name in ids:
            raise ValueError(f"duplicate {what} '{name}' in the label space")
        ids[name] = position
    return ids
