"""`fashion-retrieval zoo list|add`: the models shipped with the package."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.command("list")
def list_models() -> None:
    """The shipped models: use one as `--checkpoint zoo:NAME` wherever a checkpoint is taken."""
    from . import registry

    models = registry()
    if not models:
        typer.echo("no zoo models in this installation")
        return
    for model in models.values():
        size = sum(pin["size"] for pin in model.files.values()) / 2**20
        scores = ", ".join(f"{key} {value}" for key, value in model.metrics.items())
        typer.echo(f"zoo:{model.name}  [{model.task}, {size:.1f} MB] {model.description}\n"
                   f"    trained on {model.trained_on}" + (f"; {scores}" if scores else ""))


@app.command("add")
def add(run: Annotated[Path, typer.Argument(help="run directory of a converged model")],
        name: Annotated[str, typer.Argument(help="zoo name (one folder name)")],
        description: Annotated[str, typer.Option(help="one line: what it finds")],
        task: Annotated[str, typer.Option(help="consumer-to-shop | attributes")],
        metrics: Annotated[Optional[Path], typer.Option(help="eval.json whose overall metrics to record")] = None,
        command: Annotated[str, typer.Option(help="the command that trained it")] = "") -> None:
    """Copy a run's model into the package's zoo as float16, pinned by sha256 (maintainers only)."""
    from . import ZooError, add_to_zoo

    recorded = {}
    if metrics is not None:
        overall = json.loads(metrics.read_text(encoding="utf-8")).get("metrics", {}).get("overall", {})
        recorded = {key: round(100 * value, 2) for key, value in overall.items()
                    if isinstance(value, float) and key in ("top1", "top5", "top20", "mAP", "MAP@all", "MAP@100")}
    try:
        model = add_to_zoo(run, name, description, task, recorded, command)
    except ZooError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"zoo:{model.name}: {sum(p['size'] for p in model.files.values()) / 2**20:.1f} MB in {model.folder}")
