"""The shipped recipes (configs/*.yaml), findable by name from an installed wheel or a checkout.

The wheel carries them in ``fashion_retrieval/configs/`` (setup.py maps the top-level
``configs/`` folder to it); in a checkout whose install predates that, the folder beside ``src/``
is used. ``--config viton_mmfl_net`` then works from any directory, and a path to your own YAML
works as before.
"""
from __future__ import annotations

from pathlib import Path

from .names import name_problem
from .registry import ConfigError

SUFFIX = ".yaml"


def recipe_dir() -> Path | None:
    """The folder of shipped recipes, or None when neither the package nor a checkout has one."""
    # an installed wheel: the recipes are a folder inside the package (a namespace package, so
    # importlib.resources would give a multiplexed path rather than a folder)
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "configs"
    return checkout if checkout.is_dir() else None


def recipe_names() -> list[str]:
    folder = recipe_dir()
    return sorted(p.stem for p in folder.glob(f"*{SUFFIX}")) if folder else []


def resolve_recipe(config: str | Path) -> Path:
    """``config`` when it is a file; else the shipped recipe of that name (``viton_mmfl_net`` or
    ``viton_mmfl_net.yaml``); else a ConfigError listing the close names."""
    path = Path(config)
    if path.is_file():
        return path
    text = str(config)
    name = text[: -len(SUFFIX)] if text.endswith(SUFFIX) else text
    if name_problem(name, component=True) is None:  # a plain name, never a path into the package
        folder = recipe_dir()
        if folder is not None and (folder / f"{name}{SUFFIX}").is_file():
            return folder / f"{name}{SUFFIX}"
    import difflib

    close = difflib.get_close_matches(Path(name).name, recipe_names(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `fashion-retrieval recipes` lists the shipped ones"
    raise ConfigError(f"{config}: config file not found, and no shipped recipe has that name{hint}")


def describe(path: Path) -> str:
    """A recipe's ``description`` (its first line), or '' when it has none or cannot be read."""
    from .files import read_yaml

    try:
        data = read_yaml(path, ConfigError)
    except (ConfigError, OSError):
        return ""
    return str(data.get("description", "")).splitlines()[0] if isinstance(data, dict) and data.get("description") else ""
