"""`fashion-retrieval serve`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

DEFAULT_HOST = "127.0.0.1"  # loopback: exposing the server is a deliberate choice (--host 0.0.0.0)


def serve(
    index: Annotated[Path, typer.Option(help="index directory built by `index build`")],
    host: Annotated[str, typer.Option(help="address to bind; localhost only unless you choose otherwise")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    onnx: Annotated[Optional[Path], typer.Option(help="run the model from this ONNX export of the index's model")] = None,
    api_key_env: Annotated[Optional[str], typer.Option(help="env variable holding the key for write endpoints")] = None,
    max_upload_mb: Annotated[float, typer.Option(min=0.01, max=100)] = 10.0,
    max_pixels: Annotated[int, typer.Option(min=10_000, help="largest decoded upload, in pixels")] = 40_000_000,
    max_k: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
    max_concurrent: Annotated[int, typer.Option(min=1, max=256, help="uploads decoded at once")] = 4,
    device: str = "cpu",
    log_level: Annotated[str, typer.Option(help="uvicorn log level (info logs every request)")] = "info",
) -> None:
    """Serve an index over HTTP: web page at /, API at /search, docs at /docs."""
    import uvicorn

    from ..data.images import ImageLoadError
    from ..engine.checkpoint import CheckpointError
    from ..index.catalog import CatalogIndex
    from ..index.store import StoreError
    from .app import Limits, create_app
    from .embedders import EmbedderError, embedder_for_index

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            typer.secho(f"error: environment variable {api_key_env} is empty or unset", fg="red", err=True)
            raise typer.Exit(2)
    try:
        catalog = CatalogIndex.open(index)
        embedder = embedder_for_index(catalog, onnx, device)
        limits = Limits(int(max_upload_mb * 2**20), max_k, max_pixels, max_concurrent)
        app = create_app(index, embedder, api_key, limits)
    except (StoreError, CheckpointError, EmbedderError, ImageLoadError, ValueError, OSError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    if api_key is None:
        typer.echo("note: write endpoints (POST/DELETE /items) are open; use --api-key-env to protect them")
    typer.echo(f"serving {len(catalog)} items from {index} at http://{host}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
