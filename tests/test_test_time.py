"""Test-time options end to end: flip-averaged embeddings (evaluation, index build, search, the
index remembering the option), and evaluate's --query-expansion / --rerank."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from typer.testing import CliRunner

from catalog_fixtures import IMAGE_SIZE, photo_like, save_tiny_checkpoint, write_catalog
from test_checkpoint import TinyAttributeNet, TinyNet
from test_evaluate import _save_tiny, brute_force
from test_train import write_synthetic_viton

from fashion_retrieval.cli import app
from fashion_retrieval.engine.embed import embed_images, embed_table, embed_table_attributes

runner = CliRunner()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _mirror_symmetric(size: tuple[int, int]) -> Image.Image:
    """A photo whose right half is its left half mirrored (size: width, height; width even)."""
    width, height = size
    left = np.asarray(photo_like(5, (width // 2, height)))
    return Image.fromarray(np.concatenate([left, left[:, ::-1]], axis=1))


# ---- flip averaging: the embedding ----------------------------------------------------------
def test_flip_of_a_mirror_symmetric_image_is_the_plain_embedding() -> None:
    torch.manual_seed(0)
    model = TinyNet(num_items=3)
    image = _mirror_symmetric((24, 32))
    assert np.array_equal(np.asarray(image), np.asarray(ImageOps.mirror(image)))
    plain = embed_images(model, [image], (32, 24))
    np.testing.assert_allclose(embed_images(model, [image], (32, 24), flip=True), plain, atol=1e-6)


def test_flip_average_is_the_mean_of_the_two_passes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet(num_items=3)
    images = [photo_like(seed, (24, 32)) for seed in range(3)]
    plain = embed_images(model, images, (32, 24))
    mirrored = embed_images(model, [ImageOps.mirror(image) for image in images], (32, 24))
    flipped = embed_images(model, images, (32, 24), flip=True)
    np.testing.assert_allclose(flipped, _unit(plain + mirrored), atol=1e-6)
    # the photos are not symmetric: the option does something (a global pool makes the difference small)
    assert np.abs(flipped - plain).max() > 1e-4

    # a catalog table embeds the same way, batch after batch
    from fashion_retrieval.data.table import Sample, SampleTable

    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    table = SampleTable([Sample(path=f"{i}.png", item_id=str(i)) for i in range(3)], root=tmp_path)
    np.testing.assert_allclose(embed_table(model, table, (32, 24), batch_size=2, progress=False, flip=True).embeddings,
                               flipped, atol=1e-6)


def test_flip_average_per_attribute(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyAttributeNet(attribute_sizes=[2, 3])
    from fashion_retrieval.data.table import Sample, SampleTable

    for i in range(2):
        photo_like(i, (24, 32)).save(tmp_path / f"{i}.png")
        ImageOps.mirror(photo_like(i, (24, 32))).save(tmp_path / f"m{i}.png")
    table = SampleTable([Sample(path=f"{i}.png", item_id=str(i)) for i in range(2)], root=tmp_path)
    mirrors = SampleTable([Sample(path=f"m{i}.png", item_id=str(i)) for i in range(2)], root=tmp_path)
    both = embed_table_attributes(model, table, (32, 24), [0, 1], progress=False, flip=True)
    for attribute in (0, 1):
        plain = embed_table(model, table, (32, 24), attribute=attribute, progress=False).embeddings
        mirrored = embed_table(model, mirrors, (32, 24), attribute=attribute, progress=False).embeddings
        np.testing.assert_allclose(both.by_attribute[attribute], _unit(plain + mirrored), atol=1e-6)


# ---- flip averaging: the index remembers it -------------------------------------------------
@pytest.fixture(scope="module")
def flipped_index(tmp_path_factory):
    from fashion_retrieval import build_index

    root = tmp_path_factory.mktemp("flip")
    checkpoint = save_tiny_checkpoint(root / "run", "global_net")
    photos = write_catalog(root / "photos", 6)
    index = build_index(checkpoint, root / "photos", root / "index", flip=True)
    return root, checkpoint, photos, index


def _embedded_both_ways(checkpoint: Path, photo: Path) -> tuple[np.ndarray, np.ndarray]:
    """(flip-averaged, plain) embedding of ``photo`` by the checkpoint's model, without any index."""
    from fashion_retrieval.data.images import load_rgb
    from fashion_retrieval.engine.checkpoint import load_for_inference

    model, meta = load_for_inference(checkpoint)
    image = load_rgb(photo)
    return (embed_images(model, [image], meta.image_size, flip=True)[0],
            embed_images(model, [image], meta.image_size)[0])


def test_the_index_records_flip_and_embeds_its_queries_so(flipped_index) -> None:
    from fashion_retrieval import open_index
    from fashion_retrieval.index.catalog import recorded_flip

    root, checkpoint, photos, _ = flipped_index
    assert json.loads((root / "index" / "index.json").read_text())["embedding"] == {"flip": True}
    assert recorded_flip(root / "index") is True  # what load_model(INDEX) follows
    reopened = open_index(root / "index")
    assert reopened.flip is True
    with_flip, without = _embedded_both_ways(checkpoint, photos[2])
    assert np.abs(with_flip - without).max() > 1e-3
    np.testing.assert_allclose(reopened.model.embed(photos[2])[0], with_flip, atol=1e-5)
    hit = reopened.search(photos[2], k=1)[0]
    # the stored vector is the flip-averaged one: the photo finds itself at cosine 1
    assert hit.id == photos[2].stem and hit.score == pytest.approx(1.0, abs=1e-5)


def test_index_add_embeds_as_the_index_was_built(flipped_index, tmp_path: Path) -> None:
    import shutil

    from fashion_retrieval import open_index
    from fashion_retrieval.index.build import add_to_index

    root, _, _, _ = flipped_index
    index_dir = tmp_path / "index"
    shutil.copytree(root / "index", index_dir)
    new = write_catalog(tmp_path / "new", 1, first_seed=40)
    add_to_index(index_dir, tmp_path / "new", progress=False)
    top = open_index(index_dir).search(new[0], k=1)[0]
    assert top.id == new[0].stem and top.score == pytest.approx(1.0, abs=1e-5)  # added flip-averaged


def test_search_no_flip_overrides_the_index(flipped_index) -> None:
    root, checkpoint, photos, _ = flipped_index
    plain = runner.invoke(app, ["search", "--index", str(root / "index"), str(photos[4]), "--top-k", "1", "--json",
                                "--no-flip"])
    assert plain.exit_code == 0, plain.output
    top = json.loads(plain.output)["results"][0]
    with_flip, without = _embedded_both_ways(checkpoint, photos[4])
    # a plain query against its own flip-averaged vector
    assert top["id"] == photos[4].stem and top["score"] == pytest.approx(float(with_flip @ without), abs=1e-5)
    assert float(with_flip @ without) < 0.9999


def test_index_build_flip_from_the_cli_and_older_indexes(tmp_path: Path) -> None:
    from fashion_retrieval import open_index
    from fashion_retrieval.index.store import StoreError

    checkpoint = save_tiny_checkpoint(tmp_path / "run", "global_net")
    write_catalog(tmp_path / "photos", 2)
    out = tmp_path / "index"
    result = runner.invoke(app, ["index", "build", "--checkpoint", str(checkpoint), "--images",
                                 str(tmp_path / "photos"), "--out", str(out), "--flip"])
    assert result.exit_code == 0, result.output
    manifest_path = out / "index.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["embedding"] == {"flip": True}
    del manifest["embedding"]  # an index written before the option existed holds plain vectors
    manifest_path.write_text(json.dumps(manifest))
    assert open_index(out).flip is False
    manifest["embedding"] = {"flip": "yes"}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"index/index.json: 'embedding' must be an object like \{\"flip\": false\}"):
        open_index(out)


# ---- evaluate: flip, α-QE, k-reciprocal ----------------------------------------------------------
@pytest.fixture(scope="module")
def viton(tmp_path_factory):
    root = tmp_path_factory.mktemp("viton")
    write_synthetic_viton(root / "data" / "viton", pairs=40, broken=())
    _save_tiny(root / "run", "tiny_test_net", {"num_items": 3})
    return root


def _evaluate(root: Path, name: str, **options):
    from fashion_retrieval.engine.evaluate import evaluate

    evaluate(root / "run", "viton_c2s", "test", root / "data", root / f"{name}.json", device="cpu", num_workers=0,
             progress=False, print_results=False, **options)
    return json.loads((root / f"{name}.json").read_text())


def test_evaluate_with_flip_stores_flip_averaged_embeddings(viton) -> None:
    from fashion_retrieval.data.benchmarks import BENCHMARKS
    from fashion_retrieval.engine.checkpoint import load_for_inference
    from fashion_retrieval.engine.evaluate import load_npz

    results = _evaluate(viton, "flip", flip=True)
    assert results["test_time"] == {"flip": True, "query_expansion": None, "rerank": None}
    model, _ = load_for_inference(viton / "run")
    queries = BENCHMARKS.build("viton_c2s", data_root=viton / "data", split="test").queries
    saved = load_npz(viton / "flip.npz")
    np.testing.assert_allclose(saved["query"]["pair_id"],
                               embed_table(model, queries, (64, 48), progress=False, flip=True).embeddings, atol=1e-6)
    assert saved["test_time"]["flip"] is True


def test_evaluate_with_query_expansion_and_rerank(viton) -> None:
    from fashion_retrieval.engine.evaluate import load_npz, recompute_from_npz
    from fashion_retrieval.rerank import KReciprocal, QueryExpansion, k_reciprocal_distances, query_expansion

    plain = _evaluate(viton, "plain")
    saved = load_npz(viton / "plain.npz")
    q, g = saved["query"]["pair_id"], saved["gallery"]["pair_id"]
    ql, gl = saved["query_labels"]["pair_id"], saved["gallery_labels"]["pair_id"]

    expanded = _evaluate(viton, "qe", query_expansion=QueryExpansion(2, 3.0))
    assert expanded["test_time"]["query_expansion"] == {"k": 2, "alpha": 3.0}
    by_hand = brute_force(query_expansion(q, g, 2, 3.0), g, ql, gl, exclude_self=False)
    for name in expanded["metric_names"]:
        assert expanded["metrics"]["overall"][name] == pytest.approx(by_hand[name], abs=1e-9), name
    assert recompute_from_npz(viton / "qe.npz") == expanded["metrics"]  # the npz remembers the option
    assert recompute_from_npz(viton / "qe.npz", query_expansion=None) == plain["metrics"]

    reranked = _evaluate(viton, "rr", rerank=KReciprocal(3, 2, 0.3))
    assert reranked["test_time"]["rerank"] == {"k1": 3, "k2": 2, "lambda": 0.3}
    distances = k_reciprocal_distances(q, g, 3, 2, 0.3)
    # brute_force ranks by descending scores: hand it negated distances
    by_hand = brute_force(-distances, np.eye(len(g), dtype=np.float32), ql, gl, exclude_self=False)
    for name in reranked["metric_names"]:
        assert reranked["metrics"]["overall"][name] == pytest.approx(by_hand[name], abs=1e-9), name
    assert reranked["metrics"] != plain["metrics"]
    assert recompute_from_npz(viton / "rr.npz") == reranked["metrics"]


def test_evaluate_cli_refuses_bad_test_time_options(viton) -> None:
    base = ["evaluate", "--checkpoint", str(viton / "run"), "--benchmark", "viton_c2s", "--data-root",
            str(viton / "data"), "--json", str(viton / "cli.json")]
    for extra, message in ((["--query-expansion", "2,x"], "--query-expansion: alpha must be a number, got 'x'"),
                           (["--rerank", "20,6,2"], r"--rerank: lambda must lie in [0, 1], got 2.0"),
                           (["--rerank", "20,6,0.3", "--query-expansion", "2,3"], "one at a time")):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    assert not (viton / "cli.json").exists()


# ---- search --query-expansion -------------------------------------------------------------------
def test_search_with_query_expansion_by_hand(flipped_index) -> None:
    from fashion_retrieval import open_index

    root, _, _, _ = flipped_index
    index = open_index(root / "index")
    ids, vectors = index._catalog.store(None).vectors()
    # near two catalog items, so that the neighbours weigh something
    noise = np.random.default_rng(0).normal(size=vectors.shape[1]).astype(np.float32)
    query = _unit((vectors[2] + vectors[5] + 0.3 * noise / np.linalg.norm(noise))[None])[0]

    def by_hand(allowed: list[int]) -> tuple[list[str], np.ndarray]:
        similarity = vectors[allowed] @ query
        nearest = [allowed[i] for i in np.argsort(-similarity, kind="stable")[:2]]
        expanded = query + sum(max(float(vectors[i] @ query), 0.0) ** 3 * vectors[i] for i in nearest)
        expanded /= np.linalg.norm(expanded)
        scores = vectors[allowed] @ expanded
        order = np.argsort(-scores, kind="stable")
        return [ids[allowed[i]] for i in order], scores[order]

    hits = index.search(query, k=len(ids), query_expansion="2,3")
    expected_ids, expected_scores = by_hand(list(range(len(ids))))
    assert [hit.id for hit in hits] == expected_ids
    np.testing.assert_allclose([hit.score for hit in hits], expected_scores, atol=1e-5)
    plain = index.search(query, k=len(ids))
    assert not np.allclose([hit.score for hit in plain], expected_scores, atol=1e-3)  # the expansion did something
    # with a filter, the neighbours come from the allowed items only
    allowed = [1, 3, 4]
    filtered = index.search(query, k=3, ids=[ids[i] for i in allowed], query_expansion="2,3")
    assert [hit.id for hit in filtered] == by_hand(allowed)[0]
    # k = 0 changes nothing
    assert [h.id for h in index.search(query, k=4, query_expansion="0,3")] == [h.id for h in index.search(query, k=4)]


def test_search_cli_refuses_a_malformed_query_expansion(flipped_index) -> None:
    root, _, photos, _ = flipped_index
    result = runner.invoke(app, ["search", "--index", str(root / "index"), str(photos[0]), "--query-expansion", "5"])
    assert result.exit_code == 2 and "--query-expansion '5': expected k,alpha" in result.output


def test_server_search_with_query_expansion_and_flip(flipped_index) -> None:
    from fastapi.testclient import TestClient

    from fashion_retrieval.data.images import load_rgb
    from fashion_retrieval.index.catalog import CatalogIndex
    from fashion_retrieval.index.embedders import embedder_for_index
    from fashion_retrieval.rerank import QueryExpansion
    from fashion_retrieval.serve.app import create_app

    root, _, photos, _ = flipped_index
    catalog = CatalogIndex.open(root / "index")
    embedder = embedder_for_index(catalog)
    assert embedder.flip is True  # the server embeds its queries as the catalog was embedded
    client = TestClient(create_app(root / "index", embedder), base_url="http://127.0.0.1")
    photo = {"image": ("q.jpg", photos[3].read_bytes(), "image/jpeg")}
    plain = client.post("/search", params={"k": 6}, files=photo).json()
    assert plain["results"][0]["id"] == photos[3].stem and plain["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert "query_expansion" not in plain
    expanded = client.post("/search", params={"k": 6, "query_expansion": "2,3"}, files=photo).json()
    assert expanded["query_expansion"] == {"k": 2, "alpha": 3.0}
    scores, ids = catalog.search(embedder.embed([load_rgb(photos[3])]), 6, query_expansion=QueryExpansion(2, 3.0))
    assert [row["id"] for row in expanded["results"]] == ids[0]
    np.testing.assert_allclose([row["score"] for row in expanded["results"]], scores[0], atol=1e-5)
    bad = client.post("/search", params={"query_expansion": "2"}, files=photo)
    assert bad.status_code == 400 and "expected k,alpha" in bad.json()["detail"]


def test_the_measurement_script_reports_plain_and_each_chosen_option(viton, tmp_path: Path) -> None:
    import subprocess
    import sys

    from fashion_retrieval.engine.evaluate import recompute_from_npz
    from fashion_retrieval.rerank import QueryExpansion

    _evaluate(viton, "script")
    npz = viton / "script.npz"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "test_time_options.py"
    completed = subprocess.run([sys.executable, str(script), "--val", str(npz), "--test", str(npz), "--quick",
                                "--repeat", "1", "--bootstrap", "50", "--json", str(tmp_path / "report.json")],
                               capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metric"] == "mAP" and report["command"].startswith("benchmarks/test_time_options.py")
    plain = recompute_from_npz(npz)["overall"]
    assert report["plain"]["test"]["mAP"] == round(100 * plain["mAP"], 2)
    chosen = report["chosen"]["QueryExpansion"]
    assert chosen["option"] == "--query-expansion 1,3"  # the quick grid's only QE setting
    expanded = recompute_from_npz(npz, query_expansion=QueryExpansion(1, 3.0))["overall"]
    assert chosen["test"]["mAP"] == round(100 * expanded["mAP"], 2)
    low, high = chosen["test_difference_interval"]
    assert low <= round(100 * (expanded["mAP"] - plain["mAP"]), 2) + 0.01 and high >= low
    assert report["chosen"]["KReciprocal"]["seconds_per_query"] > 0
    assert "| `plain` |" in completed.stdout
