"""`export onnx`: parity with PyTorch on photos, and the server answering from the ONNX model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from catalog_fixtures import (ATTRIBUTES, jpeg_bytes, photo_like, save_tiny_checkpoint, shared_photos,
                              write_catalog)
from conftest import shared_data_path
from fashion_retrieval.cli import app
from fashion_retrieval.data.images import load_rgb
from fashion_retrieval.engine.checkpoint import load_for_inference
from fashion_retrieval.engine.embed import inference_transform
from fashion_retrieval.index.build import build_index
from fashion_retrieval.index.catalog import CatalogIndex
from fashion_retrieval.serve.app import create_app
from fashion_retrieval.serve.embedders import EmbedderError, embedder_for_index

PARITY = 1e-4


def parity_photos(tmp_path, count: int = 6):
    """Real shop and consumer photos when the shared data is there, else photo-like JPEGs."""
    root = shared_data_path()
    photos = shared_photos(root if root.is_dir() else None, count)
    return photos or write_catalog(tmp_path / "parity", count, first_seed=300)


@pytest.fixture(scope="module", params=["global_net", "asen"])
def exported(request, tmp_path_factory):
    """A checkpoint, its index over a small catalog, and its ONNX export made by the CLI."""
    name = request.param
    root = tmp_path_factory.mktemp(f"export-{name}")
    checkpoint = save_tiny_checkpoint(root / "run", name)
    photos = write_catalog(root / "catalog", 10)
    build_index(checkpoint, root / "catalog", root / "index", progress=False)
    onnx_path = root / "onnx" / "model.onnx"
    result = CliRunner().invoke(app, ["export", "onnx", "--checkpoint", str(root / "index"), "--out", str(onnx_path),
                                      *[arg for p in photos[:2] for arg in ("--image", str(p))]])
    assert result.exit_code == 0, result.output
    assert "max abs difference to PyTorch" in result.stdout
    return name, root, checkpoint, photos, onnx_path


def test_onnx_matches_pytorch_on_photos(exported, tmp_path):
    import onnxruntime

    name, root, checkpoint, _, onnx_path = exported
    sidecar = json.loads(onnx_path.with_name("model.onnx.json").read_text())
    assert sidecar["image_size"] == [64, 48] and sidecar["parity_max_abs_diff"] <= PARITY
    assert sidecar["weights_sha256"] == CatalogIndex.open(root / "index").model_info["sha256"]
    model, meta = load_for_inference(checkpoint)
    photos = parity_photos(tmp_path)
    transform = inference_transform(meta)
    pixels = torch.stack([transform(load_rgb(p)) for p in photos])
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    attributes = range(len(ATTRIBUTES)) if sidecar["attribute_conditioned"] else [None]
    assert sidecar["attribute_conditioned"] == (name == "asen")
    for attribute in attributes:
        feeds = {"images": pixels.numpy()}
        with torch.no_grad():
            if attribute is None:
                expected = model(pixels)["embedding"].numpy()
            else:
                index = torch.full((len(pixels),), attribute, dtype=torch.long)
                expected = model(pixels, index)["embedding"].numpy()
                feeds["attribute"] = index.numpy()
        got = session.run(["embedding"], feeds)[0]
        assert got.shape == expected.shape == (len(photos), model.feat_dim)
        assert np.abs(got - expected).max() <= PARITY
        # one image at a time, as the server sends them
        single = {key: value[:1] for key, value in feeds.items()}
        assert np.abs(session.run(["embedding"], single)[0] - expected[:1]).max() <= PARITY


def test_server_on_onnx_ranks_like_the_server_on_pytorch(exported):
    name, root, _, photos, onnx_path = exported
    catalog = CatalogIndex.open(root / "index")
    torch_client = TestClient(create_app(root / "index", embedder_for_index(catalog)), base_url="http://127.0.0.1")
    onnx_client = TestClient(create_app(root / "index", embedder_for_index(catalog, onnx_path)), base_url="http://127.0.0.1")
    attributes = ATTRIBUTES if name == "asen" else [None]
    for query in (photos[1], photos[8]):
        for attribute in attributes:
            params = {"k": 10} if attribute is None else {"k": 10, "attribute": attribute}
            answers = [client.post("/search", params=params, files={"image": ("q.jpg", query.read_bytes())}).json()
                       for client in (torch_client, onnx_client)]
            ids = [[r["id"] for r in answer["results"]] for answer in answers]
            assert ids[0] == ids[1] and ids[0][0] == query.stem
            scores = [np.array([r["score"] for r in answer["results"]]) for answer in answers]
            assert np.abs(scores[0] - scores[1]).max() <= 1e-4
    unseen = jpeg_bytes(photo_like(4242))
    params = {} if name != "asen" else {"attribute": "sleeve"}
    answers = [c.post("/search", params=params, files={"image": ("u.jpg", unseen)}).json()
               for c in (torch_client, onnx_client)]
    assert [r["id"] for r in answers[0]["results"]] == [r["id"] for r in answers[1]["results"]]


def test_onnx_of_another_model_is_refused(exported, tmp_path):
    name, root, _, _, onnx_path = exported
    other = save_tiny_checkpoint(tmp_path / "other", name, seed=7)
    build_index(other, root / "catalog", tmp_path / "index", progress=False)
    with pytest.raises(EmbedderError, match="exported from another model"):
        embedder_for_index(CatalogIndex.open(tmp_path / "index"), onnx_path)
    result = CliRunner().invoke(app, ["search", "--index", str(tmp_path / "index"), str(root / "catalog" / "item000.jpg"),
                                      "--onnx", str(onnx_path)] + (["--attribute", "colour"] if name == "asen" else []))
    assert result.exit_code == 2 and "exported from another model" in result.stderr


def test_export_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(app, ["export", "onnx", "--checkpoint", str(tmp_path / "nothing"),
                                      "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.output
    assert "not found" in result.stderr and not (tmp_path / "m.onnx").exists()


def test_a_model_beside_the_sidecar_of_another_export_is_refused(exported, tmp_path):
    """The sidecar is written last and records the ONNX file's sha256: a crash between the two
    atomic writes (a new model, the previous sidecar) is caught before the model is used."""
    import shutil

    from fashion_retrieval.serve.embedders import OnnxEmbedder

    _, _, _, _, onnx_path = exported
    copy = tmp_path / "model.onnx"
    shutil.copyfile(onnx_path, copy)
    shutil.copyfile(onnx_path.with_name("model.onnx.json"), tmp_path / "model.onnx.json")
    assert OnnxEmbedder(copy).feat_dim > 0
    assert not [p.name for p in onnx_path.parent.iterdir() if p.name not in ("model.onnx", "model.onnx.json")]
    with open(copy, "ab") as handle:  # another export's bytes under the same sidecar
        handle.write(b"\0")
    with pytest.raises(EmbedderError, match=r"model.onnx: is not the model model.onnx.json describes"):
        OnnxEmbedder(copy)
