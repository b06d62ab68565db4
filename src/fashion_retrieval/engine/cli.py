"""``fashion-retrieval train | evaluate | demo``.

Heavy imports (torch) happen inside the commands so ``--help`` stays fast. Expected failures
(a bad recipe, a malformed annotation file, an unusable checkpoint, a missing folder, a full
disk) print one line and exit with code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional

import typer

if TYPE_CHECKING:
    from ..config import ExperimentConfig

DATA_ROOT_ENV = "FASHION_DATA_ROOT"
USAGE_ERROR = 2


def default_data_root() -> Path:
    """``$FASHION_DATA_ROOT``, else ``../shared/data`` relative to the working directory."""
    return Path(os.environ.get(DATA_ROOT_ENV, Path("..") / "shared" / "data"))


EXPECTED_ERRORS = (("fashion_retrieval.registry", "ConfigError"), ("fashion_retrieval.data.table", "AnnotationError"),
                   ("fashion_retrieval.engine.checkpoint", "CheckpointError"),
                   ("fashion_retrieval.data.images", "ImageLoadError"), ("fashion_retrieval.files", "FileFormatError"),
                   ("fashion_retrieval.files", "OutsideDirectoryError"), ("fashion_retrieval.rerank", "RerankError"))


def _expected_errors() -> tuple[type[BaseException], ...]:
    # Only from modules already imported: an error of a module never imported cannot have been
    # raised, and importing checkpoint/images (torch, seconds) just to say "bad recipe" is slow.
    found = [getattr(sys.modules[module], name) for module, name in EXPECTED_ERRORS if module in sys.modules]
    # OSError: a full disk or a failing drive is the machine's state, not a bug in the run
    return (*found, OSError)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - filtered right below
        if not isinstance(exc, _expected_errors()):
            raise
        message = str(exc) if not isinstance(exc, OSError) or not exc.filename else f"{exc.filename}: {exc.strerror}"
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(USAGE_ERROR) from None


def train(
    config: Path = typer.Option(..., "--config", "-c", help="YAML recipe, e.g. configs/viton_mmfl_net.yaml, or a "
                                "shipped recipe's name (viton_mmfl_net; `fashion-retrieval recipes` lists them)"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help=f"folder holding the datasets "
                                             f"(default: ${DATA_ROOT_ENV} or ../shared/data)"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default: runs/<recipe name>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    overrides: Optional[List[str]] = typer.Argument(None, help="recipe overrides key.path=value, "
                                                    "e.g. train.epochs=3 data.image_size=[128,96]"),
) -> None:
    """Train a model from a YAML recipe; checkpoints, metrics.csv, TensorBoard logs and eval.json go to --out."""
    with _one_line_errors():
        from ..config import load_config
        from ..recipes import resolve_recipe

        # the recipe first: a bad one is refused before torch is imported (seconds)
        recipe = load_config(resolve_recipe(config), list(overrides or []))
        from .train import train as run_training

        run_dir = out or Path("runs") / recipe.name
        result = run_training(recipe, data_root or default_data_root(), run_dir, resume=resume)
        if result.evaluation is not None and _is_main_process():
            from .evaluate import print_table

            print_table(result.evaluation)
        if _is_main_process():
            typer.echo(f"run directory: {result.run_dir} ({result.epochs} epochs, {result.steps} steps, "
                       f"{result.skipped_images} unreadable images skipped)")


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="run directory or its model.safetensors"),
    benchmark: Optional[str] = typer.Option(None, "--benchmark", help="viton_c2s, fashion_product_attributes, "
                                            "clothing_to_shop_category, ... or catalog (your own; the default "
                                            "with --catalog)"),
    split: str = typer.Option("test", "--split", help="test | val | train"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help=f"default: ${DATA_ROOT_ENV} or ../shared/data"),
    json_out: Path = typer.Option(..., "--json", help="where to write the results JSON (embeddings go beside it, .npz)"),
    plots: Optional[Path] = typer.Option(None, "--plots", help="folder for the top-k curve and top-5 grids"),
    catalog: Optional[Path] = typer.Option(None, "--catalog", help="--benchmark catalog: your catalog, a CSV "
                                           "table, a folder of images or a dataset folder (with --format)"),
    columns: Optional[str] = typer.Option(None, "--columns", help="--catalog's own column names: ROLE=COLUMN,"
                                          "...,ATTRIBUTE_COLUMN,... or a .yaml mapping (docs/datasets.md)"),
    catalog_format: Optional[str] = typer.Option(None, "--format", help="--catalog's dataset format (default: "
                                                 "csv for a file, images for a folder)"),
    queries: str = typer.Option("auto", "--queries", help="--benchmark catalog: auto, all, domain=D or split=S "
                                "(the rest is the gallery)"),
    level: str = typer.Option("instance", "--level", help="--benchmark catalog: instance (same item id), "
                              "category or attribute (same value)"),
    attributes: Optional[str] = typer.Option(None, "--attributes", help="--level attribute: comma-separated "
                                             "attributes (default: all of the catalog's)"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    num_workers: int = typer.Option(2, "--num-workers", min=0),
    flip: bool = typer.Option(False, "--flip", help="embed every image flip-averaged (with its mirror; twice "
                              "the embedding time)"),
    query_expansion: Optional[str] = typer.Option(None, "--query-expansion", help="k,alpha: rank with α-query "
                                                  "expansion over the k nearest gallery items (e.g. 2,3)"),
    rerank: Optional[str] = typer.Option(None, "--rerank", help="k1,k2,lambda: rank by k-reciprocal re-ranking "
                                         "(e.g. 20,6,0.3); not with --query-expansion"),
) -> None:
    """Evaluate a checkpoint on a benchmark with the papers' metrics; prints a table, writes JSON.

    --flip, --query-expansion and --rerank are test-time options, off by default: docs/metrics.md
    ("Test-time options") has what each gains or loses on the shared benchmarks."""
    with _one_line_errors():
        from ..registry import ConfigError
        from ..rerank import KReciprocal, QueryExpansion
        from .evaluate import evaluate as run_evaluation

        # malformed options fail here, before the model loads
        expansion = QueryExpansion.parse(query_expansion) if query_expansion is not None else None
        reranking = KReciprocal.parse(rerank) if rerank is not None else None

        benchmark = benchmark or ("catalog" if catalog is not None else None)
        if benchmark is None:
            raise ConfigError("--benchmark is required (or --catalog FILE to evaluate on your own catalog)")
        catalog_given = {"--catalog": catalog, "--columns": columns, "--format": catalog_format,
                         "--attributes": attributes, "--queries": None if queries == "auto" else queries,
                         "--level": None if level == "instance" else level}
        options = None
        if benchmark == "catalog":
            # a relative --catalog is relative to the working directory, like every other path option
            from ..data.readers.catalog import parse_columns

            options = {"catalog": catalog.absolute() if catalog is not None else None, "format": catalog_format,
                       "columns": parse_columns(columns, "--columns"), "queries": queries,
                       "level": level, "attributes": attributes}
        elif any(value is not None for value in catalog_given.values()):
            used = next(name for name, value in catalog_given.items() if value is not None)
            raise ConfigError(f"{used} is for --benchmark catalog, not {benchmark}")
        evaluation = run_evaluation(checkpoint, benchmark, split, data_root or default_data_root(), json_out, plots,
                                    batch_size=batch_size, device=device, num_workers=num_workers,
                                    progress=sys.stderr.isatty(), benchmark_options=options, flip=flip,
                                    query_expansion=expansion, rerank=reranking)
        _report_skipped(evaluation.results)
        typer.echo(f"results: {json_out}")


SHOWN_SKIPPED = 20


def _report_skipped(results: dict) -> None:
    """Unreadable images left the benchmark: say which, so the numbers are not read as complete."""
    count = results["counts"]["skipped_images"]
    if not count:
        return
    typer.echo(f"{count} unreadable images skipped (left out of queries and gallery):")
    for line in results["skipped"][:SHOWN_SKIPPED]:
        typer.echo(f"  skipped {line}")
    if count > SHOWN_SKIPPED:
        typer.echo(f"  … and {count - SHOWN_SKIPPED} more (the first {len(results['skipped'])} are in the JSON)")


def demo(
    data_root: Optional[Path] = typer.Option(None, "--data-root", help=f"default: ${DATA_ROOT_ENV} or ../shared/data"),
    out: Path = typer.Option(Path("runs") / "demo", "--out", help="where the demo's runs and results go"),
    quick: bool = typer.Option(False, "--quick", help="a smoke run of a few steps (about a minute)"),
) -> None:
    """Train small models on the shared data on CPU and print their benchmark tables (about 10 minutes)."""
    with _one_line_errors():
        run_demo(data_root or default_data_root(), out, quick=quick)


# ---- demo ------------------------------------------------------------------------------------
# shipped recipes (configs/<name>.yaml), in the order they run; each sized for about 5 minutes on
# two busy CPU cores
DEMO_RECIPES = ("demo_fashion_product_attributes", "demo_viton_c2s")
# `demo --quick`: a smoke run of each, evaluated on the smaller validation split
QUICK_OVERRIDES = ["train.epochs=1", "train.max_steps_per_epoch=3", "eval.final_split=val"]


def demo_recipes(quick: bool = False) -> list[ExperimentConfig]:
    """The demo's recipes: attribute-specific retrieval on fashion-product, then consumer-to-shop
    retrieval on VITON."""
    from ..config import load_config
    from ..recipes import resolve_recipe

    return [load_config(resolve_recipe(name), QUICK_OVERRIDES if quick else []) for name in DEMO_RECIPES]


def run_demo(data_root: Path, out: Path, quick: bool = False) -> list[dict]:
    """Train and evaluate each demo recipe, printing each benchmark table; returns the results."""
    import time

    from .checkpoint import training_checkpoint_dir
    from .evaluate import evaluate as run_evaluation
    from .evaluate import print_table
    from .train import train as run_training

    data_root = Path(data_root)
    for folder in ("fashion-product", "viton"):
        if not (data_root / folder).is_dir():
            raise FileNotFoundError(f"{data_root / folder}: not found; the demo needs the shared data "
                                    f"(pass --data-root DIR or set {DATA_ROOT_ENV})")
    started = time.perf_counter()
    results = []
    for config in demo_recipes(quick):
        # Quick and full demos are different recipes: keep their runs apart so each can continue.
        run_dir = Path(out) / (config.name + ("-quick" if quick else ""))
        typer.secho(f"\n== {config.description} → {run_dir}", bold=True)
        # A second demo continues (or, when finished, re-evaluates) its own earlier runs.
        resume = training_checkpoint_dir(run_dir) is not None
        result = run_training(config, data_root, run_dir, resume=resume)
        evaluation = result.evaluation
        if evaluation is None:
            evaluation = run_evaluation(run_dir, config.eval.benchmark, config.eval.final_split, data_root,
                                        run_dir / "eval.json", print_results=False, num_workers=2,
                                        progress=sys.stderr.isatty(),
                                        benchmark_options=config.benchmark_options()).results
        print_table(evaluation)
        results.append(evaluation)
    typer.echo(f"\ndemo finished in {(time.perf_counter() - started) / 60:.1f} min; runs and eval.json files in {out}")
    return results
