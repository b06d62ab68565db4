"""Retrieval benchmarks, defined as data: queries, gallery and labels. Three on the shared data
(``viton_c2s``, ``fashion_product_attributes``, ``clothing_to_shop_category``), the official
protocols of the papers' datasets (``deepfashion_c2s``, ``deepfashion_inshop``, ``street2shop``,
``fashionai``, ``darn``), each read from ``data_root/<its name>/`` in the layout of its reader,
and ``catalog``, built from your own catalog table.

A gallery image is relevant to a query when both have the same label for the evaluated
attribute. Label ``-1`` means unknown: such queries are not evaluated for that attribute and
such gallery images are never relevant. A multi-label attribute (an image with several values of
it, as DeepFashion's attribute types) has value sets instead: an int array [N, W] whose row lists
an image's value ids padded with -1, and an image is relevant when it shares at least one value
with the query. See docs/benchmarks.md for the protocols and counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..registry import ConfigError, Registry
from .category_map import load_category_map
from .readers import READERS
from .table import SampleTable

SPLITS = ("train", "val", "test")
FASHION_PRODUCT_EVALUATED = ("gender", "articleType", "baseColour", "season", "usage")


@dataclass
class Benchmark:
    name: str
    kind: str  # "instance" | "attribute" | "category"
    queries: SampleTable
    gallery: SampleTable
    attributes: list[str]
    query_labels: dict[str, np.ndarray]  # attribute -> int64 [Q], -1 = unknown; or value sets [Q, W]
    gallery_labels: dict[str, np.ndarray]  # attribute -> int64 [G], -1 = unknown; or value sets [G, W]
    exclude_self: bool = False  # queries are the gallery (same rows, same order); never retrieve yourself
    values: dict[str, list[str]] = field(default_factory=dict)  # attribute -> name of each label id
    crop_bbox: bool = False  # the protocol embeds each image's annotated box, not the whole photo
    protocol: dict[str, Any] = field(default_factory=dict)  # how a built benchmark chose its rows, for the JSON

    def __post_init__(self) -> None:
        if self.kind not in ("instance", "attribute", "category"):
            raise ValueError(f"unknown benchmark kind {self.kind!r}")
        if self.exclude_self and len(self.queries) != len(self.gallery):
            raise ValueError("exclude_self needs the queries to be the gallery, row for row")
        for attribute in self.attributes:
            q, g = self.query_labels[attribute], self.gallery_labels[attribute]
            if q.shape[:1] != (len(self.queries),) or g.shape[:1] != (len(self.gallery),):
                raise ValueError(f"labels of '{attribute}' do not match the query/gallery sizes")
            if q.ndim != g.ndim or q.ndim not in (1, 2):
                raise ValueError(f"labels of '{attribute}' must be [N] ids or [N, W] value sets on both sides")

    def relevant_counts(self, attribute: str) -> np.ndarray:
        """How many gallery images are relevant to each query (0 for unknown query labels)."""
        q, g = self.query_labels[attribute], self.gallery_labels[attribute]
        if q.ndim == 2:
            from ..scan import relevant_counts  # imported here: scan brings torch, benchmarks stay light

            own = np.arange(len(q)) if self.exclude_self else np.full(len(q), -1)
            return relevant_counts(q, g, own)
        size = int(max(q.max(initial=-1), g.max(initial=-1))) + 1
        per_value = np.bincount(g[g >= 0], minlength=size)
        counts = np.where(q >= 0, per_value[np.maximum(q, 0)], 0)
        if self.exclude_self:
            counts = np.where(q >= 0, counts - 1, 0)
        return counts

    def evaluable(self, attribute: str) -> np.ndarray:
        """Queries that count for ``attribute``: a known label and at least one relevant image."""
        labels = self.query_labels[attribute]
        labelled = labels >= 0 if labels.ndim == 1 else (labels >= 0).any(axis=1)
        return labelled & (self.relevant_counts(attribute) > 0)

    def drop(self, queries: Iterable[int] = (), gallery: Iterable[int] = ()) -> "Benchmark":
        """A copy without some rows, e.g. images that turned out unreadable.

        With ``exclude_self`` both index sets name rows of the one shared table.
        """
        bad_q, bad_g = set(queries), set(gallery)
        if self.exclude_self:
            bad_q = bad_g = bad_q | bad_g
        keep_q = np.array([i not in bad_q for i in range(len(self.queries))], dtype=bool)
        keep_g = np.array([i not in bad_g for i in range(len(self.gallery))], dtype=bool)
        return replace(
            self,
            queries=_rows(self.queries, keep_q), gallery=_rows(self.gallery, keep_g),
            query_labels={a: v[keep_q] for a, v in self.query_labels.items()},
            gallery_labels={a: v[keep_g] for a, v in self.gallery_labels.items()},
        )

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name, "kind": self.kind, "queries": len(self.queries), "gallery": len(self.gallery),
            "exclude_self": self.exclude_self,
            "attributes": {a: {"values": len(self.values.get(a, [])),
                               "evaluable_queries": int(self.evaluable(a).sum())} for a in self.attributes},
        }


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def _rows(table: SampleTable, keep: np.ndarray) -> SampleTable:
    return SampleTable([s for s, k in zip(table, keep) if k], table.root, table.name, table.multi_label)


def encode_shared(query_values: Sequence[str | None], gallery_values: Sequence[str | None]
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Label ids over one vocabulary for both sides (sorted values; ``None`` -> -1)."""
    vocabulary = sorted({v for v in [*query_values, *gallery_values] if v is not None})
    ids = {v: i for i, v in enumerate(vocabulary)}

    def encode(values: Sequence[str | None]) -> np.ndarray:
        return np.array([ids[v] if v is not None else -1 for v in values], dtype=np.int64)

    return encode(query_values), encode(gallery_values), vocabulary


def encode_value_sets(query_values: Sequence[str | tuple[str, ...] | None],
                      gallery_values: Sequence[str | tuple[str, ...] | None]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """:func:`encode_shared` for an attribute whose rows may hold several values (a tuple): when
    some row does, both sides become value sets [N, W] (ids padded with -1; relevant = shares a
    value), otherwise the plain ids of :func:`encode_shared`."""
    query_sets, gallery_sets = [_value_set(v) for v in query_values], [_value_set(v) for v in gallery_values]
    width = max((len(v) for v in [*query_sets, *gallery_sets]), default=0)
    if width <= 1:
        return encode_shared([v[0] if v else None for v in query_sets], [v[0] if v else None for v in gallery_sets])
    vocabulary = sorted({value for values in [*query_sets, *gallery_sets] for value in values})
    ids = {v: i for i, v in enumerate(vocabulary)}

    def encode(sets: list[tuple[str, ...]]) -> np.ndarray:
        out = np.full((len(sets), width), -1, dtype=np.int64)
        for row, values in enumerate(sets):
            out[row, :len(values)] = sorted(ids[v] for v in values)
        return out

    return encode(query_sets), encode(gallery_sets), vocabulary


def _value_set(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The distinct values of a cell, in their order (None and "" mean none)."""
    if isinstance(value, tuple):
        return tuple(dict.fromkeys(v for v in value if v))
    return (value,) if value else ()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'; benchmarks use one of {', '.join(SPLITS)}")


def _read(data_root: Path, folder: str, reader: str, **options) -> SampleTable:
    root = Path(data_root) / folder
    if not root.is_dir():
        expected = ("fashion-product/, clothing/ and viton/" if folder in ("fashion-product", "clothing", "viton")
                    else f"{folder}/ in the layout of the '{reader}' reader (docs/datasets.md)")
        raise FileNotFoundError(f"{root}: dataset folder not found (data_root must contain {expected})")
    return READERS.build(reader, root=root, **options)


@BENCHMARKS.register("viton_c2s")
def viton_c2s(data_root: Path, split: str = "test") -> Benchmark:
    """Person photo -> the one product photo of the same pair, among all products of the split."""
    _check_split(split)
    table = _read(data_root, "viton", "viton").filter(split=split)
    queries, gallery = table.filter(domain="consumer"), table.filter(domain="shop")
    q, g, vocabulary = encode_shared([s.item_id for s in queries], [s.item_id for s in gallery])
    return Benchmark("viton_c2s", "instance", queries, gallery, ["pair_id"], {"pair_id": q}, {"pair_id": g},
                     values={"pair_id": vocabulary})


@BENCHMARKS.register("fashion_product_attributes")
def fashion_product_attributes(data_root: Path, split: str = "test") -> Benchmark:
    """Every image of the split queries all the others; relevant = same value of one attribute."""
    _check_split(split)
    table = _read(data_root, "fashion-product", "fashion_product").filter(split=split)
    query_labels, gallery_labels, values = {}, {}, {}
    for attribute in FASHION_PRODUCT_EVALUATED:
        column = [_single(s.attributes.get(attribute)) for s in table]
        labels, _, values[attribute] = encode_shared(column, [])
        query_labels[attribute] = gallery_labels[attribute] = labels
    return Benchmark("fashion_product_attributes", "attribute", table, table, list(FASHION_PRODUCT_EVALUATED),
                     query_labels, gallery_labels, exclude_self=True, values=values)


@BENCHMARKS.register("clothing_to_shop_category")
def clothing_to_shop_category(data_root: Path, split: str = "test") -> Benchmark:
    """Consumer photos (clothing validation, whatever ``split``) -> fashion-product shop photos of
    ``split`` whose articleType maps to a clothing category; relevant = same category."""
    _check_split(split)
    queries = _read(data_root, "clothing", "clothing").filter(split="val")
    category_of = load_category_map()
    shop = _read(data_root, "fashion-product", "fashion_product").filter(split=split)
    gallery = shop.filter(predicate=lambda s: _single(s.attributes.get("articleType")) in category_of)
    q, g, vocabulary = encode_shared(
        [s.category for s in queries],
        [category_of[_single(s.attributes["articleType"])] for s in gallery])
    return Benchmark("clothing_to_shop_category", "category", queries, gallery, ["category"],
                     {"category": q}, {"category": g}, values={"category": vocabulary})


def _single(value: str | tuple[str, ...] | None) -> str | None:
    if isinstance(value, tuple):
        return value[0] if len(value) == 1 else None
    return value or None


# ---- the papers' datasets, official protocols ---------------------------------------------------

def _instance(name: str, queries: SampleTable, gallery: SampleTable, crop_bbox: bool) -> Benchmark:
    if len(queries) == 0 or len(gallery) == 0:
        raise ConfigError(f"{name}: the split has {len(queries)} queries and {len(gallery)} gallery images")
    q, g, vocabulary = encode_shared([s.item_id for s in queries], [s.item_id for s in gallery])
    return Benchmark(name, "instance", queries, gallery, ["item"], {"item": q}, {"item": g},
                     values={"item": vocabulary}, crop_bbox=crop_bbox)


@BENCHMARKS.register("deepfashion_c2s")
def deepfashion_c2s(data_root: Path, split: str = "test") -> Benchmark:
    """DeepFashion Consumer-to-Shop: consumer photos of the split query all shop photos of the
    split; relevant = same item. Both sides are cropped to their annotated boxes, as in the
    benchmark's paper (images without a box are used whole)."""
    _check_split(split)
    table = _read(data_root, "deepfashion_c2s", "deepfashion_c2s").filter(split=split)
    return _instance("deepfashion_c2s", table.filter(domain="consumer"), table.filter(domain="shop"), True)


@BENCHMARKS.register("deepfashion_inshop")
def deepfashion_inshop(data_root: Path, split: str = "test") -> Benchmark:
    """DeepFashion In-Shop: the ``query`` images against the ``gallery`` images; relevant = same
    item. The release has no validation protocol, so ``split`` must be ``test``; the whole
    photos are used (the boxes are optional in the protocol)."""
    if split != "test":
        raise ConfigError("deepfashion_inshop: the release defines only the test protocol (query vs gallery); "
                          f"use split test, not '{split}'")
    table = _read(data_root, "deepfashion_inshop", "deepfashion_inshop")
    return _instance("deepfashion_inshop", table.filter(split="query"), table.filter(split="gallery"), False)


@BENCHMARKS.register("street2shop")
def street2shop(data_root: Path, split: str = "test") -> Benchmark:
    """Street2Shop: the street photos of the test pairs (cropped to their boxes) against every shop
    photo of the test gallery (products of a test pair or of no pair); relevant = same product.
    The paper ranks within each category; here all categories share one gallery, which only adds
    distractors (numbers are a lower bound of the per-category protocol)."""
    if split != "test":
        raise ConfigError(f"street2shop: the release has train and test pairs only; use split test, not '{split}'")
    table = _read(data_root, "street2shop", "street2shop").filter(split="test")
    return _instance("street2shop", table.filter(domain="consumer"), table.filter(domain="shop"), True)


def _asen_benchmark(name: str, reader: str, data_root: Path, split: str) -> Benchmark:
    """ASEN's attribute-specific protocol: for each attribute, the queries listed for it against
    the candidates listed for it; relevant = same value of that attribute, or for a multi-valued
    attribute (DeepFashion's types) at least one value in common.

    ASEN's own evaluation code takes each line of the lists as a query or candidate of its own
    value, so an image with two values is two queries and two candidates there; here it is one
    row with both values. On single-valued lists the two protocols are the same."""
    if split not in ("test", "val"):
        raise ConfigError(f"{name}: ASEN's lists define test and valid protocols; use split test or val")
    root = Path(data_root) / name
    split_dir = "split" if (root / "split").is_dir() else "."
    table = _read(data_root, name, reader, split_dir=split_dir, eval_split="test" if split == "test" else "valid")
    queries, gallery = table.filter(split="query"), table.filter(split="gallery")
    attributes = [a for a in table.attribute_names() if any(a in s.attributes for s in queries)]
    query_labels, gallery_labels, values = {}, {}, {}
    for attribute in attributes:
        query_labels[attribute], gallery_labels[attribute], values[attribute] = encode_value_sets(
            [s.attributes.get(attribute) for s in queries], [s.attributes.get(attribute) for s in gallery])
    return Benchmark(name, "attribute", queries, gallery, attributes, query_labels, gallery_labels, values=values)


@BENCHMARKS.register("fashionai")
def fashionai(data_root: Path, split: str = "test") -> Benchmark:
    """FashionAI attributes as split by ASEN (``data_root/fashionai/[split/]``)."""
    return _asen_benchmark("fashionai", "fashionai", data_root, split)


@BENCHMARKS.register("darn")
def darn(data_root: Path, split: str = "test") -> Benchmark:
    """DARN as split by ASEN (``data_root/darn/[split/]``)."""
    return _asen_benchmark("darn", "darn", data_root, split)


@BENCHMARKS.register("deepfashion_asen")
def deepfashion_asen(data_root: Path, split: str = "test") -> Benchmark:
    """DeepFashion's five attribute types as split by ASEN (``data_root/deepfashion_asen/[split/]``)."""
    return _asen_benchmark("deepfashion_asen", "deepfashion_asen", data_root, split)


# ---- your own catalog ---------------------------------------------------------------------------
CATALOG_LEVELS = ("instance", "category", "attribute")
EVALUATION_SPLITS = ("train", "val", "test")


@BENCHMARKS.register("catalog")
def catalog(data_root: Path, split: str = "test", catalog: str | Path | None = None, format: str | None = None,
            columns: Any = None, options: dict[str, Any] | None = None, queries: str = "auto",
            level: str = "instance", attributes: str | Sequence[str] | None = None) -> Benchmark:
    """A benchmark built from any catalog table (``data.readers.catalog.read_catalog``).

    ``catalog``: the CSV, folder or image, relative to ``data_root`` (or absolute); ``format``,
    ``columns`` and ``options`` are read as by every other command. Rows: when the table has
    train/val/test splits, those of ``split`` (for ``test`` also the rows marked query or
    gallery); otherwise all of them. ``queries``: ``domain=D`` (the photos of domain D query the
    rest), ``split=S`` (split S queries the rest; a ``query`` column marks split query), ``all``
    (every photo queries all the others, never itself) or ``auto`` (split=query when rows are
    marked so, else domain=consumer when there are consumer and other photos, else all).
    ``level``: ``instance`` (relevant = same item id), ``category`` (same category) or
    ``attribute`` (same value of each of ``attributes``, default all of the table's; the name
    ``category`` means the category column unless an attribute has that name; an attribute
    given as a list of values shares a value when any of them is the query's).
    """
    from .readers.catalog import read_catalog

    if catalog is None:
        raise ConfigError("the catalog benchmark needs a catalog: evaluate --catalog FILE_OR_FOLDER, or in a recipe "
                          "eval.options.catalog (default: the recipe's data.root)")
    if split not in EVALUATION_SPLITS:
        raise ConfigError(f"unknown split '{split}'; benchmarks use one of {', '.join(EVALUATION_SPLITS)}")
    if level not in CATALOG_LEVELS:
        raise ConfigError(f"catalog benchmark: level must be one of {', '.join(CATALOG_LEVELS)}, got '{level}'")
    path = Path(data_root) / catalog
    reader_options = dict(options or {})
    # a recipe's reader options carry its column mapping; an explicit one wins
    mapping = reader_options.pop("columns", None)
    table = read_catalog(path, format, columns or mapping, **reader_options)
    present = {s.split for s in table}
    if present & set(EVALUATION_SPLITS):
        kept = {split} | ({"query", "gallery"} if split == "test" else set())
        table = table.filter(split=sorted(kept))
        if not len(table):
            raise ConfigError(f"{path}: no rows of split '{split}' to evaluate (the table has "
                              f"{', '.join(sorted(present))}); choose another split")
    query_rows, rule = _catalog_queries(table, queries, path)
    exclude_self = rule == "all"
    if exclude_self:
        query_table = gallery_table = table
    else:
        query_table = table.filter(predicate=lambda s: query_rows(s))
        gallery_table = table.filter(predicate=lambda s: not query_rows(s))
    if not len(query_table) or not len(gallery_table):
        raise ConfigError(f"{path}: queries={rule} leaves {len(query_table)} queries and {len(gallery_table)} "
                          "gallery images; choose queries=domain=D, split=S or all")
    names = _catalog_labels(table, level, attributes, path)
    query_labels, gallery_labels, values = {}, {}, {}
    for name in names:
        label = _catalog_label(table, level, name)
        q = [label(s) for s in query_table]
        g = [] if exclude_self else [label(s) for s in gallery_table]
        query_labels[name], gallery_labels[name], values[name] = encode_value_sets(q, g)
        if exclude_self:
            gallery_labels[name] = query_labels[name]
    kind = "attribute" if level == "attribute" else level
    protocol = {"catalog": str(path), "queries": rule, "level": level, "rows": len(table)}
    return Benchmark("catalog", kind, query_table, gallery_table, names, query_labels, gallery_labels,
                     exclude_self=exclude_self, values=values, protocol=protocol)


def _catalog_queries(table: SampleTable, queries: str, path: Path):
    """``(is_query(sample), rule)`` for the ``queries`` option (``auto`` resolved)."""
    from .table import DOMAINS, SPLITS

    rule = queries.strip()
    if rule == "auto":
        domains = {s.domain for s in table}
        if any(s.split == "query" for s in table):
            rule = "split=query"
        elif "consumer" in domains and len(domains) > 1:
            rule = "domain=consumer"
        else:
            rule = "all"
    if rule == "all":
        return (lambda s: True), rule
    key, sep, value = (part.strip() for part in rule.partition("="))
    allowed = {"domain": DOMAINS, "split": SPLITS}.get(key)
    if not sep or allowed is None or value not in allowed:
        raise ConfigError(f"catalog benchmark: queries must be auto, all, domain=<{'|'.join(DOMAINS)}> or "
                          f"split=<{'|'.join(SPLITS)}>, got '{queries}'")
    return (lambda s: getattr(s, key) == value), f"{key}={value}"


def _catalog_labels(table: SampleTable, level: str, attributes: str | Sequence[str] | None, path: Path) -> list[str]:
    if level == "instance":
        return ["item"]
    if level == "category":
        if not table.categories():
            raise ConfigError(f"{path}: level=category, but no row has a category (map one: --columns category=COLUMN)")
        return ["category"]
    known = table.attribute_names()
    if attributes is None or attributes == "" or attributes == []:
        if not known:
            raise ConfigError(f"{path}: level=attribute, but the table has no attributes (map plain attribute "
                              "columns: --columns ...,colour,product_type)")
        return known
    names = [a.strip() for a in attributes.split(",")] if isinstance(attributes, str) else [str(a) for a in attributes]
    for name in names:
        if name not in known and not (name == "category" and table.categories()):
            raise ConfigError(f"{path}: no attribute '{name}' in the catalog (it has: {', '.join(known) or 'none'}"
                              f"{', category' if table.categories() else ''})")
    return names


def _catalog_label(table: SampleTable, level: str, name: str):
    if level == "instance":
        return lambda s: s.item_id
    if level == "category" or (name == "category" and name not in table.attribute_names()):
        return lambda s: s.category
    return lambda s: s.attributes.get(name)
