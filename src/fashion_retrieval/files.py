"""Reading the project's own files and guarding the directories it writes.

Two rules every module follows:

- **Every file we read is parsed through a validating loader** that turns any failure (missing,
  unreadable, not UTF-8, not JSON, the wrong shape) into one exception whose message is one line
  naming the file (and the line, for JSON Lines). Callers pass the error type their command
  already reports as one line (``StoreError``, ``CheckpointError`` …).
- **No destructive step leaves the directory it owns**: before a write, a rename or an
  ``rmtree``, :func:`ensure_inside` checks that the resolved path (symlinks followed) lies inside
  the owning directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import yaml

MAX_QUOTED = 200  # characters of offending input an error message may quote
MAX_YAML_BYTES = 4 << 20  # a recipe is a few kilobytes
# Values a YAML document may hold once its aliases are expanded. A recipe has a few hundred; a
# "billion laughs" document of nine aliases nine levels deep has 9**9 and would take minutes
# (and gigabytes) to validate, print or merge, although PyYAML itself builds it in microseconds.
MAX_YAML_VALUES = 100_000


class FileFormatError(ValueError):
    """A file of ours that cannot be read or has the wrong content; one line naming the file."""


class OutsideDirectoryError(ValueError):
    """A path that would be written, renamed or removed outside the directory that owns it."""


def quote(value: Any, limit: int = MAX_QUOTED) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages stay one short line whatever
    the input (a 4,000-character name, a YAML alias bomb)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(text: str, limit: int = MAX_QUOTED) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_text(path: str | Path, error: type[Exception] = FileFormatError, max_bytes: int | None = None) -> str:
    path = Path(path)
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise error(f"{path}: larger than {max_bytes} bytes; not a file this project wrote")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (corrupt file?)") from None


def read_json(path: str | Path, error: type[Exception] = FileFormatError, expect: type = dict,
              max_bytes: int | None = None) -> Any:
    """A whole JSON file, checked to be of type ``expect`` (a JSON object by default)."""
    path = Path(path)
    text = read_text(path, error, max_bytes)
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        where = f":{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise error(f"{path}{where}: corrupt JSON ({message})") from None
    if expect is not None and not isinstance(data, expect):
        raise error(f"{path}: expected a JSON {_json_kind(expect)}, got {_json_kind(type(data))}")
    return data


def read_jsonl(path: str | Path, error: type[Exception] = FileFormatError) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each line of a JSON Lines file; any bad line is an error."""
    path = Path(path)
    text = read_text(path, error)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise error(f"{path}:{number}: corrupt JSON line") from None
        if not isinstance(item, dict):
            raise error(f"{path}:{number}: expected a JSON object, got {_json_kind(type(item))}")
        yield number, item


def require_keys(data: dict[str, Any], types: dict[str, type | tuple[type, ...]], path: str | Path,
                 error: type[Exception] = FileFormatError, line: int | None = None) -> None:
    """Each key present with a value of its type (``bool`` is not accepted for ``int``)."""
    where = f"{path}:{line}" if line is not None else str(path)
    for key, kind in types.items():
        if key not in data:
            raise error(f"{where}: missing '{key}'")
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise error(f"{where}: '{key}' must be {' or '.join(_json_kind(k) for k in kinds)}, got {quote(value, 60)}")


class _CountingLoader(yaml.SafeLoader):
    """SafeLoader that refuses a document whose aliases expand past ``max_values`` values, or
    that refers to itself (a recursive alias), before any Python object is built from it."""

    max_values = MAX_YAML_VALUES

    def compose_document(self):  # type: ignore[override]
        node = super().compose_document()
        _expanded_size(node, self.max_values)
        return node


class _TooLarge(Exception):
    def __init__(self, node: yaml.Node, problem: str):
        super().__init__(problem)
        self.node, self.problem = node, problem


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Number of values under ``root`` with every alias expanded; each distinct node is visited
    once (an alias is the same node object as its anchor), so this is cheap even for a bomb."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _TooLarge(node, "an alias refers to a value that contains it (recursive YAML)")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        if total > limit:
            raise _TooLarge(node, f"more than {limit} values once its aliases are expanded "
                                  "(a YAML alias bomb?)")
        sizes[key] = total
        return total

    return size(root)


def parse_yaml(text: str, source: str | Path, error: type[Exception] = FileFormatError,
               max_values: int = MAX_YAML_VALUES, text_if_invalid: bool = False) -> Any:
    """One YAML document, safely: no Python tags, and no alias bomb or recursive alias.

    ``text_if_invalid``: text that is not YAML is returned as it is (a command-line value such
    as ``name=a: b``) instead of being an error; a refused document is an error either way.
    """
    loader = _CountingLoader(text)
    loader.max_values = max_values
    try:
        return loader.get_single_data()
    except _TooLarge as exc:
        raise error(f"{source}:{exc.node.start_mark.line + 1}: refused: {exc.problem}") from None
    except yaml.YAMLError as exc:
        if text_if_invalid:
            return text
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{source}{where}: invalid YAML ({one_line(problem)})") from None
    except RecursionError:
        raise error(f"{source}: invalid YAML (nested too deeply)") from None
    except (ValueError, TypeError, OverflowError) as exc:
        # a scalar PyYAML recognises but cannot build: a 5,000-digit integer, a 13th month
        if text_if_invalid:
            return text
        raise error(f"{source}: invalid YAML (a value cannot be read: {one_line(str(exc), 120)})") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, error: type[Exception] = FileFormatError, max_bytes: int | None = MAX_YAML_BYTES,
              max_values: int = MAX_YAML_VALUES) -> Any:
    """A whole YAML file (see :func:`parse_yaml`); every failure is one line naming the file."""
    path = Path(path)
    return parse_yaml(read_text(path, error, max_bytes), path, error, max_values)


def _json_kind(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean",
            type(None): "null"}.get(kind, kind.__name__)


def ensure_inside(path: str | Path, owner: str | Path, what: str = "path") -> Path:
    """``path`` resolved (symlinks followed), refused unless it lies inside ``owner`` (resolved).

    Used before every write, rename and removal of a directory, so that a name from data, a
    symlink planted in an index, or a bug can never make the project touch another folder.
    """
    resolved_owner = Path(os.path.realpath(owner))
    resolved = Path(os.path.realpath(path))
    if resolved != resolved_owner and resolved_owner not in resolved.parents:
        raise OutsideDirectoryError(f"{path}: refusing to write this {what}: it resolves to {resolved}, "
                                    f"outside {resolved_owner}")
    return resolved


# ---- which artefact a folder holds --------------------------------------------------------------
# The names engine/checkpoint.py, engine/train.py and index/catalog.py give their files
# (tests/test_artefacts.py checks they still agree); kept here so that telling artefacts apart
# imports neither torch nor faiss.
RUN_MARKERS = ("model.safetensors", "checkpoint-last", "checkpoint-previous", "metrics.csv")
INDEX_MARKERS = ("index.json", "spaces")
EXPORT_SIDECAR_KEY = "parity_max_abs_diff"  # every sidecar export.py writes has it
ARTEFACT_NAMES = {"run": "a training run directory", "index": "an index directory", "export": "an ONNX export"}


def _is_export_file(path: Path) -> bool:
    sidecar = path.with_name(path.name + ".json")
    if not (path.is_file() and sidecar.is_file()):
        return False
    try:
        data = read_json(sidecar, max_bytes=1 << 20)
    except FileFormatError:
        return False
    return EXPORT_SIDECAR_KEY in data


def artefact_kind(path: str | Path) -> str | None:
    """``"run"``, ``"index"`` or ``"export"`` for what ``train``, ``index build`` or ``export``
    wrote at ``path`` (a folder, or an exported ``.onnx`` file), told by their marker files; None
    for anything else (a missing path, an empty or unrelated folder)."""
    path = Path(path)
    if path.is_file():
        return "export" if _is_export_file(path) else None
    if not path.is_dir():
        return None
    # an index holds a copy of its model (model/model.safetensors) but no run marker at its top
    if any((path / name).exists() for name in INDEX_MARKERS):
        return "index"
    if any((path / name).exists() for name in RUN_MARKERS):
        return "run"
    try:
        if any(_is_export_file(p) for p in path.glob("*.onnx")):
            return "export"
    except OSError:
        pass
    return None


def _enclosing_index(path: Path) -> Path | None:
    for parent in Path(os.path.abspath(path)).parents:
        if artefact_kind(parent) == "index":
            return parent
    return None


def refuse_other_artefact(path: str | Path, writing: str, error: type[Exception] = FileFormatError) -> None:
    """Refuse to write artefact ``writing`` ("run", "index", "export") at ``path`` when another
    kind of artefact is there, or when ``path`` lies inside an index (whose whole folder is
    replaced on its next save). One artefact can then never overwrite another: ``train --out
    INDEX``, ``index build --out RUN`` and ``export --out RUN/model.safetensors`` stop first."""
    path = Path(path)
    found = artefact_kind(path)
    what = {"run": "a training run", "index": "an index", "export": "an ONNX export"}[writing]
    if found is not None and found != writing:
        raise error(f"{path}: is {ARTEFACT_NAMES[found]}; refusing to write {what} over it (choose another --out)")
    index = _enclosing_index(path)
    if index is not None:
        raise error(f"{path}: lies inside the index {index}; refusing to write {what} there (choose another --out)")
    if writing == "export" and path.is_dir():
        raise error(f"{path}: is a folder; --out names the .onnx file to write")
    if writing == "export" and found is None:
        for existing in (path, path.with_name(path.name + ".json")):
            if existing.exists():
                raise error(f"{existing}: exists and is not part of an ONNX export; refusing to overwrite it "
                            "(choose another --out)")
