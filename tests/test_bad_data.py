"""Every command against one corpus of bad inputs, written here in a few kilobytes.

A bad image is skipped and named with its reason (or, as a query, refused in one line); a
malformed annotation stops the command with one line naming the file and the line. Nothing ends
in a traceback. docs/reliability.md tabulates what these tests show.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from conftest import write_jpeg, write_truncated_jpeg
from test_checkpoint import _tiny  # also registers tiny_test_net
from test_data_check import row
from test_index_cli import assert_one_line_error
from test_serve import assert_error, upload
from test_train import write_synthetic_viton

from fashion_retrieval.cli import app
from fashion_retrieval.data.images import DEFAULT_MAX_PIXELS
from fashion_retrieval.data.table import SampleTable
from fashion_retrieval.index.catalog import CatalogIndex
from fashion_retrieval.serve.app import create_app
from fashion_retrieval.index.embedders import TorchEmbedder

runner = CliRunner()
# In-process the library's filter is reset by pytest for each test; the subprocess test below
# checks that a real run prints no such warning.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---- the corpus ------------------------------------------------------------------------------
def write_huge(path: Path) -> Path:
    """A real 10000x10000 image (100 megapixels, 300 MB once decoded to RGB) in 12 KB: one
    colour compresses that well, which is exactly what a decompression bomb exploits."""
    Image.new("1", (10_000, 10_000)).save(path, "PNG", optimize=True)
    return path


# kind -> (file name, writer, reason every command gives when it cannot read it; None: readable)
KINDS: dict[str, tuple[str, Callable[[Path], object] | None, str | None]] = {
    "empty": ("empty.jpg", lambda p: p.write_bytes(b""), "empty file"),
    "truncated": ("truncated.jpg", write_truncated_jpeg, "truncated or corrupt"),
    "text_named_jpg": ("notes.jpg", lambda p: p.write_text("not a photo\n"), "not an image (unrecognised format)"),
    "huge": ("huge.png", write_huge, f"too large: 10000x10000 pixels exceeds the limit of {DEFAULT_MAX_PIXELS}"),
    "missing": ("missing.jpg", None, "file not found"),  # listed in the annotations, never written
    "rgba_png": ("alpha.png", lambda p: Image.new("RGBA", (40, 56), (200, 30, 30, 0)).save(p, "PNG"), None),
    "cmyk_jpeg": ("cmyk.jpg", lambda p: Image.new("CMYK", (40, 56), (0, 200, 200, 0)).save(p, "JPEG"), None),
    "one_pixel": ("one_pixel.jpg", lambda p: write_jpeg(p, size=(1, 1)), None),
}
UNREADABLE = [kind for kind, (_, _, reason) in KINDS.items() if reason is not None]
READABLE = [kind for kind, (_, _, reason) in KINDS.items() if reason is None]
GOOD_PHOTOS = 8  # four products, two photos each
CATALOG_HEADER = ["path", "item_id", "domain", "split", "category", "attributes", "bbox"]


def write_bad_image(kind: str, path: Path) -> Path:
    writer = KINDS[kind][1]
    if writer is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path)
    return path


def write_catalog_csv(folder: Path, rows: list[list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "catalog.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CATALOG_HEADER)
        writer.writerows(rows)
    return folder / "catalog.csv"


def good_rows(folder: Path, count: int = GOOD_PHOTOS) -> list[list[str]]:
    rows = []
    for n in range(count):
        write_jpeg(folder / "images" / f"good{n}.jpg", size=(48, 64), color=(30 * n, 200 - 20 * n, 90))
        colour = json.dumps({"colour": "red" if n % 2 else "blue"})
        rows.append([f"images/good{n}.jpg", f"item{n // 2}", "shop", "train", "top", colour, ""])
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """``catalog/catalog.csv`` (the generic CSV format) listing good photos and one file of each
    bad kind, each its own product; returns the data root holding ``catalog/``."""
    data_root = tmp_path_factory.mktemp("bad-data")
    folder = data_root / "catalog"
    rows = good_rows(folder)
    for kind, (name, _, _) in KINDS.items():
        write_bad_image(kind, folder / "images" / name)
        rows.append([f"images/{name}", kind, "shop", "train", "top", json.dumps({"colour": "green"}), ""])
    write_catalog_csv(folder, rows)
    return data_root


def image_path(corpus: Path, kind: str) -> Path:
    return corpus / "catalog" / "images" / KINDS[kind][0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("bad-data-run")
    _tiny(run)
    return run


@pytest.fixture(scope="module")
def index(corpus, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-data-index") / "index"
    result = invoke("index", "build", "--checkpoint", checkpoint, "--images", corpus / "catalog" / "catalog.csv",
                    "--out", out)
    return out, result


def assert_names_each_unreadable_image(output: str, corpus: Path, prefix: str = "") -> None:
    for kind in UNREADABLE:
        assert f"{prefix}{image_path(corpus, kind)}: {KINDS[kind][2]}" in output, (kind, output)
    for kind in READABLE:
        assert str(image_path(corpus, kind)) not in output, (kind, output)
    assert "Traceback" not in output


# ---- bad images: every command skips and names them ------------------------------------------
def test_data_check_lists_each_unreadable_image_with_its_reason(corpus):
    # A real process: its stderr is what a user sees (pytest would swallow a warning in-process).
    result = subprocess.run([sys.executable, "-m", "fashion_retrieval", "data", "check", "--format", "csv",
                             "--root", str(corpus / "catalog"), "--workers", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    total = GOOD_PHOTOS + len(KINDS)
    assert row(result.stdout, "unreadable images") == ["unreadable images", f"{len(UNREADABLE)} of {total}"]
    assert_names_each_unreadable_image(result.stdout, corpus)
    # no traceback, and no DecompressionBombWarning for the 100-megapixel file it already refused
    assert result.stderr == ""


def test_train_skips_and_counts_each_unreadable_image(corpus, tmp_path):
    recipe = {
        "name": "bad-data", "seed": 0, "plugins": ["test_checkpoint"],
        # p = every product once, so the one step draws every bad file
        "data": {"format": "csv", "root": "catalog", "image_size": [32, 24], "num_workers": 0,
                 "sampler": {"kind": "pk", "p": GOOD_PHOTOS // 2 + len(KINDS), "k": 1}},
        "model": {"name": "tiny_test_net", "kwargs": {"feat_dim": 16}},
        "loss": {"terms": [{"name": "cross_entropy", "weight": 1.0}]},
        "optim": {"name": "adamw", "lr": 0.01},
        "train": {"epochs": 1, "max_steps_per_epoch": 1, "log_every": 1, "progress": False},
        "eval": {"benchmark": None},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = invoke("train", "--config", tmp_path / "recipe.yaml", "--data-root", corpus, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert f"(1 epochs, 1 steps, {len(UNREADABLE)} unreadable images skipped)" in result.output
    assert_names_each_unreadable_image(result.output, corpus)
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_evaluate_leaves_out_and_names_each_unreadable_image(checkpoint, tmp_path):
    # 40 pairs: the 8 of the test split (ids ending in 0 or 5) get one bad product photo each
    viton = write_synthetic_viton(tmp_path / "data" / "viton", pairs=40, broken=())
    test_pairs = [f"{n:06d}" for n in range(40) if n % 5 == 0]
    assert len(test_pairs) == len(KINDS)
    products = {}
    for pair, kind in zip(test_pairs, KINDS):
        products[kind] = viton / "product" / f"{pair}.jpg"
        products[kind].unlink()
        write_bad_image(kind, products[kind])
    json_out = tmp_path / "eval.json"
    result = invoke("evaluate", "--checkpoint", checkpoint, "--benchmark", "viton_c2s", "--data-root", tmp_path / "data",
                    "--json", json_out, "--device", "cpu", "--num-workers", "0")
    assert result.exit_code == 0, result.output
    assert f"{len(UNREADABLE)} unreadable images skipped" in result.output
    for kind in UNREADABLE:
        assert f"skipped {products[kind]}: {KINDS[kind][2]}" in result.output, kind
    assert "Traceback" not in result.output
    results = json.loads(json_out.read_text())
    # the readable odd photos stay in the gallery; queries whose product left it are not scored
    assert results["counts"] == {"queries": 8, "gallery": 8 - len(UNREADABLE), "skipped_images": len(UNREADABLE)}
    assert results["metrics"]["overall"]["queries"] == len(READABLE)


def test_index_build_indexes_odd_images_and_lists_unreadable_ones(corpus, index):
    out, result = index
    assert result.exit_code == 0, result.output
    total = GOOD_PHOTOS + len(KINDS)
    assert f"indexed {total - len(UNREADABLE)} of {total} images" in result.output
    assert_names_each_unreadable_image(result.output, corpus, prefix="skipped ")
    results = json.loads(invoke("search", "--index", out, image_path(corpus, "rgba_png"), "--top-k", total,
                                "--json").stdout)["results"]
    assert {Path(r["path"]).name for r in results} == (
        {f"good{n}.jpg" for n in range(GOOD_PHOTOS)} | {KINDS[kind][0] for kind in READABLE})


@pytest.mark.parametrize("kind", list(KINDS))
def test_search_answers_readable_queries_and_refuses_unreadable_ones(corpus, index, kind):
    out, _ = index
    result = invoke("search", "--index", out, image_path(corpus, kind), "--top-k", 3, "--json")
    reason = KINDS[kind][2]
    if reason is None:
        assert result.exit_code == 0, result.output
        assert len(json.loads(result.stdout)["results"]) == 3
    else:
        assert_one_line_error(result, str(image_path(corpus, kind)), reason)


@pytest.fixture(scope="module")
def client(index):
    out, _ = index
    return TestClient(create_app(out, TorchEmbedder(out / "model")), base_url="http://127.0.0.1")


# what the API answers for each bad upload; "missing" has no upload form
UPLOAD_ANSWERS = {"empty": (400, "empty upload"), "truncated": (400, "unreadable image"),
                  "text_named_jpg": (415, "not an image"), "huge": (413, "10000x10000")}


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "missing"])
def test_server_answers_or_refuses_each_upload(corpus, client, kind):
    response = client.post("/search", params={"k": 3}, files=upload(image_path(corpus, kind).read_bytes()))
    if kind in READABLE:
        assert response.status_code == 200, response.text
        assert len(response.json()["results"]) == 3
    else:
        assert_error(response, *UPLOAD_ANSWERS[kind])
    # a refused upload leaves the server answering the next client
    good = corpus / "catalog" / "images" / "good0.jpg"
    assert client.post("/search", files=upload(good.read_bytes())).status_code == 200


# ---- malformed annotations: one line naming the file and the line -----------------------------
BAD_LINE = 4  # header, two good rows, then the bad one
# case -> (the bad row as written to the file, what the message must say)
BAD_ROWS: dict[str, tuple[bytes, str]] = {
    "non_utf8_bytes": (b"images/x.jpg,caf\xe9,shop,train,top,,", "not UTF-8 text"),
    "too_few_columns": (b"images/x.jpg,itemX,shop", "wrong number of columns"),
    "too_many_columns": (b"images/x.jpg,itemX,shop,train,top,,,extra", "wrong number of columns"),
    "image_listed_twice": (b"images/good0.jpg,item0,shop,train,top,,", "listed again (first on line 2)"),
    "empty_item_id": (b"images/x.jpg,,shop,train,top,,", "empty item_id"),
    "unknown_domain": (b"images/x.jpg,itemX,customer,train,top,,", "domain must be one of"),
    "unknown_split": (b"images/x.jpg,itemX,shop,training,top,,", "split must be one of"),
    "attributes_not_json": (b'images/x.jpg,itemX,shop,train,top,"{""colour"": ",', "attributes is not valid JSON"),
    "attributes_not_an_object": (b'images/x.jpg,itemX,shop,train,top,"[""red""]",',
                                 "attributes must be a JSON object"),
    "attribute_value_is_an_object": (b'images/x.jpg,itemX,shop,train,top,"{""colour"": {""r"": 1}}",',
                                     "attribute 'colour' must be a value or a list of values"),
    "attributes_nested_too_deeply": (b"images/x.jpg,itemX,shop,train,top," + b"[" * 50_000 + b",",
                                     "attributes is not valid JSON (nested too deeply)"),
    # bad numbers in the bbox column: never a crash in a decoding worker or a garbage crop
    "bbox_nan": (b"images/x.jpg,itemX,shop,train,top,,nan 2 30 40", "bbox x1 must be finite, got nan"),
    "bbox_inf": (b"images/x.jpg,itemX,shop,train,top,,1 2 inf 40", "bbox x2 must be finite, got inf"),
    "bbox_inverted_x": (b"images/x.jpg,itemX,shop,train,top,,30 2 10 40", "bbox bounding box 30,2,10,40 has x2 < x1"),
    "bbox_inverted_y": (b"images/x.jpg,itemX,shop,train,top,,1 40 30 -2", "bbox bounding box 1,40,30,-2 has x2 < x1 or y2 < y1"),
    "bbox_not_a_number": (b"images/x.jpg,itemX,shop,train,top,,1 2 3O 40", "bbox x2 must be a number, got '3O'"),
    "bbox_three_numbers": (b"images/x.jpg,itemX,shop,train,top,,1 2 30", "bbox needs 4 numbers: x1 y1 x2 y2, got 3"),
}


def write_catalog_with_bad_row(folder: Path, bad_row: bytes) -> Path:
    path = write_catalog_csv(folder, good_rows(folder, count=BAD_LINE - 2))
    with open(path, "ab") as f:
        f.write(bad_row + b"\r\n")
    return path


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_malformed_catalog_rows_stop_every_command_naming_file_and_line(case, checkpoint, tmp_path):
    bad_row, problem = BAD_ROWS[case]
    catalog = write_catalog_with_bad_row(tmp_path / "catalog", bad_row)
    where = f"{catalog}:{BAD_LINE}: "

    check = invoke("data", "check", "--format", "csv", "--root", catalog.parent)
    assert check.exit_code == 1, check.output  # data check: 1 for a malformed annotation file
    assert check.stderr.startswith(f"error: {where}") and problem in check.stderr, check.stderr
    assert check.stderr.count("\n") == 1 and "Traceback" not in check.output

    build = invoke("index", "build", "--checkpoint", checkpoint, "--images", catalog, "--out", tmp_path / "index")
    assert_one_line_error(build, where, problem)
    assert not (tmp_path / "index").exists()

    recipe = {"name": "bad-row", "plugins": ["test_checkpoint"], "data": {"format": "csv", "root": "catalog"},
              "model": {"name": "tiny_test_net"}, "loss": {"terms": [{"name": "cross_entropy"}]}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    train = invoke("train", "--config", tmp_path / "recipe.yaml", "--data-root", tmp_path, "--out", tmp_path / "run")
    assert_one_line_error(train, where, problem)


# pairs.csv of the viton benchmark that `evaluate` reads: line 4 is pair 000002
BAD_PAIRS_LINES: dict[str, tuple[bytes, str]] = {
    "non_utf8_bytes": (b"000002,person/000002.jpg,product/caf\xe9.jpg", "not UTF-8 text"),
    "wrong_column_count": (b"000002,person/000002.jpg", "expected 3 columns, got 2"),
    "duplicate_id": (b"000001,person/000002.jpg,product/000002.jpg", "duplicate pair_id 000001 (first on line 3)"),
}


@pytest.mark.parametrize("case", list(BAD_PAIRS_LINES))
def test_malformed_benchmark_annotations_stop_evaluate_naming_file_and_line(case, checkpoint, tmp_path):
    bad_line, problem = BAD_PAIRS_LINES[case]
    viton = write_synthetic_viton(tmp_path / "viton", pairs=20, broken=())
    pairs = viton / "pairs.csv"
    lines = pairs.read_bytes().splitlines()
    lines[BAD_LINE - 1] = bad_line
    pairs.write_bytes(b"\n".join(lines) + b"\n")
    result = invoke("evaluate", "--checkpoint", checkpoint, "--benchmark", "viton_c2s", "--data-root", tmp_path,
                    "--json", tmp_path / "eval.json", "--device", "cpu", "--num-workers", "0")
    assert_one_line_error(result, f"{pairs}:{BAD_LINE}: ", problem)
    assert not (tmp_path / "eval.json").exists()


def test_null_attribute_values_mean_unlabelled_and_numbers_become_text(tmp_path):
    catalog = write_catalog_csv(tmp_path, [
        ["a.jpg", "a", "shop", "train", "", json.dumps({"colour": None, "size": 38}), ""],
        ["b.jpg", "b", "shop", "train", "", json.dumps({"colour": "red", "style": ["casual", None]}), ""],
    ])
    table = SampleTable.from_csv(catalog)
    assert [s.attributes for s in table] == [{"size": "38"}, {"colour": "red", "style": ("casual",)}]
    assert table.attribute_values("colour") == ["red"]  # never a class named "None"


# ---- file names ------------------------------------------------------------------------------
NOT_UTF8_NAME = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name, as old cameras and zip files write them
SHOWN_NAME = "caf\\xe9.jpg"


def test_file_names_that_are_not_utf8_are_refused_by_name(checkpoint, tmp_path):
    folder = tmp_path / "photos"
    write_jpeg(folder / "tops" / "fine.jpg")
    try:
        write_jpeg(folder / "tops" / NOT_UTF8_NAME)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not store names that are not UTF-8")
    check = invoke("data", "check", "--format", "folder", "--root", folder)
    assert check.exit_code == 1, check.output
    assert check.stderr == f"error: {folder / 'tops' / SHOWN_NAME}: file name is not UTF-8; rename it " \
                           "(e.g. convmv -f latin1 -t utf8)\n"
    # a plain folder of photos, the index's own listing: refused before the index is written
    build = invoke("index", "build", "--checkpoint", checkpoint, "--images", folder / "tops", "--out", tmp_path / "i")
    assert_one_line_error(build, SHOWN_NAME, "file name is not UTF-8")
    assert not (tmp_path / "i").exists()


def test_a_query_named_in_another_encoding_is_named_readably(corpus, index, tmp_path):
    out, _ = index
    query = tmp_path / NOT_UTF8_NAME
    try:
        query.write_text("not a photo either")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not store names that are not UTF-8")
    assert_one_line_error(invoke("search", "--index", out, query), f"{tmp_path}/{SHOWN_NAME}: not an image")


def test_same_file_name_in_two_folders_of_one_item_gets_two_ids(checkpoint, tmp_path):
    # front.jpg in both folders: neither item id nor item id + file name tells them apart
    catalog = write_catalog_csv(tmp_path, [["summer/front.jpg", "shirt", "shop", "", "", "", ""],
                                           ["winter/front.jpg", "shirt", "shop", "", "", "", ""]])
    write_jpeg(tmp_path / "summer" / "front.jpg", color=(200, 0, 0))
    write_jpeg(tmp_path / "winter" / "front.jpg", color=(0, 0, 200))
    result = invoke("index", "build", "--checkpoint", checkpoint, "--images", catalog, "--out", tmp_path / "index")
    assert result.exit_code == 0, result.output
    catalog_index = CatalogIndex.open(tmp_path / "index")
    assert len(catalog_index) == 2
    assert catalog_index.get_metadata("shirt:summer/front.jpg")["path"].endswith("summer/front.jpg")
