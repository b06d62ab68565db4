"""The package's layering holds in its imports: no import circle anywhere, and between the six
packages every arrow points down the data flow ``data → models → losses → engine → index →
serve`` (docs/architecture.md); in particular nothing below serve/ reaches up into it."""
from __future__ import annotations

from import_graph import find_cycle, import_graph

LAYERS = ("data", "models", "losses", "engine", "index", "serve")


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def test_no_import_circle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_packages_import_only_the_layers_below_them() -> None:
    upward = [f"{module} -> {target}"
              for module, targets in sorted(import_graph().items()) if _layer(module) in LAYERS
              for target in sorted(targets)
              if _layer(target) in LAYERS and LAYERS.index(_layer(target)) > LAYERS.index(_layer(module))]
    assert not upward, "imports against the layering: " + "; ".join(upward)


def test_the_graph_sees_lazy_relative_imports(tmp_path) -> None:
    # The circles this guards against hid in imports inside functions: the reader must see them.
    package = tmp_path / "fashion_retrieval"
    (package / "index").mkdir(parents=True)
    (package / "serve").mkdir()
    for path in (package / "__init__.py", package / "index" / "__init__.py", package / "serve" / "__init__.py"):
        path.write_text("")
    (package / "serve" / "embedders.py").write_text("from ..index import cli\n")
    (package / "index" / "cli.py").write_text("def search():\n    from ..serve.embedders import Embedder\n")
    graph = import_graph(tmp_path)
    assert graph["fashion_retrieval.index.cli"] == {"fashion_retrieval.serve.embedders"}
    assert find_cycle(graph) == ["fashion_retrieval.index.cli", "fashion_retrieval.serve.embedders",
                                 "fashion_retrieval.index.cli"]
