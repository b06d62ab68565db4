"""Artefacts never overwrite each other: `train`, `index build` and `export onnx` each refuse an
--out that holds another kind of artefact (or lies inside an index) with one line, and leave it
byte for byte as it was."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from catalog_fixtures import write_catalog
from test_checkpoint import _tiny  # also registers tiny_test_net
from test_index_cli import assert_one_line_error
from test_train import _recipe

from fashion_retrieval.cli import app
from fashion_retrieval.files import artefact_kind

pytest.importorskip("onnxruntime")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """A run directory, an index built from it and an ONNX export of it, each made by the CLI's code."""
    root = tmp_path_factory.mktemp("artefacts")
    _tiny(root / "run")
    write_catalog(root / "catalog", 4)
    built = invoke("index", "build", "--checkpoint", root / "run", "--images", root / "catalog", "--out", root / "index")
    assert built.exit_code == 0, built.output
    exported = invoke("export", "onnx", "--checkpoint", root / "run", "--out", root / "export" / "model.onnx")
    assert exported.exit_code == 0, exported.output
    return root


def test_artefact_kind_tells_runs_indexes_and_exports_apart(artefacts, tmp_path):
    assert artefact_kind(artefacts / "run") == "run"
    assert artefact_kind(artefacts / "index") == "index"
    assert artefact_kind(artefacts / "index" / "model") == "run"  # the index's model copy
    assert artefact_kind(artefacts / "export") == "export"
    assert artefact_kind(artefacts / "export" / "model.onnx") == "export"
    assert artefact_kind(artefacts / "catalog") is None
    assert artefact_kind(tmp_path) is None and artefact_kind(tmp_path / "missing") is None
    (tmp_path / "other.onnx").write_bytes(b"not ours")
    (tmp_path / "other.onnx.json").write_text('{"model": "x"}')
    assert artefact_kind(tmp_path / "other.onnx") is None and artefact_kind(tmp_path) is None


def test_marker_names_are_the_names_the_writers_use():
    from fashion_retrieval import files
    from fashion_retrieval.engine import checkpoint, train
    from fashion_retrieval.index import catalog

    assert set(files.RUN_MARKERS) == {checkpoint.WEIGHTS_FILE, checkpoint.TRAINING_DIR,
                                      checkpoint.PREVIOUS_TRAINING_DIR, train.METRICS_FILE}
    assert catalog.WEIGHTS_FILE == checkpoint.WEIGHTS_FILE and "index.json" in files.INDEX_MARKERS


def test_train_refuses_an_index_or_an_export(artefacts, tmp_path):
    recipe = _recipe(tmp_path)
    for target, found in ((artefacts / "index", "is an index directory"),
                          (artefacts / "export", "is an ONNX export"),
                          (artefacts / "export" / "model.onnx", "is an ONNX export"),
                          (artefacts / "index" / "model", "lies inside the index")):
        before = snapshot(artefacts)
        for resume in ([], ["--resume"]):
            result = invoke("train", "--config", recipe, "--data-root", tmp_path, "--out", target, *resume)
            assert_one_line_error(result, str(target), found, "refusing to write a training run")
        assert snapshot(artefacts) == before


def test_index_build_refuses_a_run_or_an_export(artefacts):
    for target, found in ((artefacts / "run", "is a training run directory"),
                          (artefacts / "export", "is an ONNX export"),
                          (artefacts / "index" / "model", "is a training run directory")):
        before = snapshot(artefacts)
        result = invoke("index", "build", "--checkpoint", artefacts / "run", "--images", artefacts / "catalog",
                        "--out", target)
        assert_one_line_error(result, str(target), found, "refusing to write an index")
        assert snapshot(artefacts) == before


def test_export_refuses_a_run_an_index_or_their_files(artefacts):
    run, index = artefacts / "run", artefacts / "index"
    for target, found in ((run, "is a training run directory"), (index, "is an index directory"),
                          (run / "model.safetensors", "exists and is not part of an ONNX export"),
                          (run / "meta", f"{run / 'meta.json'}: exists and is not part of an ONNX export"),
                          (index / "model.onnx", "lies inside the index"),
                          (artefacts / "export", "is a folder")):
        before = snapshot(artefacts)
        result = invoke("export", "onnx", "--checkpoint", run, "--out", target)
        assert_one_line_error(result, found)
        assert snapshot(artefacts) == before
    # exporting again over an export of ours, or next to a run's files, is what --out is for
    again = invoke("export", "onnx", "--checkpoint", index, "--out", artefacts / "export" / "model.onnx")
    assert again.exit_code == 0, again.output
    beside = invoke("export", "onnx", "--checkpoint", run, "--out", run / "model.onnx")
    assert beside.exit_code == 0, beside.output
    assert artefact_kind(run) == "run"
