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


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"fashion-retrieval {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Fashion image retrieval: train, evaluate, index, search, serve, export."""


@app.command("recipes")
def recipes() -> None:
    """List the shipped recipes; `train --config NAME` takes a name as well as a path."""
    from .recipes import describe, recipe_dir, recipe_names

    folder = recipe_dir()
    if folder is None:
        typer.echo("no shipped recipes found (this install has no fashion_retrieval/configs)", err=True)
        raise typer.Exit(1)
    width = max((len(name) for name in recipe_names()), default=0)
    for name in recipe_names():
        typer.echo(f"{name:<{width}}  {describe(folder / f'{name}.yaml')}".rstrip())
    typer.echo(f"({folder})")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # python -m fashion_retrieval.cli
    app()
