"""`fashion-retrieval data check|formats`: read a dataset in its official format and report on it."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False)

USAGE_ERROR = 2
DATA_ERROR = 1


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _reader_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _fail(f"--option expects KEY=VALUE, got '{pair}'", USAGE_ERROR)
        options[key.strip()] = value
    return options


@app.command()
def check(
    root: Annotated[Path, typer.Option("--root", "-r", help="The dataset's folder, or your catalog: a CSV "
                                       "table, a folder of images or one image.")],
    format_name: Annotated[Optional[str], typer.Option("--format", "-f", help="Dataset format (see `data "
                                                       "formats`); default: csv for a file, else images")] = None,
    columns: Annotated[Optional[str], typer.Option("--columns", help="The CSV's own column names: ROLE=COLUMN,"
                                                   "...,ATTRIBUTE_COLUMN,... or a .yaml mapping "
                                                   "(docs/datasets.md).")] = None,
    verify_images: Annotated[bool, typer.Option("--verify-images/--no-verify-images",
                                                help="Decode every image and list the unreadable ones.")] = True,
    workers: Annotated[int, typer.Option("--workers", "-j", min=1, help="Threads decoding images.")] = 4,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o",
                                                        help="Reader option KEY=VALUE, repeatable.")] = None,
) -> None:
    """Read a dataset, print its counts and list unreadable images.

    Exit code 0 even when some images are unreadable (they are listed); 1 for a malformed
    annotation file; 2 for a missing root, an unknown format or a bad --option.
    """
    from rich.console import Console
    from rich.progress import Progress

    from ..registry import ConfigError
    from .check import render, summarize, verify_images as verify
    from .readers import READERS
    from .readers.catalog import parse_columns, read_catalog
    from .table import AnnotationError

    try:
        if format_name is not None:
            READERS.get(format_name)
    except ConfigError as exc:
        raise _fail(str(exc), USAGE_ERROR) from None
    if not root.exists():
        raise _fail(f"root {root} does not exist", USAGE_ERROR)
    try:
        table = read_catalog(root, format_name, parse_columns(columns, "--columns"), **_reader_options(option or []))
    except ConfigError as exc:
        raise _fail(str(exc), USAGE_ERROR) from None
    except (AnnotationError, OSError, ValueError) as exc:
        raise _fail(str(exc), DATA_ERROR) from None

    console = Console()
    images = None
    if verify_images:
        with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
            task = progress.add_task("decoding images", total=len(table))
            images = verify(table, workers=workers, advance=lambda: progress.advance(task))
    render(console, f"{format_name or 'catalog'} at {root}", summarize(table), images)


@app.command()
def formats() -> None:
    """List the dataset formats `data check` and training configs accept."""
    from .readers import READERS

    for name in READERS.names():
        typer.echo(name)
