"""Readers for your own catalog: a spreadsheet export with your own column names, a CSV sample
table, a folder of images (by class or loose), or one image file.

``csv`` reads one row per image. Without a column mapping it expects the names that
:meth:`SampleTable.to_csv` writes:

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

A shop's own export keeps its own names: the ``columns`` option maps them (see
:func:`parse_columns`), e.g. ``path=image_file,item_id=sku,category=product_group,colour,
product_type``, where every bare name is a plain attribute column. It also reads a column
``query`` (yes/no: the photo is a query of the benchmark). Comma, semicolon, tab or ``|``
delimiters are recognised from the header line; quoted cells, a byte-order mark, Windows line
ends, empty cells and blank rows are what spreadsheets write and are accepted.

A path listed twice, an empty path or item id, a value outside those lists and text that is
not UTF-8 (or the ``encoding`` given) stop the reader with the file, line and column; image
files are only opened later, where an unreadable one is skipped and reported.

``folder`` reads ``<root>/<class>/<image>`` or ``<root>/<split>/<class>/<image>``; names that
are not UTF-8 are refused by name (they would become ids and index metadata).
:func:`read_catalog` picks the reader for whatever path a command is given.
"""
from __future__ import annotations

import csv
import difflib
import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Mapping

from ...files import quote
from ...names import name_problem
from ...registry import ConfigError
from ..table import AnnotationError, Sample, SampleTable, _attributes, parse_bbox_cell
from . import READERS

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test",
                 "query": "query", "gallery": "gallery"}

# ---- column mapping ------------------------------------------------------------------------------
# role -> the column it reads when the mapping does not name one (SampleTable.to_csv's names)
ROLE_DEFAULTS = {"path": "path", "item_id": "item_id", "category": "category", "domain": "domain",
                 "split": "split", "query": "query", "bbox": "bbox", "attributes_json": "attributes"}
REQUIRED_ROLES = ("path", "item_id")
MAPPING_FILE_KEYS = ("attributes", "delimiter", "encoding")
DELIMITERS = (",", ";", "\t", "|")
SPLIT_VALUES = {**SPLIT_FOLDERS, "unknown": "unknown", "": "unknown"}
DOMAIN_VALUES = {"consumer": "consumer", "shop": "shop", "unknown": "unknown", "": "unknown"}
QUERY_TRUE = frozenset({"1", "true", "yes", "y", "x", "query"})
QUERY_FALSE = frozenset({"0", "false", "no", "n", "", "gallery"})


@dataclass(frozen=True)
class ColumnMap:
    """Which column of a catalog CSV plays which role.

    ``roles``: role -> column for the roles named explicitly (they must exist); every other role
    reads its default column (:data:`ROLE_DEFAULTS`) when the header has it. ``attributes``:
    attribute name -> column, one plain (single-label) attribute per column; an empty cell is
    unlabelled. ``source`` names where the mapping came from, for errors.
    """
    roles: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)
    delimiter: str | None = None  # None: recognised from the header line
    encoding: str = "utf-8"
    source: str = "columns"

    def __bool__(self) -> bool:
        """False for the empty mapping (today's fixed names, recognised delimiter, UTF-8)."""
        return bool(self.roles or self.attributes or self.delimiter or self.encoding != "utf-8")


def parse_columns(spec: str | Mapping[str, Any] | ColumnMap | None, source: str = "--columns") -> ColumnMap:
    """A column mapping from the command line, a recipe or a YAML file.

    - a string ``ROLE=COLUMN,...,COLUMN,...``: ``ROLE=COLUMN`` entries name the column of a role
      (``path``, ``item_id``, ``category``, ``domain``, ``split``, ``query``, ``bbox``,
      ``attributes_json``); every bare ``COLUMN`` is a plain attribute named like its column;
    - a string ending in ``.yaml`` / ``.yml``: that file, holding the mapping below;
    - a mapping ``{path: COLUMN, item_id: COLUMN, ..., attributes: [COLUMN, ...] or
      {NAME: COLUMN, ...}, delimiter: ";", encoding: cp1252}``.

    Attribute names become model attributes and index folders: they go through
    :func:`fashion_retrieval.names.name_problem`. A mistake is a :class:`ConfigError` naming
    ``source`` (the option, the recipe key or the YAML file).
    """
    if spec is None or spec == "":
        return ColumnMap(source=source)
    if isinstance(spec, ColumnMap):
        return spec
    if isinstance(spec, str) and spec.strip().lower().endswith((".yaml", ".yml")):
        return _columns_from_yaml(Path(spec.strip()))
    if isinstance(spec, str):
        roles: dict[str, str] = {}
        attributes: dict[str, str] = {}
        for entry in (part.strip() for part in spec.split(",")):
            if not entry:
                continue
            role, sep, column = (text.strip() for text in entry.partition("="))
            if not sep:
                _add_attribute(attributes, role, role, source)
                continue
            _check_role(role, source)
            if role in roles:
                raise ConfigError(f"{source}: role '{role}' is mapped twice")
            roles[role] = _column_name(column, f"{role}=", source)
        return ColumnMap(roles, attributes, source=source)
    if isinstance(spec, Mapping):
        return _columns_from_mapping(spec, source)
    raise ConfigError(f"{source}: expected ROLE=COLUMN,... text, a .yaml file or a mapping, "
                      f"got {type(spec).__name__}")


def _columns_from_yaml(path: Path) -> ColumnMap:
    from ...files import read_yaml

    if not path.is_file():
        raise ConfigError(f"{path}: column mapping file not found")
    data = read_yaml(path, ConfigError)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping such as 'item_id: sku', got {type(data).__name__}")
    return _columns_from_mapping(data, str(path))


def _columns_from_mapping(data: Mapping[str, Any], source: str) -> ColumnMap:
    roles: dict[str, str] = {}
    attributes: dict[str, str] = {}
    delimiter, encoding = None, "utf-8"
    for key, value in data.items():
        key = str(key)
        if key == "attributes":
            if isinstance(value, str):
                value = [value]
            if isinstance(value, Mapping):
                for name, column in value.items():
                    _add_attribute(attributes, str(name), _column_name(column, f"attributes.{name}", source), source)
            elif isinstance(value, list):
                for column in value:
                    column = _column_name(column, "attributes", source)
                    _add_attribute(attributes, column, column, source)
            else:
                raise ConfigError(f"{source}: attributes: expected a list of columns or NAME: COLUMN pairs, "
                                  f"got {quote(value, 60)}")
        elif key == "delimiter":
            if value not in DELIMITERS:
                raise ConfigError(f"{source}: delimiter: expected one of {', '.join(map(repr, DELIMITERS))}, "
                                  f"got {quote(value, 20)}")
            delimiter = value
        elif key == "encoding":
            encoding = _encoding(value, source)
        else:
            _check_role(key, source)
            roles[key] = _column_name(value, key, source)
    return ColumnMap(roles, attributes, delimiter, encoding, source)


def _check_role(role: str, source: str) -> None:
    if role not in ROLE_DEFAULTS:
        options = [*ROLE_DEFAULTS, *MAPPING_FILE_KEYS]
        close = difflib.get_close_matches(role, options, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{source}: unknown role {quote(role, 60)}{hint}; roles are "
                          f"{', '.join(ROLE_DEFAULTS)}, and a bare COLUMN is a plain attribute column")


def _column_name(column: Any, key: str, source: str) -> str:
    if not isinstance(column, str) or not column.strip():
        raise ConfigError(f"{source}: {key} needs a column name, got {quote(column, 60)}")
    return column.strip()


def _add_attribute(attributes: dict[str, str], name: str, column: str, source: str) -> None:
    # attribute names become a model's attributes and an index's space folders: one rule for them
    problem = name_problem(name)
    if problem is not None:
        raise ConfigError(f"{source}: attribute name {quote(name, 80)} {problem}")
    if name in attributes:
        raise ConfigError(f"{source}: attribute {quote(name, 80)} is mapped twice")
    attributes[name] = column


def _encoding(value: Any, source: str) -> str:
    import codecs

    try:
        return codecs.lookup(str(value)).name
    except LookupError:
        raise ConfigError(f"{source}: encoding: unknown encoding {quote(value, 40)}") from None


# ---- readers --------------------------------------------------------------------------------------
@READERS.register("csv")
def read_csv(root: Path, file: str = "catalog.csv", columns: str | Mapping[str, Any] | None = None,
             delimiter: str | None = None, encoding: str | None = None) -> SampleTable:
    """``root/file`` (``file`` may also be absolute, ``root`` may be the CSV itself); image paths
    are relative to the CSV's folder. ``columns``: a column mapping (:func:`parse_columns`);
    ``delimiter`` and ``encoding`` override the mapping's."""
    root = Path(root)
    if root.is_file():
        root, file = root.parent, root.name
    path = Path(file) if Path(file).is_absolute() else root / file
    if not path.is_file():
        raise AnnotationError(path, None, "catalog file not found")
    mapping = parse_columns(columns, "columns")
    overrides = {**({"delimiter": delimiter} if delimiter is not None else {}),
                 **({"encoding": encoding} if encoding is not None else {})}
    if overrides:
        checked = _columns_from_mapping(overrides, "reader options")
        mapping = replace(mapping, delimiter=checked.delimiter or mapping.delimiter,
                          encoding=checked.encoding if encoding is not None else mapping.encoding)
    return read_catalog_csv(path, mapping, root=root)


def read_catalog_csv(path: Path, mapping: ColumnMap | None = None, root: Path | None = None) -> SampleTable:
    """One sample per row of the CSV at ``path``, columns as ``mapping`` says. Every error is an
    :class:`AnnotationError` naming the file, the line and (for a cell) the column."""
    path = Path(path)
    mapping = mapping or ColumnMap()
    text = _decode(path, mapping.encoding)
    header_line = text.split("\n", 1)[0]
    delimiter = mapping.delimiter or _delimiter_of(header_line)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise AnnotationError(path, 1, "the file is empty; expected a header line naming the columns")
        header = [cell.strip() for cell in header]
        where = _resolve_columns(path, header, mapping)
        samples: list[Sample] = []
        multi: set[str] = set()
        first_line: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue  # spreadsheets end with empty rows (";;;;")
            if len(row) < len(header) or any(cell.strip() for cell in row[len(header):]):
                raise AnnotationError(path, line, f"wrong number of columns: expected {len(header)}, got {len(row)}"
                                      f" (delimiter {delimiter!r})")
            sample = _row_sample(path, line, row, where)
            if sample.path in first_line:
                raise AnnotationError(path, line, f"{sample.path} is listed again (first on line "
                                      f"{first_line[sample.path]}); the table has one row per image")
            first_line[sample.path] = line
            multi.update(k for k, v in sample.attributes.items() if isinstance(v, tuple))
            samples.append(sample)
    except csv.Error as exc:
        raise AnnotationError(path, reader.line_num, str(exc)) from None
    return SampleTable(samples, root if root is not None else path.parent, path.stem, sorted(multi))


def _decode(path: Path, encoding: str) -> str:
    raw = path.read_bytes()
    if _is_image_bytes(raw[:16]):
        raise AnnotationError(path, None, "is an image, not a CSV table; give it an image suffix "
                              f"({', '.join(sorted(IMAGE_SUFFIXES))}) to use it as a one-image catalog")
    try:
        # utf-8-sig drops the byte-order mark Excel writes
        return raw.decode("utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        hint = ("re-save the file as UTF-8, or pass its encoding (encoding: cp1252 in the column mapping)"
                if encoding == "utf-8" else "check the encoding given")
        raise AnnotationError(path, line, f"not {'UTF-8' if encoding == 'utf-8' else encoding} text "
                              f"({exc.reason}); {hint}") from None


def _delimiter_of(header_line: str) -> str:
    """The delimiter that splits the header into the most columns (comma when none does):
    spreadsheets in many locales export with semicolons."""
    best, best_count = ",", 1
    for delimiter in DELIMITERS:
        try:
            count = len(next(csv.reader([header_line], delimiter=delimiter)))
        except (csv.Error, StopIteration):
            continue
        if count > best_count:
            best, best_count = delimiter, count
    return best


@dataclass(frozen=True)
class _Columns:
    """Header positions of each role (None: absent) and of each attribute column."""
    roles: dict[str, int | None]
    attributes: dict[str, int]
    names: list[str]


def _resolve_columns(path: Path, header: list[str], mapping: ColumnMap) -> _Columns:
    positions: dict[str, int] = {}
    for index, name in enumerate(header):
        positions.setdefault(name, index)

    def find(column: str, what: str) -> int:
        if column in positions:
            index = positions[column]
            if header.count(column) > 1:
                raise AnnotationError(path, 1, f"column {quote(column, 60)} ({what}) appears "
                                      f"{header.count(column)} times in the header")
            return index
        close = difflib.get_close_matches(column, header, n=1)
        hint = f" (did you mean {quote(close[0], 60)}?)" if close else ""
        raise AnnotationError(path, 1, f"no column {quote(column, 60)} for {what}{hint}; the header has "
                              f"{', '.join(quote(h, 40) for h in header)}")

    roles: dict[str, int | None] = {}
    for role, default in ROLE_DEFAULTS.items():
        if role in mapping.roles:
            roles[role] = find(mapping.roles[role], role)
        elif role in REQUIRED_ROLES:
            if default not in positions:
                raise AnnotationError(path, 1, f"no {quote(default)} column; the header has "
                                      f"{', '.join(quote(h, 40) for h in header)}: name the image and item id "
                                      f"columns with a column mapping, e.g. --columns path=image,item_id=sku")
            roles[role] = positions[default]
        else:
            roles[role] = positions.get(default)
    attributes = {name: find(column, f"attribute '{name}'") for name, column in mapping.attributes.items()}
    used = [index for index in roles.values() if index is not None]
    for name, index in attributes.items():
        if index in used:
            raise AnnotationError(path, 1, f"column {quote(header[index], 60)} is both attribute '{name}' and "
                                  "another role")
    return _Columns(roles, attributes, header)


def _row_sample(path: Path, line: int, row: list[str], columns: _Columns) -> Sample:
    def cell(role: str) -> str:
        index = columns.roles[role]
        return row[index].strip() if index is not None else ""

    def fail(role_or_column: int | None, problem: str) -> AnnotationError:
        named = f"column {quote(columns.names[role_or_column], 60)}: " if role_or_column is not None else ""
        return AnnotationError(path, line, f"{named}{problem}")

    image, item_id = cell("path"), cell("item_id")
    if not image:
        raise fail(columns.roles["path"], "empty path")
    if not item_id:
        raise fail(columns.roles["item_id"], "empty item_id")
    domain = DOMAIN_VALUES.get(cell("domain").lower())
    if domain is None:
        raise fail(columns.roles["domain"], f"domain must be one of consumer, shop, unknown (or empty), "
                   f"got {quote(cell('domain'), 40)}")
    split = SPLIT_VALUES.get(cell("split").lower())
    if split is None:
        raise fail(columns.roles["split"], f"split must be one of train, val, test, query, gallery, unknown "
                   f"(or empty), got {quote(cell('split'), 40)}")
    if columns.roles["query"] is not None and split not in ("train", "val"):
        flag = cell("query").lower()
        if flag not in QUERY_TRUE | QUERY_FALSE:
            raise fail(columns.roles["query"], f"query must be yes or no (1/0, true/false, x or empty), "
                       f"got {quote(cell('query'), 40)}")
        # a benchmark photo: the query flag decides its side; training rows keep their split
        split = "query" if flag in QUERY_TRUE else "gallery"
    try:
        attributes = _attributes(cell("attributes_json") or None)
    except ValueError as exc:
        raise fail(columns.roles["attributes_json"], str(exc)) from None
    for name, index in columns.attributes.items():
        value = row[index].strip()
        if value:
            attributes[name] = value
    bbox = None
    if cell("bbox"):
        try:
            bbox = parse_bbox_cell(cell("bbox"))
        except ValueError as exc:
            raise fail(columns.roles["bbox"], str(exc)) from None
    return Sample(path=image, item_id=item_id, domain=domain, split=split, category=cell("category") or None,
                  attributes=attributes, bbox=bbox)


def _is_image_bytes(head: bytes) -> bool:
    """The file's first bytes are those of a JPEG, PNG, GIF, BMP, WebP or TIFF file."""
    return (head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00",
                             b"MM\x00*")) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"))


def is_image_file(path: Path) -> bool:
    """An image by its suffix, or by its first bytes (a photo saved without a suffix)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return False
    try:
        with open(path, "rb") as handle:
            return _is_image_bytes(handle.read(16))
    except OSError:
        return False


def read_catalog(path: str | Path, format: str | None = None, columns: str | Mapping[str, Any] | None = None,
                 **options: Any) -> SampleTable:
    """Whatever a command is given as a catalog:

    - one image file: a catalog of that one image (its file stem is the item id);
    - a CSV file: the ``csv`` reader, with the column mapping ``columns``;
    - a folder with ``format``: that dataset reader (``csv``: the folder's ``catalog.csv``, or
      ``options['file']``);
    - a folder of images: every image is its own item (file stem = item id);
    - a folder of class folders (``<class>/<image>``, optionally in split folders): ``folder``.
    """
    path = Path(path)
    if not path.exists():
        raise AnnotationError(path, None, "no such file or folder")
    if columns and format not in (None, "csv"):
        raise ConfigError(f"a column mapping is for the csv format; the {format} format has fixed files")
    if path.is_file():
        if is_image_file(path):
            if columns or options:
                raise ConfigError(f"{path}: is one image; a column mapping or reader options need a CSV table")
            require_utf8_path(path)
            return SampleTable([Sample(path=path.name, item_id=path.stem, domain="shop")], path.parent, path.stem)
        if format not in (None, "csv"):
            raise AnnotationError(path, None, f"the {format} format reads a dataset folder, not a file")
        if "file" in options:
            raise ConfigError(f"{path}: is the catalog file itself; the option file= names a CSV inside a folder")
        return read_csv(path.parent, file=path.name, columns=columns, **options)
    if format is not None:
        return READERS.build(format, root=path, **({"columns": columns} if columns else {}), **options)
    if columns or options:
        return read_csv(path, columns=columns, **options)
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file()):
        samples = [Sample(path=p.name, item_id=p.stem, domain="shop") for p in image_files(path)]
        check_unique_items(samples, path)  # x.jpg and x.png would be one item, as in the folder reader
        return SampleTable(samples, path, path.name)
    return read_folder(path)


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
