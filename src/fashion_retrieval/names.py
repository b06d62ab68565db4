"""Names from data that become paths or identifiers: one rule for all of them.

Attribute names (a catalog CSV's ``attributes`` keys, a checkpoint's ``meta.json``), space
names in an ``index.json``, recipe names, item ids: all of them are text somebody else wrote.
Where such a name becomes a folder or a Milvus collection, it goes through this module:

- :func:`check_name` refuses what no name should be (empty, ``.``, ``..``, NUL and other control
  characters, absurdly long) with one line naming the file/line or key and the name; with
  ``component=True`` it also refuses path separators, for names that are used verbatim as one
  folder name (a recipe's ``name`` → ``runs/<name>``).
- :func:`path_component` maps any name to one safe folder name: a plain ``[A-Za-z0-9_-]`` name
  stays as it is (so folders written before this rule keep their names), anything else becomes
  an ASCII slug plus a short sha256 of the name, separated by a ``.`` that a plain name never
  contains: stable, unique and never a path. Writers record name → component (``index.json``
  ``space_dirs``) so the mapping can be read back rather than recomputed.
- :func:`milvus_identifier` does the same for Milvus collection names, which must match
  ``^[A-Za-z_][A-Za-z0-9_]*$``.

A mapped name can still be a symlink planted in a folder: every destructive step also checks
:func:`fashion_retrieval.files.ensure_inside`.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

from .files import quote

MAX_NAME_LENGTH = 200  # characters; longer is no attribute, recipe or space name anyone types
PLAIN = re.compile(r"[A-Za-z0-9_-]{1,100}")
MILVUS_PLAIN = re.compile(r"[A-Za-z0-9_]{1,100}")
MILVUS_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
DIGEST_CHARS = 12  # 48 bits of sha256: a collision between two names of one index is not a concern
SLUG_CHARS = 40
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SEPARATORS = ("/", "\\")


class UnsafeNameError(ValueError):
    """A name that cannot be used; the message names where it came from and quotes it."""


def name_problem(name: object, component: bool = False) -> str | None:
    """Why ``name`` is refused, or None. ``component``: it is also used verbatim as one folder name."""
    if not isinstance(name, str):
        return f"must be text, got {type(name).__name__}"
    if not name or not name.strip():
        return "is empty"
    if name in (".", ".."):
        return "is a relative folder reference, not a name"
    found = _CONTROL.search(name)
    if found:
        return f"contains a control character ({found.group()!r})"
    if len(name) > MAX_NAME_LENGTH:
        return f"is longer than {MAX_NAME_LENGTH} characters"
    if component:
        if any(sep in name for sep in _SEPARATORS):
            return "contains a path separator ('/' or '\\')"
        if name != name.strip():
            return "starts or ends with white space"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes of a name that was not UTF-8
        return "is not valid UTF-8 text"
    return None


def control_character(text: str) -> str | None:
    """The first control character in ``text`` (terminal escapes, NUL, newline), or None."""
    found = _CONTROL.search(text)
    return found.group() if found else None


def printable(text: object) -> str:
    """``text`` safe to print to a terminal: control characters (an ESC starting a terminal
    escape sequence, a newline) shown as ``\\x1b``-style escapes instead of acting."""
    return _CONTROL.sub(lambda found: found.group().encode("unicode_escape").decode("ascii"), str(text))


def check_name(name: object, what: str, where: str, error: type[Exception] = UnsafeNameError,
               component: bool = False) -> str:
    """``name`` if acceptable; else ``error("<where>: <what> <quoted name> <why>")``.

    ``where`` is the file and line (``catalog.csv:12``) or the key (``recipe.yaml: name``).
    """
    problem = name_problem(name, component)
    if problem is not None:
        raise error(f"{where}: {what} {quote(name, 80)} {problem}")
    return name  # type: ignore[return-value]


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:DIGEST_CHARS]


def _slug(name: str, joiner: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^A-Za-z0-9]+", joiner, ascii_text).strip(joiner)[:SLUG_CHARS].strip(joiner)


def path_component(name: str) -> str:
    """One folder name for ``name``: itself when plain, else ``<slug>.<sha256[:12]>``.

    ``Ärmel länge`` → ``Armel-lange.<digest>``, ``../../x`` → ``x.<digest>``, ``..`` →
    ``name.<digest>``. The result never contains a separator, never starts with a dot and is
    never ``.``/``..``; two different names give two different components.
    """
    if PLAIN.fullmatch(name):
        return name
    return f"{_slug(name, '-') or 'name'}.{_digest(name)}"


def milvus_identifier(name: str, prefix: str = "space_") -> str:
    """A Milvus collection (or field) name for ``name``: ``prefix + name`` when that is already
    a valid identifier (collections created before this rule keep their names), else
    ``prefix + slug + '_' + sha256[:12]``."""
    if not MILVUS_IDENTIFIER.fullmatch(prefix + "x"):
        raise ValueError(f"Milvus prefix {prefix!r} cannot start an identifier")
    if MILVUS_PLAIN.fullmatch(name):
        return prefix + name
    slug = _slug(name, "_")
    return f"{prefix}{slug + '_' if slug else ''}{_digest(name)}"


def is_component(text: object) -> bool:
    """True when ``text`` (read back from a file) is one harmless folder name: what
    :func:`path_component` makes, or a name an older version used verbatim that has no
    separator, no control character and is not ``.``/``..``."""
    return name_problem(text, component=True) is None and not str(text).startswith(".")
