"""`fashion-retrieval index build|add|remove` and `fashion-retrieval search`."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True)


class Kind(str, Enum):
    flat = "flat"
    ivf = "ivf"
    hnsw = "hnsw"
    ivfpq = "ivfpq"


class Store(str, Enum):
    faiss = "faiss"
    milvus = "milvus"


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def _fail_writing(exc: Exception, index: Path) -> None:
    """A failed write (a full disk) names no file of its own: name the index, which the atomic
    save left as it was."""
    if isinstance(exc, OSError) and not exc.filename:
        _fail(f"{index}: could not write the index ({exc.strerror or exc}); the previous index is unchanged")
    _fail(str(exc))


def _report(report, verb: str) -> None:
    typer.echo(f"{verb} {report.added} of {report.total} images into {report.index_dir} "
               f"(spaces: {', '.join(report.spaces)}); {len(report.skipped)} unreadable skipped")
    for line in report.skipped[:20]:
        typer.echo(f"  skipped {line}")
    if len(report.skipped) > 20:
        typer.echo(f"  … and {len(report.skipped) - 20} more")


def _known_errors():
    """Errors that are the user's input, not a bug: one line, no traceback."""
    from ..data.images import ImageLoadError
    from ..data.table import AnnotationError
    from ..engine.checkpoint import CheckpointError
    from ..registry import ConfigError
    from ..serve.embedders import EmbedderError
    from .catalog import UnknownSpaceError
    from .store import StoreError

    errors = (AnnotationError, CheckpointError, ConfigError, StoreError, EmbedderError, ImageLoadError,
              UnknownSpaceError, OSError)
    try:  # an unreachable or refusing Milvus server
        from pymilvus.exceptions import MilvusException
    except ImportError:
        return errors
    return (*errors, MilvusException)


@app.command("build")
def build(
    checkpoint: Annotated[Path, typer.Option(help="run directory or model.safetensors of a trained model")],
    images: Annotated[Path, typer.Option(help="folder of images, dataset root (with --format) or CSV table")],
    out: Annotated[Path, typer.Option(help="index directory to write")],
    kind: Annotated[Kind, typer.Option(help="FAISS index kind")] = Kind.flat,
    attribute: Annotated[Optional[list[str]], typer.Option(help="attribute space(s); default: all the model has")] = None,
    format: Annotated[Optional[str], typer.Option(help="dataset format of --images (see `data formats`)")] = None,
    split: Annotated[Optional[list[str]], typer.Option(help="keep only these splits")] = None,
    domain: Annotated[Optional[str], typer.Option(help="keep only this domain (shop, consumer)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 64,
    store: Annotated[Store, typer.Option(help="vector store: faiss (embedded) or milvus")] = Store.faiss,
    device: str = "cpu",
) -> None:
    """Embed a catalog and write a persistent index (atomically)."""
    from .build import build_index

    try:
        report = build_index(checkpoint, images, out, kind.value, attribute, format, split, domain,
                             batch_size, store.value, device)
    except _known_errors() as exc:
        _fail_writing(exc, out)
    _report(report, "indexed")


@app.command("add")
def add(
    index: Annotated[Path, typer.Option(help="index directory")],
    images: Annotated[Path, typer.Option(help="folder of images, dataset root (with --format) or CSV table")],
    format: Annotated[Optional[str], typer.Option()] = None,
    split: Annotated[Optional[list[str]], typer.Option()] = None,
    domain: Annotated[Optional[str], typer.Option()] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 64,
    device: str = "cpu",
) -> None:
    """Add images to an existing index with its own model, without a rebuild."""
    from .build import add_to_index

    try:
        report = add_to_index(index, images, format, split, domain, batch_size, device)
    except _known_errors() as exc:
        _fail_writing(exc, index)
    _report(report, "added")


@app.command("remove")
def remove(
    index: Annotated[Path, typer.Option(help="index directory")],
    ids: Annotated[list[str], typer.Argument(help="ids to remove")],
) -> None:
    """Remove items by id, without a rebuild."""
    from .build import remove_from_index

    try:
        removed = remove_from_index(index, ids)
    except _known_errors() as exc:
        _fail_writing(exc, index)
    typer.echo(f"removed {removed} of {len(ids)} ids from {index}")


def search(
    image: Annotated[Path, typer.Argument(help="query photo")],
    index: Annotated[Path, typer.Option(help="index directory")],
    attribute: Annotated[Optional[str], typer.Option(help="search within this attribute's space")] = None,
    top_k: Annotated[int, typer.Option(min=1, max=10_000)] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    onnx: Annotated[Optional[Path], typer.Option(help="embed the query with this ONNX export")] = None,
) -> None:
    """Ranked catalog items for a photo."""
    from ..data.images import load_rgb
    from ..serve.embedders import embedder_for_index
    from .catalog import CatalogIndex

    try:
        catalog = CatalogIndex.open(index)
        catalog.store(attribute)  # an unknown attribute fails before the model is loaded
        photo = load_rgb(image)
        embedder = embedder_for_index(catalog, onnx)
        vector = embedder.embed([photo], attribute)
        scores, ids = catalog.search(vector, top_k, attribute)
    except _known_errors() as exc:
        _fail(str(exc))
    rows = []
    for rank, (score, item_id) in enumerate(zip(scores[0].tolist(), ids[0]), 1):
        meta = catalog.get_metadata(item_id) or {}
        rows.append({"rank": rank, "id": item_id, "item_id": meta.get("item_id", item_id),
                     "score": round(float(score), 6), "path": meta.get("path"), "category": meta.get("category")})
    if as_json:
        typer.echo(json.dumps({"query": str(image), "attribute": attribute, "results": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ..names import printable

    # ids and categories are a catalog author's text: plain Text (never rich markup, where
    # "[/x]" was a MarkupError traceback) with control characters shown, not sent to the terminal
    def cell(value: object) -> Text:
        return Text(printable("" if value is None else value))

    table = Table(title=Text(printable(image.name) + (f" · same {printable(attribute)}" if attribute else "")))
    for column in ("rank", "id", "score", "category", "path"):
        table.add_column(column, justify="right" if column in ("rank", "score") else "left")
    for row in rows:
        table.add_row(str(row["rank"]), cell(row["id"]), f"{row['score']:.4f}", cell(row["category"]), cell(row["path"]))
    Console().print(table)
