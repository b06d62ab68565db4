"""`fashion-retrieval serve`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, List, Optional

import typer

DEFAULT_HOST = "127.0.0.1"  # loopback: exposing the server is a deliberate choice (--host 0.0.0.0)
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}


def allowed_hosts_for(host: str, extra: list[str]) -> list[str]:
    """Host header values to answer: loopback names, the bound address unless it is a wildcard
    (clients cannot name 0.0.0.0), and whatever the operator lists (IPv6 literals bracketed, as
    they appear in a Host header)."""
    from .app import DEFAULT_ALLOWED_HOSTS

    names = list(DEFAULT_ALLOWED_HOSTS)
    for name in ([] if host in WILDCARD_HOSTS else [host]) + list(extra):
        name = name.strip().lower()
        if ":" in name and not name.startswith("["):
            name = f"[{name}]"
        if name and name not in names:
            names.append(name)
    return names


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
    max_decode_mb: Annotated[int, typer.Option(min=16, help="memory all uploads being decoded may hold together, "
                                                          "in MiB; a larger single decode is refused (413)")] = 512,
    allowed_host: Annotated[Optional[List[str]], typer.Option(
        help="a name clients reach the server by (Host header), besides localhost, 127.0.0.1, [::1] and --host; "
             "repeatable; '*' turns the check off (a proxy in front checks it)")] = None,
    allow_writes_without_key: Annotated[bool, typer.Option(
        help="accept POST/DELETE /items without --api-key-env (still refused from other sites' pages)")] = False,
    keep_alive_timeout: Annotated[float, typer.Option(min=0.1, help="seconds an idle kept-alive connection stays open")] = 5.0,
    header_timeout: Annotated[float, typer.Option(min=0.1, help="seconds a client has to send a request's headers")] = 10.0,
    body_timeout: Annotated[float, typer.Option(min=0.1, help="seconds a client has to send a request's body, "
                                                            "once its headers arrived")] = 60.0,
    limit_concurrency: Annotated[int, typer.Option(min=1, help="open connections (and requests) beyond which new "
                                                             "requests are answered 503")] = 128,
    reload_interval: Annotated[float, typer.Option(min=0, help="seconds between checks for a newer index generation "
                                                         "(written by `index add`/`remove`); 0: every request")] = 2.0,
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
    from .timeouts import timed_h11

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            typer.secho(f"error: environment variable {api_key_env} is empty or unset", fg="red", err=True)
            raise typer.Exit(2)
    try:
        catalog = CatalogIndex.open(index)
        embedder = embedder_for_index(catalog, onnx, device)
        limits = Limits(int(max_upload_mb * 2**20), max_k, max_pixels, max_concurrent, max_decode_mb * 2**20)
        hosts = allowed_hosts_for(host, allowed_host or [])
        app = create_app(index, embedder, api_key, limits, hosts, allow_writes_without_key,
                         reload_interval=reload_interval)
    except (StoreError, CheckpointError, EmbedderError, ImageLoadError, ValueError, OSError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    if api_key is None:
        typer.echo("note: write endpoints (POST/DELETE /items) are " + (
            "open to anyone who can reach the server (not to other sites' pages)" if allow_writes_without_key
            else "off; use --api-key-env to turn them on"))
    typer.echo(f"serving {len(catalog)} items from {index} at http://{host}:{port}/ "
               f"(answering Host: {', '.join(hosts)})")
    # timeout_keep_alive is typed int but only ever handed to loop.call_later: a float works
    uvicorn.run(app, host=host, port=port, log_level=log_level, http=timed_h11(header_timeout, body_timeout),
                timeout_keep_alive=keep_alive_timeout, limit_concurrency=limit_concurrency)  # type: ignore[arg-type]
