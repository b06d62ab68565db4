"""The one command: `fashion-retrieval data|train|evaluate|index|search|serve|export|demo`.

Each package owns its sub-commands in its own ``cli.py``; this file only mounts them.
"""
from __future__ import annotations

import typer

from .data import cli as data_cli
from .engine import cli as engine_cli
from .index import cli as index_cli
from .serve import cli as serve_cli
from . import export as export_module
from .zoo import cli as zoo_cli

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Fashion image retrieval: train, evaluate, index, search, serve, export.")
app.add_typer(data_cli.app, name="data", help="Inspect datasets in their official formats.")
app.command("train")(engine_cli.train)
app.command("evaluate")(engine_cli.evaluate)
app.command("demo")(engine_cli.demo)
app.add_typer(index_cli.app, name="index", help="Build and update a persistent vector index.")
app.command("search")(index_cli.search)
app.command("serve")(serve_cli.serve)
app.add_typer(export_module.app, name="export", help="Export a trained model for production runtimes.")
app.add_typer(zoo_cli.app, name="zoo", help="Models shipped with the package (--checkpoint zoo:NAME).")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # python -m fashion_retrieval.cli
    app()
