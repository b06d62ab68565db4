"""`fashion-retrieval serve`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer


def serve(
    index: Annotated[Path, typer.Option(help="index directory built by `index build`")],
    host: Annotated[str, typer.Option(help="address to bind; localhost only unless you choose otherwise")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    onnx: Annotated[Optional[Path], typer.Option(help="run the model from this ONNX export")] = None,
    api_key_env: Annotated[Optional[str], typer.Option(help="env variable holding the key for write endpoints")] = None,
    max_upload_mb: Annotated[float, typer.Option(min=0.01, max=100)] = 10.0,
    max_k: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
) -> None:
    """Serve an index over HTTP: API at /search, docs at /docs, web page at /."""
    import uvicorn

    from ..index.catalog import CatalogIndex
    from ..index.store import StoreError
    from .app import Limits, create_app
    from .embedders import load_embedder

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            typer.secho(f"error: environment variable {api_key_env} is empty or unset", fg="red", err=True)
            raise typer.Exit(2)
    try:
        catalog = CatalogIndex.open(index)
        embedder = load_embedder(catalog.model_info["checkpoint"], onnx)
        app = create_app(index, embedder, api_key, Limits(int(max_upload_mb * 2**20), max_k))
    except (StoreError, FileNotFoundError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    if api_key is None:
        typer.echo("note: write endpoints (POST/DELETE /items) are open; use --api-key-env to protect them")
    uvicorn.run(app, host=host, port=port, log_level="info")
