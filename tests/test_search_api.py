"""Filtered search through the Python API, the CLI (single and batch) and HTTP; the README's
Python example run as written."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from catalog_fixtures import model_ranking as uncached_model_ranking, save_tiny_checkpoint, write_catalog
from fashion_retrieval.cli import app

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["Shirts", "Jeans", "Dresses"]
runner = CliRunner()


_rankings: dict = {}


def model_ranking(checkpoint, query, photos) -> list[str]:
    """The model's own ranking (a model load and 12 embeddings: computed once per query)."""
    key = (str(checkpoint), str(query))
    if key not in _rankings:
        _rankings[key] = uncached_model_ranking(checkpoint, query, photos)
    return list(_rankings[key])


def catalog_rows(photos: list[Path]) -> list[dict]:
    """Category cycles over three; gender alternates; baseColour is multi-valued for item 0."""
    rows = []
    for i, photo in enumerate(photos):
        attributes = {"gender": "Men" if i % 2 else "Women", "baseColour": ["Red", "Blue"] if i == 0 else "Blue" if i % 3 else "Red"}
        rows.append({"path": photo.name, "item_id": photo.stem, "category": CATEGORIES[i % 3],
                     "attributes": json.dumps(attributes)})
    return rows


def write_shop_csv(folder: Path, photos: list[Path]) -> Path:
    table = folder / "shop.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["path", "item_id", "category", "attributes"])
        writer.writeheader()
        writer.writerows(catalog_rows(photos))
    return table


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A 12-photo shop catalog (CSV with category and attributes) indexed by a plain model."""
    from fashion_retrieval import build_index

    root = tmp_path_factory.mktemp("shop")
    checkpoint = save_tiny_checkpoint(root / "run", "global_net")
    photos = write_catalog(root / "photos", 12)
    index = build_index(checkpoint, write_shop_csv(root / "photos", photos), root / "index")
    return root, checkpoint, photos, index


def expected(checkpoint, query, photos, keep) -> list[str]:
    """The model's own ranking of the catalog photos that ``keep(i)`` accepts."""
    allowed = {photos[i].stem for i in range(len(photos)) if keep(i)}
    return [stem for stem in model_ranking(checkpoint, query, photos) if stem in allowed]


def men_shirts_or_jeans(i: int) -> bool:
    return CATEGORIES[i % 3] in ("Shirts", "Jeans") and i % 2 == 1


# ---- Python API -----------------------------------------------------------------------------
def test_api_search_with_filters_matches_the_model_ranking(shop):
    _, checkpoint, photos, index = shop
    query = photos[4]
    hits = index.search(query, k=12, filters={"category": ["Shirts", "Jeans"], "gender": "Men"})
    assert [h.id for h in hits] == expected(checkpoint, query, photos, men_shirts_or_jeans)
    assert all(h.attributes["gender"] == "Men" and h.category in ("Shirts", "Jeans") for h in hits)
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    top3 = index.search(query, k=3, filters={"category": ["Shirts", "Jeans"], "gender": "Men"})
    assert [h.id for h in top3] == [h.id for h in hits[:3]]
    # a value inside a multi-valued attribute; allowed ids
    assert {h.id for h in index.search(query, k=12, filters={"baseColour": "Red"})} == {"item000", "item003", "item006", "item009"}
    assert {h.id for h in index.search(query, k=12, ids=["item001", "item002", "nope"])} == {"item001", "item002"}


def test_api_embeds_paths_and_pil_images_alike_and_searches_by_vector(shop):
    from fashion_retrieval import load_model

    root, checkpoint, photos, index = shop
    model = load_model(checkpoint)
    from_paths = model.embed(photos[:3])
    from_pil = model.embed([Image.open(p) for p in photos[:3]])
    assert from_paths.shape == (3, model.feat_dim) and np.allclose(from_paths, from_pil, atol=1e-6)
    assert np.allclose(np.linalg.norm(from_paths, axis=1), 1.0, atol=1e-5)
    assert np.allclose(load_model(root / "index").embed(photos[0]), from_paths[:1], atol=1e-6)
    hits = index.search(from_paths[1], k=2)
    assert hits[0].id == "item001" and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_api_errors_name_the_field_or_source(shop, tmp_path):
    from fashion_retrieval import FilterError, load_model

    _, _, photos, index = shop
    with pytest.raises(FilterError, match="unknown filter field 'colour'; this index has baseColour, category"):
        index.search(photos[0], filters={"colour": "Red"})
    with pytest.raises(Exception, match="zoo:no_such_model: no such zoo model"):
        load_model("zoo:no_such_model")
    assert index.filter_fields == ["baseColour", "category", "domain", "gender", "item_id"]
    assert index.facets()["category"] == {"Dresses": 4, "Jeans": 4, "Shirts": 4}


def test_api_loads_a_zoo_model_by_name(shop, tmp_path, monkeypatch):
    from fashion_retrieval import load_model
    from fashion_retrieval.zoo import add_to_zoo

    _, checkpoint, photos, _ = shop
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    meta = json.loads((checkpoint / "meta.json").read_text())
    (run / "meta.json").write_text(json.dumps({**meta, "dataset": {"format": "fashion_product"}}))
    monkeypatch.setenv("FASHION_RETRIEVAL_ZOO", str(tmp_path / "zoo"))
    add_to_zoo(run, "tiny", "a test model", "consumer-to-shop")
    from_zoo = load_model("zoo:tiny").embed(photos[:2])  # float16 weights: close, not identical
    assert np.allclose(from_zoo, load_model(checkpoint).embed(photos[:2]), atol=2e-2)


def test_package_import_stays_light():
    """`import fashion_retrieval` (every CLI start) must not import the API's heavy modules."""
    code = "import sys, fashion_retrieval; print('numpy' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.stdout.split() == ["False", "False"]


# ---- CLI ------------------------------------------------------------------------------------
def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_filters_and_ids_file(shop, tmp_path):
    root, checkpoint, photos, _ = shop
    query = photos[4]
    result = run_cli("search", query, "--index", root / "index", "--top-k", "12", "--json",
                     "--filter", "category=Shirts", "--filter", "category=Jeans", "--filter", "gender=Men")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert [r["id"] for r in answer["results"]] == expected(checkpoint, query, photos, men_shirts_or_jeans)
    assert answer["filters"] == {"category": ["Jeans", "Shirts"], "gender": ["Men"]}
    ids = tmp_path / "ids.txt"
    ids.write_text("item002\n\nitem005\nitem007\n")
    result = run_cli("search", query, "--index", root / "index", "--json", "--ids-file", ids, "--filter", "gender=Men")
    assert [r["id"] for r in json.loads(result.stdout)["results"]] == [
        s for s in model_ranking(checkpoint, query, photos) if s in ("item005", "item007")]


@pytest.mark.parametrize("args, fragments", [
    (["--filter", "colour=Red"], ["unknown filter field 'colour'", "this index has baseColour, category"]),
    (["--filter", "category"], ["'category' is not FIELD=VALUE"]),
    (["--ids-file", "missing.txt"], ["missing.txt: file not found"]),
    (["--out", "results.txt"], ["results.txt: --out must end in .json or .csv"]),
])
def test_cli_bad_filters_fail_in_one_line(shop, args, fragments):
    root, _, photos, _ = shop
    assert_one_line_error(run_cli("search", photos[0], "--index", root / "index", *args), *fragments)


def test_cli_batch_over_a_folder_and_a_csv_writes_json_and_csv(shop, tmp_path):
    root, checkpoint, photos, _ = shop
    queries = tmp_path / "queries"
    queries.mkdir()
    for photo in photos[:3]:
        (queries / photo.name).write_bytes(photo.read_bytes())
    (queries / "broken.jpg").write_text("not a photo")
    out = tmp_path / "results.json"
    result = run_cli("search", queries, "--index", root / "index", "--top-k", "2", "--out", out,
                     "--filter", "gender=Women")
    assert result.exit_code == 0, result.output
    assert "wrote 3 of 4 queries' results" in result.stdout and "skipped" in result.stderr
    document = json.loads(out.read_text())
    assert [q["query"] for q in document["queries"]] == [str(queries / n) for n in
                                                         ("broken.jpg", "item000.jpg", "item001.jpg", "item002.jpg")]
    assert "not an image" in document["queries"][0]["error"]
    women = lambda i: i % 2 == 0  # noqa: E731
    for entry, photo in zip(document["queries"][1:], photos[:3]):
        assert [r["id"] for r in entry["results"]] == expected(checkpoint, photo, photos, women)[:2]

    table = tmp_path / "queries.csv"
    table.write_text("path,note\nqueries/item001.jpg,x\nqueries/item002.jpg,y\n")
    out_csv = tmp_path / "results.csv"
    result = run_cli("search", table, "--index", root / "index", "--top-k", "3", "--out", out_csv)
    assert result.exit_code == 0, result.output
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and rows[0]["query"] == str(tmp_path / "queries" / "item001.jpg")
    assert rows[0]["id"] == "item001" and float(rows[0]["score"]) == pytest.approx(1.0, abs=1e-4)
    assert json.loads(rows[0]["attributes"])["gender"] == "Men"
    assert oct(out_csv.stat().st_mode & 0o777) == oct(0o644)

    grid = tmp_path / "grid.png"
    result = run_cli("search", queries, "--index", root / "index", "--top-k", "4", "--grid", grid, "--json")
    assert result.exit_code == 0, result.output
    with Image.open(grid) as picture:  # three readable queries: three rows of query + 4 results
        assert picture.format == "PNG" and picture.width > 5 * 96 and picture.height > 3 * 128
    assert "drew 3 queries' results" in result.stderr
    assert run_cli("search", queries, "--index", root / "index", "--grid", tmp_path / "grid.jpg").exit_code == 2


# ---- HTTP -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(shop):
    from fashion_retrieval.serve.app import create_app
    from fashion_retrieval.serve.embedders import TorchEmbedder

    root = shop[0]
    return TestClient(create_app(root / "index", TorchEmbedder(root / "index" / "model")), base_url="http://127.0.0.1")


def post_search(client, photo: Path, params, data=None):
    return client.post("/search", params=params, data=data, files={"image": (photo.name, photo.read_bytes(), "image/jpeg")})


def test_http_filters_by_query_parameters(shop, client):
    _, checkpoint, photos, _ = shop
    query = photos[4]
    response = post_search(client, query, [("k", 12), ("category", "Shirts"), ("category", "Jeans"), ("gender", "Men")])
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [r["id"] for r in answer["results"]] == expected(checkpoint, query, photos, men_shirts_or_jeans)
    assert answer["filters"] == {"category": ["Jeans", "Shirts"], "gender": ["Men"]}
    # allowed ids as repeated parameters and, for long lists, as a form field (one per line)
    response = post_search(client, query, [("ids", "item001"), ("ids", "item002")], data={"ids": "item003\nitem004"})
    assert {r["id"] for r in response.json()["results"]} == {"item001", "item002", "item003", "item004"}
    response = post_search(client, query, {"attributes.gender": "Women", "k": 12})
    assert {r["metadata"]["attributes"]["gender"] for r in response.json()["results"]} == {"Women"}


def test_http_unknown_parameters_are_422_naming_them(shop, client):
    photos = shop[2]
    response = post_search(client, photos[0], {"colour": "Red"})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", "colour"]
    assert "unknown filter field 'colour'" in error["msg"] and "baseColour" in error["msg"]
    response = client.get("/health", params={"verbose": "1"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "verbose"]
    assert "unknown query parameter 'verbose'" in response.json()["detail"][0]["msg"]
    assert client.get("/health").status_code == 200


def test_http_filters_lists_fields_values_and_labels(client):
    answer = client.get("/filters").json()
    assert answer["fields"] == ["baseColour", "category", "domain", "gender", "item_id"]
    assert answer["values"]["gender"] == {"Men": 6, "Women": 6}
    assert answer["values"]["baseColour"] == {"Blue": 9, "Red": 4}  # item000 has both
    assert "item_id" not in answer["values"]
    assert answer["labels"]["baseColour"] == "Base colour"


@pytest.mark.parametrize("name, label", [("baseColour", "Base colour"), ("articleType", "Article type"),
                                         ("sleeve_length", "Sleeve length"), ("item_id", "Item id"),
                                         ("colour", "Colour"), ("SKU", "SKU"), ("HTTPStatus", "HTTP status")])
def test_human_labels(name, label):
    from fashion_retrieval.serve.app import human_label

    assert human_label(name) == label


# ---- README ---------------------------------------------------------------------------------
def readme_python_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The files the README's example names are made here; its code runs unchanged."""
    checkpoint = save_tiny_checkpoint(tmp_path / "runs" / "global", "global_net")
    photos = write_catalog(tmp_path / "shop-photos", 12)
    write_shop_csv(tmp_path / "shop-photos", photos)
    for name, photo in (("query.jpg", photos[7]), ("other.jpg", photos[2])):
        (tmp_path / name).write_bytes(photo.read_bytes())
    queries = tmp_path / "customer-photos"
    queries.mkdir()
    (queries / "a.jpg").write_bytes(photos[1].read_bytes())
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_block(), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed, "the README example prints its results"
    men_shirts = [photos[i].stem for i in range(12) if i % 3 == 0 and i % 2 == 1]
    first = printed[0].split()
    assert first[0] == "1" and first[1] in men_shirts
    assert (tmp_path / "catalog-index" / "index.json").is_file()
    assert checkpoint.is_dir()
