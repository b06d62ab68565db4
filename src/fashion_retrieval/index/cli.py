import typer

app = typer.Typer(no_args_is_help=True)


def search():
    """Search an index with a photo (not yet implemented)."""
    raise SystemExit("not implemented yet")
