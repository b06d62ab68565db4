"""Line-oriented parsing shared by the readers of the official dataset releases, and the CSV
reading and split convention shared by the readers of the shared data folder.

Every problem is raised as :class:`AnnotationError` naming the file and the 1-based line, so a
user with a 300,000-line annotation file can open it at the right place. Files are streamed
line by line because some (DeepFashion's ``list_attr_img.txt``) are close to a gigabyte.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterator

from ..table import AnnotationError, bbox_problem, read_utf8_text

BBox = tuple[float, float, float, float]


class MissingAnnotationFile(AnnotationError, FileNotFoundError):
    """An expected annotation file does not exist; catchable as either base class."""

    def __init__(self, path: str | Path, hint: str = ""):
        super().__init__(path, None, "file not found" + (f" ({hint})" if hint else ""))


def require_file(path: Path, hint: str = "") -> Path:
    if not path.is_file():
        raise MissingAnnotationFile(path, hint)
    return path


def iter_lines(path: Path, encoding: str = "utf-8", keep_blank: bool = False) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every non-blank line (every line with ``keep_blank``), without
    the line break.

    A byte-order mark on the first line is dropped. Text that does not decode raises an
    AnnotationError on the offending line instead of Python's UnicodeDecodeError, which names
    neither the file nor the line.
    """
    require_file(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise AnnotationError(path, number, f"not {encoding} text ({exc.reason} at byte {exc.start} "
                                      "of the line); re-save the file as UTF-8") from None
            if number == 1:
                text = text.removeprefix("\ufeff")
            text = text.rstrip("\r\n")
            if keep_blank or text.strip():
                yield number, text


def counted_rows(path: Path, first_column: str | None = None, has_header: bool = True,
                 encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Data rows of a DeepFashion list file: line 1 is the row count, line 2 the column names.

    ``first_column``, when given, must be the first column name of the header, which catches a
    file of another benchmark passed by mistake. The count is checked once the rows have been
    read, so a truncated download fails instead of silently losing images.
    """
    lines = iter_lines(path, encoding)
    count_line, count_text = next(lines, (1, ""))
    try:
        expected = int(count_text.strip())
    except ValueError:
        raise AnnotationError(path, count_line, f"expected the number of rows on the first line, got "
                              f"{count_text.strip()[:40]!r}") from None
    if has_header:
        header_line, header = next(lines, (count_line + 1, ""))
        names = header.split()
        if not names:
            raise AnnotationError(path, header_line, "expected a header line of column names")
        if first_column is not None and names[0] != first_column:
            raise AnnotationError(path, header_line, f"header should start with '{first_column}', got "
                                  f"'{names[0]}': is this the right file?")
    seen = 0
    last_line = count_line
    for last_line, text in lines:
        seen += 1
        yield last_line, text
    if seen != expected:
        raise AnnotationError(path, count_line, f"the first line says {expected} rows but the file has {seen} "
                              "(truncated or edited file?)")


def fields(path: Path, line: int, text: str, count: int | None = None, minimum: int | None = None) -> list[str]:
    """Whitespace-separated columns of a row, with its column count checked."""
    columns = text.split()
    if count is not None and len(columns) != count:
        raise AnnotationError(path, line, f"expected {count} columns, got {len(columns)}")
    if minimum is not None and len(columns) < minimum:
        raise AnnotationError(path, line, f"expected at least {minimum} columns, got {len(columns)}")
    return columns


def parse_int(path: Path, line: int, token: str, what: str, low: int | None = None,
              high: int | None = None) -> int:
    """An integer column, optionally within ``low..high`` (inclusive)."""
    try:
        value = int(token)
    except ValueError:
        raise AnnotationError(path, line, f"{what} must be an integer, got {token!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise AnnotationError(path, line, f"{what} must be in {bounds}, got {value}")
    return value


def parse_number(path: Path, line: int | None, token: Any, what: str) -> float:
    try:
        value = float(token)
    except (TypeError, ValueError):
        raise AnnotationError(path, line, f"{what} must be a number, got {token!r}") from None
    if not math.isfinite(value):
        raise AnnotationError(path, line, f"{what} must be finite, got {token!r}")
    return value


def parse_bbox(path: Path, line: int, tokens: list[str], scale: float = 1.0) -> BBox:
    """``x_1 y_1 x_2 y_2`` columns as a box, checked to have its corners in order."""
    x1, y1, x2, y2 = (parse_number(path, line, t, name) for t, name in zip(tokens, ("x_1", "y_1", "x_2", "y_2")))
    return checked_bbox(path, line, (x1 * scale, y1 * scale, x2 * scale, y2 * scale))


def checked_bbox(path: Path, line: int | None, box: BBox, where: str = "") -> BBox:
    # scaled or summed (left + width) corners can overflow to inf even from finite columns
    problem = bbox_problem(box)
    if problem is not None:
        raise AnnotationError(path, line, f"{where}{problem}")
    return box


def read_json(path: Path) -> Any:
    """A JSON file; syntax errors name the line the decoder stopped at."""
    require_file(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise AnnotationError(path, line, f"not UTF-8 text ({exc.reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(path, exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise AnnotationError(path, None, "invalid JSON: nested too deeply") from None


def image_folder_parts(path: str) -> tuple[str | None, str | None]:
    """``img/<A>/<B>/<item>/<file>`` → (``"A/B"``, ``"<item>"``); None where the path is shorter.

    DeepFashion's retrieval benchmarks keep category folders and one folder per product.
    """
    parts = path.split("/")
    if len(parts) < 3:
        return None, None
    category = "/".join(parts[1:-2]) or None
    return category, parts[-2]


# ---- the shared data folder's conventions (fashion_product, viton) ----
def split_by_number(number: int) -> str:
    """The shared convention: last digit 0 or 5 is test, 9 is validation, the rest train."""
    last_digit = number % 10
    if last_digit in (0, 5):
        return "test"
    return "val" if last_digit == 9 else "train"


def csv_rows(path: Path, required: tuple[str, ...]) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Header and ``(line, row)`` pairs of a CSV whose rows must all have the header's width."""
    if not path.is_file():
        raise AnnotationError(path, None, "file not found")
    reader = csv.reader(io.StringIO(read_utf8_text(path), newline=""))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise AnnotationError(path, 1, "empty file: expected a header line") from None
    except csv.Error as exc:
        raise AnnotationError(path, 1, str(exc)) from None
    missing = [name for name in required if name not in header]
    if missing:
        raise AnnotationError(path, 1, f"header lacks column(s) {', '.join(missing)}; got {','.join(header)}")

    def rows() -> Iterator[tuple[int, list[str]]]:
        try:
            for row in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise AnnotationError(path, line, f"expected {len(header)} columns, got {len(row)}")
                yield line, row
        except csv.Error as exc:
            raise AnnotationError(path, reader.line_num, str(exc)) from None

    return header, rows()
