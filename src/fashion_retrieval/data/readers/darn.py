"""Readers for DARN (Huang et al., ICCV 2015) and DeepFashion's attributes as split by ASEN /
ASEN++ (Ma et al., AAAI 2020).

DARN itself is distributed as image URLs; attribute-specific retrieval papers use the split
files ASEN's authors released for DARN, FashionAI and DeepFashion. Their layout, per dataset
folder:

* ``filenames_{train,valid,test}.txt``: one image path per line, relative to the dataset
  folder; the 0-based line number is the image's index in that split.
* ``label_train.txt``: ``<index> <attribute> <value> [<attribute> <value> ...]``.
* ``{query,candidate}_{valid,test}.txt``: ``<index> <attribute> <value>``; the queries and the
  candidates (gallery) of attribute-specific retrieval, one line per image and attribute.
* optionally ``meta.json``: ``{"ATTRIBUTES": [names], "ATTRIBUTES_NUM": {name: count},
  "ATTRIBUTES_VALUES": {name: [value names]}}``.

Attribute and value numbers are 0-based indices into the attribute list and its values.
``read_asen_lists`` reads any dataset in this layout: ``darn`` and ``deepfashion_asen`` here,
``fashionai`` for its ``split_dir``.

Several values of one attribute on one image: DeepFashion's attributes are multi-label (an image
may be both ``floral`` and ``striped``, two values of the texture type), and ASEN's lists give such
an image once per value, on several lines or as several pairs of one line. ``deepfashion_asen``
reads them as a value set (``multi_valued=True``); for DARN and FashionAI, whose attributes are
single-label, a second value is an error naming both lines.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ...registry import ConfigError
from ..table import AnnotationError, Sample, SampleTable
from . import READERS
from ._annotations import image_folder_parts, iter_lines, parse_int, read_json, require_file
from .deepfashion import ATTRIBUTE_TYPES, read_attribute_list

# Attribute names and value counts of ASEN++'s DARN split (its config/DARN/DARN.yaml); DARN's
# value names were never published with the split, so values are named value_<index>.
DARN_ATTRIBUTES = {
    "clothes category": 20, "clothes button": 13, "clothes color": 55, "clothes length": 7,
    "clothes pattern": 28, "clothes shape": 11, "collar shape": 26, "sleeve length": 8, "sleeve shape": 17,
}
# ASEN's DeepFashion split: the five attribute types of DeepFashion Category and Attribute
# Prediction, each with the attributes of that type in list_attr_cloth.txt order as its values.
DEEPFASHION_ATTRIBUTES = dict(zip(ATTRIBUTE_TYPES.values(), (156, 218, 180, 216, 230)))
EVAL_SPLITS = {"valid": "val", "test": "test"}


@dataclass(frozen=True)
class AsenSchema:
    """What the attribute and value indices of the label files stand for."""

    attributes: tuple[str, ...]
    num_values: tuple[int | None, ...]  # None: not known, any index is accepted
    value_names: tuple[tuple[str, ...] | None, ...]  # None: values are named value_<index>

    @classmethod
    def from_counts(cls, counts: dict[str, int | None],
                    value_names: dict[str, Sequence[str]] | None = None) -> "AsenSchema":
        value_names = value_names or {}
        return cls(tuple(counts), tuple(counts.values()),
                   tuple(tuple(value_names[name]) if name in value_names else None for name in counts))

    def value(self, attribute: int, index: int) -> str:
        names = self.value_names[attribute]
        return names[index] if names is not None else f"value_{index}"


@READERS.register("darn")
def read_darn(root: Path | str, split_dir: str = ".", meta: str | None = None, eval_split: str = "test",
              image_prefix: str = "", attributes: Sequence[str] | None = None) -> SampleTable:
    """ASEN's DARN split in ``root/split_dir``; image paths are relative to ``root``.

    ``eval_split``: which evaluation split (``test`` or ``valid``) becomes query/gallery rows; the
    other one's images get split ``val`` or ``test``. ``meta``: an ASEN ``meta.json`` (default:
    ``split_dir/meta.json`` if present, else the nine DARN attributes ASEN++ uses).
    ``image_prefix`` is put before every listed path (e.g. ``"pic/"`` if the lists hold bare file
    names). ``attributes`` renames the attributes, in index order.
    """
    root = Path(root)
    schema = load_schema(root / split_dir, root / meta if meta else None, AsenSchema.from_counts(DARN_ATTRIBUTES))
    if attributes is not None:
        if len(attributes) != len(schema.attributes):
            raise ConfigError(f"attributes gives {len(attributes)} names but the split has "
                              f"{len(schema.attributes)} attributes: {', '.join(schema.attributes)}")
        schema = AsenSchema(tuple(attributes), schema.num_values, schema.value_names)
    return read_asen_lists(root, split_dir, schema, eval_split=eval_split, image_prefix=image_prefix,
                           domain="unknown", name="darn")


def load_schema(folder: Path, meta: Path | None, default: AsenSchema) -> AsenSchema:
    """The schema of an explicit ``meta`` file, else of ``folder/meta.json``, else ``default``."""
    path = meta if meta is not None else folder / "meta.json"
    if meta is None and not path.is_file():
        return default
    data = read_json(path)
    names = data.get("ATTRIBUTES") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise AnnotationError(path, None, "expected ASEN meta data: an object whose \"ATTRIBUTES\" is a list of names")
    counts = data.get("ATTRIBUTES_NUM") or {}
    values = data.get("ATTRIBUTES_VALUES") or {}
    for name in names:
        if name in counts and (isinstance(counts[name], bool) or not isinstance(counts[name], int)):
            raise AnnotationError(path, None, f"ATTRIBUTES_NUM of '{name}' must be an integer")
        if name in values:
            if not isinstance(values[name], list) or not all(isinstance(v, str) for v in values[name]):
                raise AnnotationError(path, None, f"ATTRIBUTES_VALUES of '{name}' must be a list of names")
            if name in counts and counts[name] != len(values[name]):
                raise AnnotationError(path, None, f"'{name}' has {counts[name]} values in ATTRIBUTES_NUM but "
                                      f"{len(values[name])} names in ATTRIBUTES_VALUES")
    return AsenSchema.from_counts(
        {name: counts.get(name, len(values[name]) if name in values else None) for name in names}, values)


@READERS.register("deepfashion_asen")
def read_deepfashion_asen(root: Path | str, split_dir: str = ".", meta: str | None = None, eval_split: str = "test",
                          image_prefix: str = "", attribute_list: str | None = None) -> SampleTable:
    """ASEN's DeepFashion split (five attribute types over DeepFashion Category and Attribute
    Prediction images) in ``root/split_dir``; image paths are relative to ``root``.

    Value indices count the attributes of one type in ``list_attr_cloth.txt`` order. Without
    names they are ``value_<index>``; ``attribute_list`` (a path under ``root``, e.g.
    ``Anno/list_attr_cloth.txt``) names them from the official attribute list, and ``meta``
    (an ASEN ``meta.json``, default ``split_dir/meta.json`` if present) may name anything.
    The item is the image's product folder, as for ``deepfashion_attributes``.

    DeepFashion's attributes are multi-label: an image listed with several values of one type
    (on several lines of a list, or as several pairs of one ``label_train.txt`` line) gets all of
    them. Such a type is multi-valued: every row's value of it is a tuple (in value-index order)
    and the table's ``multi_label`` names it; types with one value per image stay plain strings.
    Training then uses every value (docs/datasets.md) and evaluation counts a gallery image as
    relevant when it shares at least one value with the query.
    """
    root = Path(root)
    default = AsenSchema.from_counts(DEEPFASHION_ATTRIBUTES)
    if attribute_list is not None:
        if meta is not None:
            raise ConfigError("deepfashion_asen: give meta or attribute_list, not both")
        default = _deepfashion_schema(root / attribute_list)
    schema = load_schema(root / split_dir, root / meta if meta else None, default)
    return read_asen_lists(root, split_dir, schema, eval_split=eval_split, image_prefix=image_prefix,
                           domain="unknown", name="deepfashion_asen", item_of=_product_folder, multi_valued=True)


def _deepfashion_schema(path: Path) -> AsenSchema:
    names: dict[str, list[str]] = {kind: [] for kind in ATTRIBUTE_TYPES.values()}
    for name, kind in read_attribute_list(require_file(path, "named by attribute_list")):
        names[ATTRIBUTE_TYPES[kind]].append(name)
    return AsenSchema.from_counts({kind: len(values) for kind, values in names.items()}, names)


def _product_folder(path: str) -> str:
    _, folder = image_folder_parts(path)
    return folder or Path(path).stem


def read_asen_lists(root: Path, split_dir: str, schema: AsenSchema, eval_split: str = "test",
                    image_prefix: str = "", domain: str = "unknown", name: str = "asen",
                    item_of: Callable[[str], str] = lambda path: Path(path).stem,
                    multi_valued: bool = False) -> SampleTable:
    """One row per labelled image of each split; in ``eval_split`` one row per image and role
    (an image that is a query for one attribute and a candidate for another has two rows).

    ``multi_valued``: an image may have several values of one attribute (they become a tuple,
    for every row of an attribute that has such an image); without it a second value is an
    error."""
    if eval_split not in EVAL_SPLITS:
        raise ConfigError(f"eval_split must be one of {', '.join(EVAL_SPLITS)}, got {eval_split!r}")
    root = Path(root)
    folder = root / split_dir
    rows: list[tuple[str, str, dict[str, _Label]]] = []  # path, split, labels

    def add(files: list[str], labels: dict[int, dict[str, _Label]], split: str) -> None:
        for index in sorted(labels):
            rows.append((image_prefix + files[index], split, labels[index]))

    def read(path: Path, files: list[str]) -> dict[int, dict[str, _Label]]:
        return _labels(path, files, schema, multi_valued)

    files = _filenames(folder / "filenames_train.txt")
    add(files, read(folder / "label_train.txt", files), "train")
    for split, table_split in EVAL_SPLITS.items():
        list_path = folder / f"filenames_{split}.txt"
        if split != eval_split and not list_path.is_file():
            continue  # the split not evaluated on is optional
        files = _filenames(list_path)
        query = read(folder / f"query_{split}.txt", files)
        candidate = read(folder / f"candidate_{split}.txt", files)
        if split == eval_split:
            add(files, query, "query")
            add(files, candidate, "gallery")
        else:
            add(files, _merged(query, candidate, folder / f"candidate_{split}.txt", files, multi_valued), table_split)
    # an attribute is multi-valued as soon as one image has two of its values; then every row
    # carries a tuple, so consumers see one kind of value per attribute
    multi = sorted({attr for _, _, labels in rows for attr, label in labels.items() if len(label.values) > 1},
                   key=schema.attributes.index)
    samples = [Sample(path=path, item_id=item_of(path), domain=domain, split=split,
                      attributes={attr: label.value(attr in multi) for attr, label in labels.items()})
               for path, split, labels in rows]
    return SampleTable(samples, root=root, name=name, multi_label=multi)


@dataclass
class _Label:
    """The values one image has for one attribute, by value index, and where the first was read."""

    values: dict[int, str]
    line: int

    def value(self, as_tuple: bool) -> str | tuple[str, ...]:
        names = tuple(self.values[index] for index in sorted(self.values))
        return names if as_tuple else names[0]


def _filenames(path: Path) -> list[str]:
    """Every line counts, blank ones included: the label files refer to images by line number."""
    return [text.strip() for _, text in iter_lines(path, keep_blank=True)]


def _labels(path: Path, files: list[str], schema: AsenSchema, multi_valued: bool) -> dict[int, dict[str, _Label]]:
    """Image index → attribute → its values (and the line the first was read from)."""
    labels: dict[int, dict[str, _Label]] = {}
    for line, text in iter_lines(path):
        tokens = text.split()
        if len(tokens) < 3 or len(tokens) % 2 == 0:
            raise AnnotationError(path, line, f"expected '<image index> <attribute> <value>' (more attribute/value "
                                  f"pairs may follow), got {len(tokens)} columns")
        index = parse_int(path, line, tokens[0], "image index", 0)
        if index >= len(files) or not files[index]:
            blank = "" if index >= len(files) else f" and line {index + 1} is blank"
            raise AnnotationError(path, line, f"image index {index} has no path: the filenames list has "
                                  f"{len(files)} lines{blank}")
        for attr_token, value_token in zip(tokens[1::2], tokens[2::2]):
            attribute = parse_int(path, line, attr_token, "attribute index", 0, len(schema.attributes) - 1)
            count = schema.num_values[attribute]
            what = f"value of '{schema.attributes[attribute]}'"
            value_index = parse_int(path, line, value_token, what, 0, count - 1 if count is not None else None)
            _set_label(labels.setdefault(index, {}), schema.attributes[attribute], value_index,
                       schema.value(attribute, value_index), path, line, files[index], multi_valued)
    return labels


def _set_label(labels: dict[str, _Label], name: str, index: int, value: str, path: Path, line: int,
               image: str, multi_valued: bool, first_file: Path | None = None) -> None:
    first = labels.get(name)
    if first is None:
        labels[name] = _Label({index: value}, line)
    elif multi_valued:
        first.values.setdefault(index, value)
    elif index not in first.values:
        where = f"{first_file.name} line {first.line}" if first_file else f"line {first.line}"
        raise AnnotationError(path, line, f"{image} has '{name}' = {value!r} here but "
                              f"{next(iter(first.values.values()))!r} on {where}")


def _merged(query: dict[int, dict[str, _Label]], candidate: dict[int, dict[str, _Label]], candidate_path: Path,
            files: list[str], multi_valued: bool) -> dict[int, dict[str, _Label]]:
    """Query and candidate labels of one image joined, for a split that is not evaluated on."""
    merged = {index: {name: _Label(dict(label.values), label.line) for name, label in labels.items()}
              for index, labels in query.items()}
    query_path = candidate_path.with_name(candidate_path.name.replace("candidate_", "query_"))
    for index, labels in candidate.items():
        target = merged.setdefault(index, {})
        for name, label in labels.items():
            for value_index, value in label.values.items():
                _set_label(target, name, value_index, value, candidate_path, label.line, files[index], multi_valued,
                           first_file=query_path)
    return merged
