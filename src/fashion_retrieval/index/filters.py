"""Search filters: restrict a search by photo to the catalog items whose metadata match.

A filter is a conjunction over metadata fields, each with a set of accepted values (an item
matches a field when any of its values is accepted), plus an optional list of allowed ids::

    SearchFilter.build({"category": "Shirts", "gender": ["Men", "Unisex"]}, ids=["15970", "21379"])

Field names are those of an index's item metadata (``index/build.py``): the top-level
``category``, ``domain`` and ``item_id``, and every attribute recorded for the catalog's items
(``gender``, ``baseColour`` …), which ``attributes.NAME`` also names (for an attribute that
shares its name with a top-level field). An allowed id matches an item whose id or ``item_id``
equals it. Values compare as exact strings; a multi-valued attribute (a list) matches when any
of its values is accepted.

The stores apply a filter exactly: FAISS through an id selector (``faiss.IDSelectorBatch``)
over the ids an inverted index of the metadata gives, Milvus through a filter expression.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from ..files import quote

TOP_LEVEL_FIELDS = ("category", "domain", "item_id")
ATTRIBUTE_PREFIX = "attributes."
MAX_FILTER_VALUES = 100_000  # values (or ids) one filter may list: more is not a filter anyone types


class FilterError(ValueError):
    """A filter naming a field the index does not have, or malformed; the message names it,
    and ``field`` holds the field's name where there is one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def field_key(name: str) -> str:
    """The canonical key of a field name: ``category`` stays, ``gender`` → ``attributes.gender``."""
    if not isinstance(name, str) or not name.strip():
        raise FilterError(f"filter field {quote(name, 80)} is empty")
    if name in TOP_LEVEL_FIELDS or name.startswith(ATTRIBUTE_PREFIX):
        if name == ATTRIBUTE_PREFIX:
            raise FilterError(f"filter field {quote(name, 80)} names no attribute")
        return name
    return ATTRIBUTE_PREFIX + name


def field_name(key: str) -> str:
    """What a user types for the canonical ``key`` (the attribute's own name where it is free)."""
    if key.startswith(ATTRIBUTE_PREFIX) and key[len(ATTRIBUTE_PREFIX):] not in TOP_LEVEL_FIELDS:
        return key[len(ATTRIBUTE_PREFIX):]
    return key


def field_values(meta: Mapping[str, Any], key: str) -> list[str]:
    """The values an item's metadata holds for the canonical ``key`` (none, one or several)."""
    if key.startswith(ATTRIBUTE_PREFIX):
        attributes = meta.get("attributes")
        value = attributes.get(key[len(ATTRIBUTE_PREFIX):]) if isinstance(attributes, Mapping) else None
    else:
        value = meta.get(key)
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None and v != ""]
    return [str(value)]


@dataclass(frozen=True)
class SearchFilter:
    """``fields``: (canonical key, accepted values) pairs, all of which must match;
    ``ids``: the allowed ids (None: any)."""

    fields: tuple[tuple[str, frozenset[str]], ...] = ()
    ids: frozenset[str] | None = None

    @classmethod
    def build(cls, fields: Mapping[str, str | Iterable[str]] | None = None,
              ids: Iterable[str] | None = None) -> "SearchFilter | None":
        """A filter from ``{field: value or values}`` and allowed ids; None when it restricts nothing."""
        merged: dict[str, set[str]] = {}
        for name, values in (fields or {}).items():
            key = field_key(name)
            values = [values] if isinstance(values, str) else list(values)
            if not values or not all(isinstance(v, str) for v in values):
                raise FilterError(f"filter field {quote(name, 80)} needs one or more text values, got {quote(values, 80)}",
                                  name)
            merged.setdefault(key, set()).update(values)
        allowed = None
        if ids is not None:
            allowed = frozenset(str(i) for i in ([ids] if isinstance(ids, str) else ids))
        if sum(map(len, merged.values())) + len(allowed or ()) > MAX_FILTER_VALUES:
            raise FilterError(f"a filter may list at most {MAX_FILTER_VALUES} values and ids together")
        if not merged and allowed is None:
            return None
        return cls(tuple(sorted((k, frozenset(v)) for k, v in merged.items())), allowed)

    @classmethod
    def parse(cls, expressions: Iterable[str], ids: Iterable[str] | None = None) -> "SearchFilter | None":
        """``FIELD=VALUE`` expressions (a field given twice accepts either value), as the CLI takes them."""
        fields: dict[str, list[str]] = defaultdict(list)
        for expression in expressions:
            name, sep, value = expression.partition("=")
            if not sep or not name.strip():
                raise FilterError(f"filter {quote(expression, 80)} is not FIELD=VALUE (e.g. category=Shirts)")
            fields[name.strip()].append(value)
        return cls.build(fields, ids)

    @property
    def field_names(self) -> list[str]:
        return [field_name(key) for key, _ in self.fields]

    def matches(self, item_id: str, meta: Mapping[str, Any]) -> bool:
        if self.ids is not None and item_id not in self.ids and str(meta.get("item_id")) not in self.ids:
            return False
        return all(not accepted.isdisjoint(field_values(meta, key)) for key, accepted in self.fields)

    def check_fields(self, known: Iterable[str]) -> None:
        """Refuse a field the index's metadata never holds, naming it and the ones it has."""
        known_keys = {field_key(name) for name in known} | set(TOP_LEVEL_FIELDS)
        for key, _ in self.fields:
            if key not in known_keys:
                names = sorted({field_name(k) for k in known_keys})
                raise FilterError(f"unknown filter field {quote(field_name(key), 80)}; this index has "
                                  f"{', '.join(names)}", field_name(key))

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as search results echo it."""
        out: dict[str, Any] = {field_name(key): sorted(values) for key, values in self.fields}
        if self.ids is not None:
            out["ids"] = sorted(self.ids)
        return out


def known_fields(metadata: Iterable[Mapping[str, Any]]) -> list[str]:
    """The filter fields of a catalog: the top-level ones and every attribute any item records."""
    names = set(TOP_LEVEL_FIELDS)
    for meta in metadata:
        attributes = meta.get("attributes") if meta else None
        if isinstance(attributes, Mapping):
            names.update(field_name(ATTRIBUTE_PREFIX + str(a)) for a in attributes)
    return sorted(names)


def facets(metadata: Iterable[Mapping[str, Any]], skip: Iterable[str] = ("item_id",)) -> dict[str, Counter]:
    """Items per value of each filter field (``item_id`` left out: one value per item)."""
    skipped = {field_key(s) for s in skip}
    counts: dict[str, Counter] = {}
    for meta in metadata:
        if not meta:
            continue
        keys = [k for k in TOP_LEVEL_FIELDS if k not in skipped]
        attributes = meta.get("attributes")
        if isinstance(attributes, Mapping):
            keys += [ATTRIBUTE_PREFIX + str(a) for a in attributes if ATTRIBUTE_PREFIX + str(a) not in skipped]
        for key in keys:
            values = field_values(meta, key)
            if values:
                counts.setdefault(field_name(key), Counter()).update(set(values))
    return counts


class MetadataPostings:
    """An inverted index of item metadata: (field, value) → internal ids, built once and reused
    until the catalog changes, so a filtered search costs set operations, not a metadata scan."""

    def __init__(self, items: Iterable[tuple[int, str, Mapping[str, Any]]]):
        """``items``: (internal id, id, metadata) of every item."""
        self._postings: dict[tuple[str, str], list[int]] = defaultdict(list)
        self._by_id: dict[str, list[int]] = defaultdict(list)
        self._keys: set[str] = set()
        for iid, item_id, meta in items:
            self._by_id[item_id].append(iid)
            item = meta.get("item_id")
            if item is not None and str(item) != item_id:
                self._by_id[str(item)].append(iid)
            for key in list(TOP_LEVEL_FIELDS) + [ATTRIBUTE_PREFIX + str(a) for a in (meta.get("attributes") or {})]:
                for value in set(field_values(meta, key)):
                    self._postings[(key, value)].append(iid)

    def allowed(self, where: SearchFilter) -> np.ndarray:
        """Internal ids (int64, sorted) of the items ``where`` accepts."""
        selected: set[int] | None = None
        if where.ids is not None:
            selected = {iid for item_id in where.ids for iid in self._by_id.get(item_id, ())}
        for key, accepted in sorted(where.fields, key=lambda field: self._size(field)):
            if selected is not None and not selected:
                break
            matching = {iid for value in accepted for iid in self._postings.get((key, value), ())}
            selected = matching if selected is None else selected & matching
        return np.fromiter(sorted(selected or ()), dtype=np.int64)

    def _size(self, field: tuple[str, frozenset[str]]) -> int:
        key, accepted = field
        return sum(len(self._postings.get((key, v), ())) for v in accepted)
