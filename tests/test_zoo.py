"""The model zoo: a run copied in as float16, pinned by sha256, loaded by `zoo:NAME` wherever a
checkpoint is taken; changed files and non-redistributable training data refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from catalog_fixtures import save_tiny_checkpoint, write_catalog
from fashion_retrieval.cli import app
from fashion_retrieval.engine.checkpoint import CheckpointError, load_for_inference
from fashion_retrieval.zoo import ZooError, add_to_zoo, registry

runner = CliRunner()


def _run_trained_on(tmp_path: Path, data_format: str) -> Path:
    run = save_tiny_checkpoint(tmp_path / f"run_{data_format}", "global_net")
    meta_path = run / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["dataset"] = {"format": data_format, "root": "/home/someone/private/data"}
    meta_path.write_text(json.dumps(meta))
    return run


def test_a_zoo_model_loads_by_name_in_float16_and_gives_the_runs_embeddings(tmp_path, monkeypatch):
    import torch

    run = _run_trained_on(tmp_path, "clothing_to_shop")
    zoo = tmp_path / "zoo"
    monkeypatch.setenv("FASHION_RETRIEVAL_ZOO", str(zoo))
    entry = add_to_zoo(run, "tiny_global", "a test model", "consumer-to-shop", {"mAP": 12.5})
    assert entry.files["model.safetensors"]["size"] < (run / "model.safetensors").stat().st_size * 0.6
    assert "/home/someone" not in (zoo / "tiny_global" / "meta.json").read_text()  # no local paths shipped
    assert set(registry()) == {"tiny_global"}

    original, _ = load_for_inference(run)
    shipped, meta = load_for_inference("zoo:tiny_global")
    assert meta["zoo"]["weights_dtype"] == "float16"
    images = torch.rand(2, 3, 32, 24)
    with torch.no_grad():
        a, b = original(images)["embedding"], shipped(images)["embedding"]
    cosine = torch.nn.functional.cosine_similarity(a, b)
    assert float(cosine.min()) > 0.999  # float16 weights, float32 arithmetic

    listing = runner.invoke(app, ["zoo", "list"])
    assert listing.exit_code == 0 and "zoo:tiny_global" in listing.output and "mAP 12.5" in listing.output

    # index build takes the zoo name as it takes a run directory, and records the name
    write_catalog(tmp_path / "catalog", 4)
    result = runner.invoke(app, ["index", "build", "--checkpoint", "zoo:tiny_global", "--images",
                                 str(tmp_path / "catalog"), "--out", str(tmp_path / "index")])
    assert result.exit_code == 0, result.output


def test_a_changed_zoo_file_and_an_unknown_name_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_RETRIEVAL_ZOO", str(tmp_path / "zoo"))
    add_to_zoo(_run_trained_on(tmp_path, "fashion_product"), "tiny", "a test model", "attributes")
    weights = tmp_path / "zoo" / "tiny" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: does not match the sha256 pinned for zoo:tiny"):
        load_for_inference("zoo:tiny")
    with pytest.raises(CheckpointError, match=r"zoo:other: no such zoo model \(known: tiny\)"):
        load_for_inference("zoo:other")


@pytest.mark.parametrize("data_format", ["viton", "csv"])
def test_runs_on_data_that_may_not_be_redistributed_are_refused(tmp_path, monkeypatch, data_format):
    monkeypatch.setenv("FASHION_RETRIEVAL_ZOO", str(tmp_path / "zoo"))
    with pytest.raises(ZooError, match=f"trained on '{data_format}'; the zoo only takes"):
        add_to_zoo(_run_trained_on(tmp_path, data_format), "refused", "x", "consumer-to-shop")
    assert not (tmp_path / "zoo" / "refused" / "model.safetensors").exists()


def test_the_shipped_registry_pins_every_file_it_names():
    from fashion_retrieval.zoo import SHIPPED_ZOO, resolve

    for name in registry(SHIPPED_ZOO):
        folder = resolve(f"zoo:{name}", SHIPPED_ZOO)
        assert (folder / "model.safetensors").stat().st_size < 20 * 2**20  # a few MB each


def test_result_grid_draws_every_query_and_result_and_marks_unreadable_photos(tmp_path):
    from PIL import Image

    from fashion_retrieval.index.grid import TILE, GridRow, draw_grid

    photos = write_catalog(tmp_path / "catalog", 4)
    rows = [GridRow(photos[0], [{"path": str(p), "score": 0.9 - 0.1 * i, "id": p.stem} for i, p in enumerate(photos)]),
            GridRow(photos[1], [{"path": str(tmp_path / "gone.jpg"), "score": 0.5, "id": "gone"}])]
    out = draw_grid(rows, tmp_path / "grid" / "search.png", title="two queries")
    with Image.open(out) as grid:
        assert grid.format == "PNG"
        assert grid.width > 5 * TILE[0] and grid.height > 2 * TILE[1]
        # the first result tile holds the first catalog photo: not the white background
        assert len(set(grid.crop((TILE[0] + 40, 30, TILE[0] + 80, 60)).getdata())) > 1
    assert [p.name for p in out.parent.iterdir()] == ["search.png"]  # nothing temporary left
