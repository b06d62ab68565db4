"""Files the CLI reads that someone else may have made: a corrupt or crafted meta.json, weights
file, training state, backbone weights or ONNX sidecar stops the command with one line naming
the file (exit 2), and nothing in them is ever executed (no pickle beyond tensors)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from catalog_fixtures import write_catalog
from test_checkpoint import _tiny  # also registers tiny_test_net
from test_index_cli import assert_one_line_error
from test_train import _recipe, write_synthetic_viton

from fashion_retrieval.cli import app
from fashion_retrieval.config import config_from_dict
from fashion_retrieval.engine.train import train


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


class RunsCode:
    """Unpickling this would create ``marker``: proof that a loader executed the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A run directory and an index built from it."""
    root = tmp_path_factory.mktemp("hostile")
    _tiny(root / "run")
    write_catalog(root / "catalog", 4)
    result = invoke("index", "build", "--checkpoint", root / "run", "--images", root / "catalog", "--out", root / "index")
    assert result.exit_code == 0, result.output
    return root


META_CASES = {
    "not_json": (b"{ not json", "meta.json:1: corrupt JSON"),
    "not_an_object": (b"[1, 2]", "meta.json: expected a JSON object, got array"),
    "not_utf8": (b'{"model": "caf\xe9"}', "meta.json:1: not UTF-8 text"),
    "nested_too_deeply": (b"[" * 200_000, "meta.json: corrupt JSON (nested too deeply)"),
    "bad_image_size": (json.dumps({"format_version": 1, "model": {"name": "tiny_test_net", "kwargs": {}},
                                   "image_size": "x" * 5000}).encode(), "'image_size' must be [height, width]"),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_a_corrupt_meta_json_stops_every_command_naming_it(built, tmp_path, case):
    content, problem = META_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(built / "run", run)
    (run / "meta.json").write_bytes(content)
    build = invoke("index", "build", "--checkpoint", run, "--images", built / "catalog", "--out", tmp_path / "index")
    assert_one_line_error(build, str(run / "meta.json"), problem)
    assert len(build.stderr) < 400 and not (tmp_path / "index").exists()
    export = invoke("export", "onnx", "--checkpoint", run, "--out", tmp_path / "model.onnx")
    assert_one_line_error(export, str(run / "meta.json"), problem)
    # an index's own model copy, read by search
    index = tmp_path / "index-copy"
    shutil.copytree(built / "index", index)
    (index / "model" / "meta.json").write_bytes(content)
    search = invoke("search", "--index", index, next((built / "catalog").glob("*.jpg")))
    # the index records its model copy's size and sha256: a changed meta.json is caught before it is parsed
    assert_one_line_error(search, str(index / "model" / "meta.json"), "index.json records", "rebuild the index")


def test_corrupt_weights_are_named_by_the_users_path(built, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(built / "run", run)
    (run / "model.safetensors").write_bytes(b"\x00" * 7)
    build = invoke("index", "build", "--checkpoint", run, "--images", built / "catalog", "--out", tmp_path / "index")
    assert_one_line_error(build, f"{run / 'model.safetensors'}: not a readable safetensors file")
    export = invoke("export", "onnx", "--checkpoint", run, "--out", tmp_path / "model.onnx")
    assert_one_line_error(export, f"{run / 'model.safetensors'}: not a readable safetensors file")


def test_a_corrupt_or_crafted_onnx_sidecar_is_one_line(built, tmp_path):
    onnx_path = tmp_path / "model.onnx"
    assert invoke("export", "onnx", "--checkpoint", built / "index", "--out", onnx_path).exit_code == 0
    sidecar = onnx_path.with_name("model.onnx.json")
    photo = next((built / "catalog").glob("*.jpg"))
    for content, problem in (("{}", "missing 'image_size'"), ('{"image_size": [64, 48], "feat_dim": "16"}',
                                                              "'feat_dim' must be integer"),
                             ("[]", "expected a JSON object"), ("{", "corrupt JSON")):
        sidecar.write_text(content)
        result = invoke("search", "--index", built / "index", photo, "--onnx", onnx_path)
        assert_one_line_error(result, str(sidecar), problem)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch run with its training checkpoint, and the recipe to resume it for a second."""
    root = tmp_path_factory.mktemp("hostile-train")
    write_synthetic_viton(root / "data" / "viton", pairs=20, broken=())
    short = {"train__max_steps_per_epoch": 2, "train__checkpoint_every_steps": None}
    one, two = _recipe(root, train__epochs=1, **short), _recipe(root, train__epochs=2, **short)
    train(config_from_dict(yaml.safe_load(one.read_text())), root / "data", root / "run", log=lambda _: None)
    return root, two


def test_a_corrupt_or_crafted_training_state_is_refused_on_resume(trained, tmp_path):
    root, recipe = trained
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    state = run / "checkpoint-last" / "training_state.pt"
    whole = state.read_bytes()
    state.write_bytes(whole[: len(whole) // 2])
    resume = ("train", "--config", recipe, "--data-root", root / "data", "--out", run, "--resume")
    assert_one_line_error(invoke(*resume), f"{state}: corrupt training state")

    marker = tmp_path / "code-ran"
    torch.save({"format_version": 1, "epoch": 1, "step": 2, "extra": RunsCode(marker)}, state)
    assert_one_line_error(invoke(*resume), f"{state}: refused: it holds objects other than tensors")
    assert not marker.exists()


def test_corrupt_or_crafted_backbone_weights_are_refused(trained, tmp_path):
    root, _ = trained
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pth"
    torch.save({"conv1.weight": RunsCode(marker)}, crafted)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    for weights, problem in ((crafted, "refused: it holds objects other than tensors"),
                             (garbage, "not a readable weights file")):
        recipe = _recipe(tmp_path, model__name="global_net",
                         model__kwargs={"backbone": "resnet18", "weights_path": str(weights)})
        result = invoke("train", "--config", recipe, "--data-root", root / "data", "--out", tmp_path / "run")
        assert_one_line_error(result, f"{weights}: {problem}")
    assert not marker.exists()
