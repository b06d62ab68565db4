"""`fashion-retrieval index build|add|remove` and `fashion-retrieval search`."""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True)
COLUMNS_HELP = ("the CSV's own column names, ROLE=COLUMN,...,ATTRIBUTE_COLUMN,... "
                "(e.g. path=image,item_id=sku,category=group,colour) or a .yaml mapping; docs/datasets.md")


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
    from .embedders import EmbedderError
    from .catalog import UnknownSpaceError
    from .filters import FilterError
    from .store import StoreError

    from ..rerank import RerankError

    errors = (AnnotationError, CheckpointError, ConfigError, StoreError, EmbedderError, ImageLoadError,
              UnknownSpaceError, FilterError, RerankError, OSError)
    # an unreachable or refusing Milvus server; pymilvus is loaded only where a Milvus store ran:
    # importing it here would start gRPC's threads in every FAISS command, and they print errors
    milvus = sys.modules.get("pymilvus.exceptions")
    return errors if milvus is None else (*errors, milvus.MilvusException)


@app.command("build")
def build(
    checkpoint: Annotated[Path, typer.Option(help="run directory or model.safetensors of a trained model")],
    images: Annotated[Path, typer.Option(help="CSV table, one image, folder of images, or dataset root (with --format)")],
    out: Annotated[Path, typer.Option(help="index directory to write")],
    kind: Annotated[Kind, typer.Option(help="FAISS index kind")] = Kind.flat,
    attribute: Annotated[Optional[list[str]], typer.Option(help="attribute space(s); default: all the model has")] = None,
    format: Annotated[Optional[str], typer.Option(help="dataset format of --images (see `data formats`)")] = None,
    columns: Annotated[Optional[str], typer.Option(help=COLUMNS_HELP)] = None,
    split: Annotated[Optional[list[str]], typer.Option(help="keep only these splits")] = None,
    domain: Annotated[Optional[str], typer.Option(help="keep only this domain (shop, consumer)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 64,
    store: Annotated[Store, typer.Option(help="vector store: faiss (embedded) or milvus")] = Store.faiss,
    milvus_uri: Annotated[Optional[str], typer.Option(
        help="with --store milvus: a Milvus server, e.g. http://localhost:19530 (token from MILVUS_TOKEN); "
             "default: milvus-lite files inside --out")] = None,
    device: str = "cpu",
    flip: Annotated[bool, typer.Option(
        "--flip", help="store flip-averaged vectors (each photo and its mirror; twice the embedding time); "
                       "recorded in the index, so its queries are embedded the same way")] = False,
) -> None:
    """Embed a catalog and write a persistent index (atomically)."""
    from ..data.readers.catalog import parse_columns
    from .build import build_index

    try:
        report = build_index(checkpoint, images, out, kind.value, attribute, format, split, domain,
                             batch_size, store.value, device, columns=parse_columns(columns, "--columns"),
                             milvus_uri=milvus_uri, flip=flip)
    except _known_errors() as exc:
        _fail_writing(exc, out)
    _report(report, "indexed")


@app.command("add")
def add(
    index: Annotated[Path, typer.Option(help="index directory")],
    images: Annotated[Path, typer.Option(help="CSV table, one image, folder of images, or dataset root (with --format)")],
    format: Annotated[Optional[str], typer.Option()] = None,
    columns: Annotated[Optional[str], typer.Option(help=COLUMNS_HELP)] = None,
    split: Annotated[Optional[list[str]], typer.Option()] = None,
    domain: Annotated[Optional[str], typer.Option()] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 64,
    device: str = "cpu",
) -> None:
    """Add images to an existing index with its own model, without a rebuild."""
    from ..data.readers.catalog import parse_columns
    from .build import add_to_index

    try:
        report = add_to_index(index, images, format, split, domain, batch_size, device,
                              columns=parse_columns(columns, "--columns"))
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
    query: Annotated[Path, typer.Argument(help="query photo, a folder of photos, or a CSV with a 'path' column")],
    index: Annotated[Path, typer.Option(help="index directory")],
    attribute: Annotated[Optional[str], typer.Option(help="search within this attribute's space")] = None,
    top_k: Annotated[int, typer.Option(min=1, max=10_000)] = 10,
    filter: Annotated[Optional[list[str]], typer.Option(
        "--filter", help="FIELD=VALUE: only items whose metadata field (category, domain, item_id or an "
                         "attribute such as gender) has this value; repeat a field to accept either value")] = None,
    ids_file: Annotated[Optional[Path], typer.Option(help="only these items: a text file, one item id per line")] = None,
    out: Annotated[Optional[Path], typer.Option(help="write the results to this .json or .csv file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    onnx: Annotated[Optional[Path], typer.Option(help="embed the query with this ONNX export")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096, help="photos embedded at once (folder or CSV)")] = 32,
    grid: Annotated[Optional[Path], typer.Option(help="also draw the results as a PNG: one row per query photo, "
                                                      "its top results beside it")] = None,
    flip: Annotated[Optional[bool], typer.Option(
        "--flip/--no-flip", help="flip-average the query photos' embeddings (default: as the index was "
                                 "built, index build --flip)")] = None,
    query_expansion: Annotated[Optional[str], typer.Option(
        "--query-expansion", help="k,alpha: search again with the query expanded by its k nearest items "
                                  "(α-QE, e.g. 5,3; docs/metrics.md: gains mAP and top-1 on consumer-to-shop "
                                  "categories, loses top-5..50)")] = None,
) -> None:
    """Ranked catalog items for a photo, or for every photo of a folder or CSV (batch)."""
    from ..api import Index, query_files
    from .catalog import CatalogIndex
    from .filters import SearchFilter

    if out is not None and out.suffix.lower() not in (".json", ".csv"):
        _fail(f"{out}: --out must end in .json or .csv")
    if grid is not None and grid.suffix.lower() != ".png":
        _fail(f"{grid}: --grid must end in .png")
    try:
        expansion = None
        if query_expansion is not None:
            from ..rerank import QueryExpansion

            expansion = QueryExpansion.parse(query_expansion)
        where = SearchFilter.parse(filter or [], _read_ids(ids_file) if ids_file is not None else None)
        searcher = Index(CatalogIndex.open(index), onnx=onnx, flip=flip)
        where = searcher.prepare(attribute, where)  # a bad attribute or field fails before the model loads
        batch = query.is_dir() or query.suffix.lower() == ".csv"
        photos = query_files(query)
        if out is not None:
            _check_out(out)
        if not batch:
            hits = searcher.search(photos[0], top_k, attribute, where, query_expansion=expansion)
            answers = [(str(query), hits, None)]
        else:
            answers = list(searcher.search_files(photos, top_k, attribute, where, batch_size=batch_size,
                                                 query_expansion=expansion))
    except _known_errors() as exc:
        _fail(str(exc))
    unreadable = [(q, why) for q, _, why in answers if why is not None]
    for photo, why in unreadable[:20]:
        typer.secho(f"skipped {photo}: {why}", fg="yellow", err=True)
    if batch and len(unreadable) == len(answers):
        _fail(f"{query}: none of the {len(answers)} query photos could be read")
    filters = where.to_dict() if where is not None else None
    if grid is not None:
        _draw_grid(grid, answers, attribute)
    if out is not None:
        try:
            _write_results(out, answers, attribute, filters)
        except OSError as exc:
            _fail(f"{out}: could not write the results ({exc.strerror or exc})")
        typer.echo(f"wrote {len(answers) - len(unreadable)} of {len(answers)} queries' results to {out}"
                   + (f"; {len(unreadable)} unreadable skipped" if unreadable else ""), err=as_json)
        if not as_json:
            return
    if as_json or batch:
        document = _results_document(answers, attribute, filters, batch)
        typer.echo(json.dumps(document, indent=2, ensure_ascii=False))
        return
    _print_table(query, answers[0][1], attribute)


def _draw_grid(grid: Path, answers, attribute: Optional[str]) -> None:
    from .grid import GridRow, draw_grid

    rows = [GridRow(Path(query), [_row(hit) for hit in hits]) for query, hits, why in answers if why is None]
    try:
        _check_out(grid)
        draw_grid(rows, grid, title=f"same {attribute}" if attribute else None)
    except OSError as exc:
        _fail(f"{grid}: could not write the picture ({exc.strerror or exc})")
    except _known_errors() as exc:
        _fail(str(exc))
    typer.echo(f"drew {len(rows)} queries' results to {grid}", err=True)


def _check_out(out: Path) -> None:
    """Results are a file of their own: not a folder, and not inside an index, whose folder is
    replaced as a whole on its next save."""
    from ..files import artefact_kind
    from .store import StoreError

    if out.is_dir():
        raise StoreError(f"{out}: is a folder; --out names the .json or .csv file to write")
    for parent in out.resolve().parents:
        if artefact_kind(parent) == "index":
            raise StoreError(f"{out}: lies inside the index {parent}; choose another --out")


def _read_ids(path: Path) -> list[str]:
    """Item ids, one per line (blank lines skipped)."""
    from ..files import read_text
    from .filters import FilterError

    ids = [line.strip() for line in read_text(path, FilterError).splitlines() if line.strip()]
    if not ids:
        raise FilterError(f"{path}: no item ids (one per line)")
    return ids


def _row(hit) -> dict:
    return {"rank": hit.rank, "id": hit.id, "item_id": hit.item_id, "score": hit.score, "path": hit.path,
            "category": hit.category, "attributes": hit.attributes}


def _results_document(answers, attribute: Optional[str], filters, batch: bool) -> dict:
    if not batch:
        query, hits, _ = answers[0]
        return {"query": query, "attribute": attribute, "filters": filters, "results": [_row(h) for h in hits]}
    return {"attribute": attribute, "filters": filters,
            "queries": [{"query": query, "results": [_row(h) for h in hits]} if why is None
                        else {"query": query, "error": why} for query, hits, why in answers]}


CSV_COLUMNS = ("query", "rank", "id", "item_id", "score", "category", "path", "attributes", "error")


def _write_results(out: Path, answers, attribute: Optional[str], filters) -> None:
    """JSON (the --json document) or CSV (one row per result; an unreadable query gets one row
    with its error), written to a temporary file and renamed: a reader never sees half a file."""
    import csv
    import io

    from ..atomic import replacing

    if out.suffix.lower() == ".json":
        text = json.dumps(_results_document(answers, attribute, filters, batch=True), indent=2, ensure_ascii=False)
    else:
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(CSV_COLUMNS)
        for query, hits, why in answers:
            if why is not None:
                writer.writerow([query, "", "", "", "", "", "", "", why])
            for hit in hits or ():
                writer.writerow([query, hit.rank, hit.id, hit.item_id, f"{hit.score:.6f}", hit.category or "",
                                 hit.path or "", json.dumps(hit.attributes, ensure_ascii=False), ""])
        text = buffer.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out, "w", encoding="utf-8", newline="") as handle:  # open(): the umask's mode, not 0600
        handle.write(text + ("\n" if out.suffix.lower() == ".json" else ""))


def _print_table(query: Path, hits, attribute: Optional[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ..names import printable

    # ids and categories are a catalog author's text: plain Text (never rich markup, where
    # "[/x]" was a MarkupError traceback) with control characters shown, not sent to the terminal
    def cell(value: object) -> Text:
        return Text(printable("" if value is None else value))

    table = Table(title=Text(printable(query.name) + (f" · same {printable(attribute)}" if attribute else "")))
    for column in ("rank", "id", "score", "category", "path"):
        table.add_column(column, justify="right" if column in ("rank", "score") else "left")
    for hit in hits:
        table.add_row(str(hit.rank), cell(hit.id), f"{hit.score:.4f}", cell(hit.category), cell(hit.path))
    Console().print(table)
