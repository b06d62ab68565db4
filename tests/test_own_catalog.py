"""A shop's own catalog, as it comes: its own column names (from the command line or a YAML
file), a spreadsheet export, a folder or one image as the catalog, and a benchmark built from it
(instance and attribute level) through `evaluate` and a recipe's `eval.benchmark: catalog`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import write_jpeg
from test_checkpoint import _tiny  # also registers tiny_test_net
from test_index_cli import assert_one_line_error

from fashion_retrieval.cli import app
from fashion_retrieval.config import config_from_dict
from fashion_retrieval.data.benchmarks import BENCHMARKS
from fashion_retrieval.data.readers.catalog import parse_columns, read_catalog
from fashion_retrieval.data.table import AnnotationError
from fashion_retrieval.engine.evaluate import recompute_from_npz
from fashion_retrieval.index.catalog import CatalogIndex
from fashion_retrieval.registry import ConfigError

runner = CliRunner()
COLUMNS = "path=Bild,item_id=Artikelnummer,category=Warengruppe,split=Satz,query=Kundenfoto,Farbe,Typ"
# (sku, photo, group, colour, type, set, customer photo): 4 products, 2 photos each; train and test
PRODUCTS = [
    ("A-1", "a1_front.jpg", "Oberteile", "rot", "Hemd", "train", ""),
    ("A-1", "a1_back.jpg", "Oberteile", "rot", "Hemd", "train", ""),
    ("B-2", "b2_front.jpg", "Kleider", "", "Kleid; lang", "train", ""),
    ("B-2", "b2_side.jpg", "Kleider", "blau", "Kleid; lang", "train", ""),
    ("C-3", "c3_front.jpg", "Oberteile", "blau", "Hemd", "test", "ja"),
    ("C-3", "c3_shop.jpg", "Oberteile", "blau", "Hemd", "test", ""),
    ("D-4", "d4_front.jpg", "Kleider", "rot", "Kleid; lang", "test", "ja"),
    ("D-4", "d4_shop.jpg", "Kleider", "rot", "Kleid; lang", "test", "nein"),
]
HEADER = ("Artikelnummer", "Bild", "Warengruppe", "Farbe", "Typ", "Satz", "Kundenfoto")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_photos(folder: Path) -> None:
    for n, product in enumerate(PRODUCTS):
        write_jpeg(folder / "fotos" / product[1], size=(48, 64), color=(30 * n, 200 - 20 * n, 90))


def spreadsheet_export(folder: Path, name: str = "export.csv") -> Path:
    """What a German spreadsheet writes: a byte-order mark, semicolons, CRLF, quoted cells (one
    holding the delimiter), empty cells and blank rows at the end."""
    write_photos(folder)
    lines = [";".join(HEADER)]
    for sku, photo, group, colour, kind, split, query in PRODUCTS:
        query = {"ja": "yes", "nein": "no"}.get(query, query)
        lines.append(";".join([sku, f"fotos/{photo}", group, colour, f'"{kind}"', split, query]))
    lines += [";;;;;;", ";;;;;;"]
    path = folder / name
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    return path


@pytest.fixture
def export(tmp_path) -> Path:
    return spreadsheet_export(tmp_path / "shop")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("own-catalog-run")
    _tiny(run)
    return run


# ---- reading: the mapping, a spreadsheet export -------------------------------------------------
def test_a_spreadsheet_export_reads_with_the_shops_own_column_names(export):
    table = read_catalog(export, columns=COLUMNS)
    assert len(table) == len(PRODUCTS)  # the blank rows are no images
    first = table[0]
    assert (first.path, first.item_id, first.category, first.split) == ("fotos/a1_front.jpg", "A-1", "Oberteile", "train")
    assert first.attributes == {"Farbe": "rot", "Typ": "Hemd"}
    assert table[2].attributes == {"Typ": "Kleid; lang"}  # empty cell: unlabelled; quoted ';' kept
    assert [s.split for s in table][4:] == ["query", "gallery", "query", "gallery"]  # test rows: the query column
    assert table.resolve(first) == export.parent / "fotos" / "a1_front.jpg"


def test_the_mapping_can_be_a_yaml_file_that_renames_attributes_and_names_the_encoding(tmp_path):
    folder = tmp_path / "shop"
    write_photos(folder)
    rows = ["Artikelnummer,Bild,Farbe"] + [f"{p[0]},fotos/{p[1]},{'türkis' if n == 0 else p[3]}"
                                           for n, p in enumerate(PRODUCTS)]
    (folder / "export.csv").write_bytes("\r\n".join(rows).encode("cp1252"))
    mapping = tmp_path / "columns.yaml"
    mapping.write_text(yaml.safe_dump({"path": "Bild", "item_id": "Artikelnummer",
                                       "attributes": {"colour": "Farbe"}, "encoding": "cp1252"}))
    table = read_catalog(folder / "export.csv", columns=str(mapping))
    assert table[0].attributes == {"colour": "türkis"} and table[0].item_id == "A-1"
    # without the encoding the file is refused naming the line and what to do
    with pytest.raises(AnnotationError, match=r"export\.csv:2: not UTF-8 text .*encoding: cp1252"):
        read_catalog(folder / "export.csv", columns="path=Bild,item_id=Artikelnummer,Farbe")


def test_todays_fixed_names_still_read_without_a_mapping(tmp_path):
    write_jpeg(tmp_path / "a.jpg")
    (tmp_path / "catalog.csv").write_text('path,item_id,domain,split,category,attributes,bbox\n'
                                          'a.jpg,a,shop,train,top,"{""colour"": ""red""}",1 2 3 4\n')
    table = read_catalog(tmp_path / "catalog.csv")
    assert table[0].attributes == {"colour": "red"} and table[0].bbox == (1, 2, 3, 4) and table[0].domain == "shop"


def test_the_mapping_works_in_every_command_that_takes_a_catalog(export, checkpoint, tmp_path):
    check = invoke("data", "check", "--root", export, "--columns", COLUMNS)
    assert check.exit_code == 0, check.output
    assert "Farbe" in check.output and "Typ" in check.output
    check = invoke("data", "check", "--format", "csv", "--root", export.parent, "--option", "file=export.csv",
                   "--columns", COLUMNS)
    assert check.exit_code == 0, check.output
    build = invoke("index", "build", "--checkpoint", checkpoint, "--images", export, "--columns", COLUMNS,
                   "--out", tmp_path / "index")
    assert build.exit_code == 0, build.output
    index = CatalogIndex.open(tmp_path / "index")
    assert len(index) == len(PRODUCTS)
    assert index.get_metadata("A-1:a1_front")["attributes"] == {"Farbe": "rot", "Typ": "Hemd"}
    assert index.get_metadata("A-1:a1_front")["category"] == "Oberteile"


# ---- a folder or one image as the catalog --------------------------------------------------------
def test_one_image_is_a_catalog_wherever_a_catalog_is_expected(checkpoint, tmp_path):
    photo = write_jpeg(tmp_path / "photos" / "summer-dress.jpg", size=(48, 64))
    table = read_catalog(photo)
    assert [(s.path, s.item_id) for s in table] == [("summer-dress.jpg", "summer-dress")]
    check = invoke("data", "check", "--root", photo)
    assert check.exit_code == 0, check.output
    build = invoke("index", "build", "--checkpoint", checkpoint, "--images", photo, "--out", tmp_path / "index")
    assert build.exit_code == 0 and "re-save" not in build.output, build.output
    assert CatalogIndex.open(tmp_path / "index").get_metadata("summer-dress")["path"] == str(photo.resolve())
    # a photo saved without a suffix is recognised by its bytes, not read as a CSV
    bare = tmp_path / "photos" / "no-suffix"
    bare.write_bytes(photo.read_bytes())
    assert read_catalog(bare)[0].item_id == "no-suffix"


def test_a_folder_of_images_or_class_folders_is_a_catalog(tmp_path):
    for name in ("a.jpg", "b.png"):
        write_jpeg(tmp_path / "loose" / name)
    assert sorted(s.item_id for s in read_catalog(tmp_path / "loose")) == ["a", "b"]
    write_jpeg(tmp_path / "classes" / "dress" / "x.jpg")
    write_jpeg(tmp_path / "classes" / "shirt" / "y.jpg")
    assert {(s.item_id, s.category) for s in read_catalog(tmp_path / "classes")} == {("x", "dress"), ("y", "shirt")}


# ---- errors: file, line and column -------------------------------------------------------------
@pytest.mark.parametrize("columns, message", [
    ("path=Bild,item_id=Artikel", r"export\.csv:1: no column 'Artikel' for item_id \(did you mean 'Artikelnummer'\?\)"),
    ("path=Bild", r"export\.csv:1: no 'item_id' column; the header has 'Artikelnummer', .* --columns"),
    ("path=Bild,item_id=Artikelnummer,domain=Farbe", r"export\.csv:2: column 'Farbe': domain must be one of "
                                                      r"consumer, shop, unknown \(or empty\), got 'rot'"),
    ("path=Bild,item_id=Artikelnummer,query=Typ", r"export\.csv:2: column 'Typ': query must be yes or no"),
    ("path=Bild,item_id=Artikelnummer,Bild", r"export\.csv:1: column 'Bild' is both attribute 'Bild' and another role"),
])
def test_catalog_errors_name_the_file_line_and_column(export, columns, message):
    with pytest.raises(AnnotationError, match=message):
        read_catalog(export, columns=columns)


@pytest.mark.parametrize("columns, message", [
    ("itemid=sku", r"--columns: unknown role 'itemid' \(did you mean 'item_id'\?\)"),
    ("path=", r"--columns: path= needs a column name"),
    ("path=a,path=b", r"--columns: role 'path' is mapped twice"),
    ("..", r"--columns: attribute name '\.\.' is a relative folder reference"),
    ("colour\nx", r"--columns: attribute name 'colour\\nx' contains a control character"),
])
def test_mapping_mistakes_are_one_line_naming_the_option(columns, message):
    with pytest.raises(ConfigError, match=message):
        parse_columns(columns)


def test_attribute_names_from_a_yaml_mapping_go_through_the_names_rule(tmp_path):
    mapping = tmp_path / "columns.yaml"
    mapping.write_text(yaml.safe_dump({"item_id": "sku", "attributes": {"..": "Farbe"}}))
    with pytest.raises(ConfigError, match=rf"{mapping}: attribute name '\.\.' is a relative folder reference"):
        parse_columns(str(mapping))


def test_commands_print_catalog_errors_in_one_line(export, checkpoint, tmp_path):
    bad = "path=Bild,item_id=Artikelnummer,domain=Farbe"
    check = invoke("data", "check", "--root", export, "--columns", bad)
    assert check.exit_code == 1 and check.stderr.startswith(f"error: {export}:2: column 'Farbe': domain"), check.stderr
    build = invoke("index", "build", "--checkpoint", checkpoint, "--images", export, "--columns", "itemid=sku",
                   "--out", tmp_path / "index")
    assert_one_line_error(build, "--columns: unknown role 'itemid'")
    evaluate = invoke("evaluate", "--checkpoint", checkpoint, "--catalog", export, "--columns", bad,
                      "--json", tmp_path / "eval.json", "--device", "cpu")
    assert_one_line_error(evaluate, f"{export}:2: column 'Farbe'")
    misplaced = invoke("evaluate", "--checkpoint", checkpoint, "--benchmark", "viton_c2s", "--columns", COLUMNS,
                       "--json", tmp_path / "eval.json")
    assert_one_line_error(misplaced, "--columns is for --benchmark catalog, not viton_c2s")


# ---- the benchmark -----------------------------------------------------------------------------
def test_instance_benchmark_queries_the_marked_photos_against_the_rest_of_the_split(export):
    benchmark = BENCHMARKS.build("catalog", data_root=Path("/unused"), split="test", catalog=export, columns=COLUMNS)
    assert benchmark.kind == "instance" and benchmark.protocol["queries"] == "split=query"
    assert [s.path for s in benchmark.queries] == ["fotos/c3_front.jpg", "fotos/d4_front.jpg"]
    assert [s.path for s in benchmark.gallery] == ["fotos/c3_shop.jpg", "fotos/d4_shop.jpg"]
    assert benchmark.query_labels["item"].tolist() == benchmark.gallery_labels["item"].tolist() == [0, 1]
    # by domain instead, on a catalog whose rows name it; the train split is never evaluated
    val = BENCHMARKS.build("catalog", data_root=Path("/unused"), split="train", catalog=export, columns=COLUMNS,
                           queries="all")
    assert val.exclude_self and len(val.queries) == 4 and val.relevant_counts("item").tolist() == [1, 1, 1, 1]


def test_attribute_benchmark_relevance_is_the_same_value(export):
    benchmark = BENCHMARKS.build("catalog", data_root=Path("/unused"), split="train", catalog=export, columns=COLUMNS,
                                 queries="all", level="attribute", attributes="Farbe,category")
    assert benchmark.kind == "attribute" and benchmark.attributes == ["Farbe", "category"]
    assert benchmark.values["Farbe"] == ["blau", "rot"]
    assert benchmark.query_labels["Farbe"].tolist() == [1, 1, -1, 0]  # the empty cell is unknown
    assert benchmark.relevant_counts("Farbe").tolist() == [1, 1, 0, 0]
    assert benchmark.query_labels["category"].tolist() == [1, 1, 0, 0]  # Kleider, Oberteile
    with pytest.raises(ConfigError, match="no attribute 'colour' in the catalog"):
        BENCHMARKS.build("catalog", data_root=Path("/unused"), catalog=export, columns=COLUMNS, level="attribute",
                         attributes="colour")


@pytest.mark.parametrize("level", ["instance", "attribute"])
def test_evaluate_on_your_own_catalog_writes_the_same_json_npz_and_plots(export, checkpoint, tmp_path, level):
    json_out = tmp_path / "eval.json"
    args = ["--queries", "all", "--split", "train"] if level == "attribute" else []
    result = invoke("evaluate", "--checkpoint", checkpoint, "--catalog", export, "--columns", COLUMNS,
                    "--level", level, *args, "--json", json_out, "--plots", tmp_path / "plots",
                    "--device", "cpu", "--num-workers", "0")
    assert result.exit_code == 0, result.output
    results = json.loads(json_out.read_text())
    assert results["benchmark"] == "catalog" and results["protocol"]["level"] == level
    expected_names = ["MAP@all", "MAP@100", "Recall@100"] if level == "attribute" else \
        ["top1", "top5", "top10", "top20", "top50", "mAP"]
    assert results["metric_names"] == expected_names
    assert set(results["metrics"]["per_attribute"]) == ({"Farbe", "Typ"} if level == "attribute" else {"item"})
    recomputed = recompute_from_npz(json_out.with_suffix(".npz"))
    assert np.isclose(recomputed["overall"]["mAP" if level == "instance" else "MAP@all"],
                      results["metrics"]["overall"]["mAP" if level == "instance" else "MAP@all"])
    assert (tmp_path / "plots" / "topk_accuracy.png").is_file()


def test_a_recipe_trains_and_evaluates_on_its_own_catalog(export, tmp_path):
    recipe = {
        "name": "shop", "seed": 0, "plugins": ["test_checkpoint"],
        "data": {"format": "csv", "root": str(export.relative_to(tmp_path)), "image_size": [32, 24],
                 "num_workers": 0, "options": {"columns": COLUMNS}, "sampler": {"kind": "pk", "p": 2, "k": 2}},
        "model": {"name": "tiny_test_net", "kwargs": {"feat_dim": 16}},
        "loss": {"terms": [{"name": "cross_entropy", "weight": 1.0}]},
        "train": {"epochs": 1, "max_steps_per_epoch": 1, "progress": False},
        "eval": {"benchmark": "catalog", "final_split": "test"},
    }
    assert config_from_dict(recipe).benchmark_options() == {
        "catalog": recipe["data"]["root"], "format": "csv", "options": {"columns": COLUMNS}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = invoke("train", "--config", tmp_path / "recipe.yaml", "--data-root", tmp_path, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluation["benchmark"] == "catalog" and evaluation["counts"]["queries"] == 2
    assert evaluation["protocol"]["queries"] == "split=query"
