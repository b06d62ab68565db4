from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from conftest import write_fashion_product, write_truncated_jpeg, write_viton
from fashion_retrieval.cli import app
from fashion_retrieval.data.check import verify_images
from fashion_retrieval.data.readers import READERS

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["data", *args])


def row(output: str, name: str) -> list[str]:
    """The cells of the first table row starting with ``name``."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row '{name}' in:\n{output}")


@pytest.fixture
def catalog_with_bad_images(tmp_path):
    root = write_fashion_product(tmp_path / "fp")
    write_truncated_jpeg(root / "images" / "11.jpg")
    (root / "images" / "15.jpg").write_bytes(b"")
    (root / "images" / "20.jpg").write_text("<html>404 not found</html>")
    return root


def test_check_reports_counts_and_unreadable_images(catalog_with_bad_images):
    result = run("check", "--format", "fashion_product", "--root", str(catalog_with_bad_images), "--workers", "2")
    assert result.exit_code == 0, result.output
    out = result.output
    assert row(out, "images")[1] == "10" and row(out, "items")[1] == "10"
    assert row(out, "categories")[1] == "8" and row(out, "bounding boxes")[1] == "0"
    assert row(out, "unreadable images")[1] == "3 of 10"
    assert row(out, "train") == ["train", "1", "1", "1"]  # columns: shop, images, items
    assert row(out, "val") == ["val", "2", "2", "2"]
    assert row(out, "test") == ["test", "7", "7", "7"]
    assert row(out, "Tshirts") == ["Tshirts", "3"]  # images per category
    assert row(out, "gender") == ["gender", "2", "10"]
    assert row(out, "usage") == ["usage", "4", "9"]
    unreadable = {line.strip().rsplit("/", 1)[-1] for line in out.splitlines() if "images/" in line}
    assert unreadable == {"11.jpg: truncated or corrupt (Truncated File Read)", "15.jpg: empty file",
                          "20.jpg: not an image (unrecognised format)"}
    assert "Traceback" not in out


def test_check_without_image_verification(catalog_with_bad_images):
    result = run("check", "-f", "fashion_product", "-r", str(catalog_with_bad_images), "--no-verify-images")
    assert result.exit_code == 0
    assert "not checked" in row(result.output, "unreadable images")[1]
    assert "empty file" not in result.output


def test_check_lists_at_most_twenty_unreadable(tmp_path):
    root = write_viton(tmp_path, pair_ids=[f"{n:06d}" for n in range(15)])
    for image in (root / "person").iterdir():
        image.write_bytes(b"")
    result = run("check", "--format", "viton", "--root", str(root))
    assert result.exit_code == 0
    assert result.output.count(": empty file") == 15
    for image in (root / "product").iterdir():
        image.write_bytes(b"")
    result = run("check", "--format", "viton", "--root", str(root))
    assert result.output.count(": empty file") == 20 and "... and 10 more" in result.output
    assert row(result.output, "unreadable images")[1] == "30 of 30"


def test_missing_root_fails_in_one_line(tmp_path):
    result = run("check", "--format", "viton", "--root", str(tmp_path / "nowhere"))
    assert result.exit_code == 2
    assert result.output.strip() == f"error: root {tmp_path / 'nowhere'} does not exist"


def test_unknown_format_lists_known_ones(tmp_path):
    result = run("check", "--format", "vitom", "--root", str(tmp_path))
    assert result.exit_code == 2
    assert "unknown dataset format 'vitom' (did you mean 'viton'?)" in result.output
    assert "fashion_product" in result.output and len(result.output.strip().splitlines()) == 1


def test_malformed_annotation_names_file_and_line(tmp_path):
    root = write_viton(tmp_path, pair_ids=["000001"])
    with open(root / "pairs.csv", "a") as f:
        f.write("000002,person/000002.jpg\n")
    result = run("check", "--format", "viton", "--root", str(root))
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {root / 'pairs.csv'}:3: expected 3 columns, got 2"


def test_reader_options(tmp_path):
    root = write_viton(tmp_path, pair_ids=["000001"])
    (root / "pairs.csv").rename(root / "my-pairs.csv")
    assert run("check", "-f", "viton", "-r", str(root), "-o", "pairs=my-pairs.csv").exit_code == 0
    result = run("check", "-f", "viton", "-r", str(root), "-o", "pair=my-pairs.csv")
    assert result.exit_code == 2 and "unknown key 'pair'" in result.output
    assert run("check", "-f", "viton", "-r", str(root), "-o", "novalue").exit_code == 2


def test_formats_lists_registered_readers():
    result = run("formats")
    assert result.exit_code == 0
    assert result.output.split() == READERS.names()
    assert {"fashion_product", "clothing", "viton", "csv", "folder"} <= set(result.output.split())


# ---- the real shared data ------------------------------------------------------------

@pytest.mark.shared_data
@pytest.mark.parametrize("name, folder, images, items", [
    ("fashion_product", "fashion-product", "18800", "18800"),
    ("clothing", "clothing", "3409", "3409"),
    ("viton", "viton", "13020", "6510"),
])
def test_check_shared_datasets(shared_data_root, name, folder, images, items):
    # Decoding every image takes ~15 s per dataset; the fixtures above cover verification.
    result = run("check", "--format", name, "--root", str(shared_data_root / folder), "--no-verify-images")
    assert result.exit_code == 0, result.output
    assert row(result.output, "images")[1] == images and row(result.output, "items")[1] == items


@pytest.mark.shared_data
def test_shared_fashion_product_empty_images_are_found(shared_data_root):
    table = READERS.build("fashion_product", root=shared_data_root / "fashion-product")
    sample = table.filter(predicate=lambda s: s.item_id in {"11989", "34762", "15970", "1855"})
    report = verify_images(sample, workers=2)
    assert report.checked == 4
    assert sorted((p.rsplit("/", 1)[-1], r) for p, r in report.unreadable) == [
        ("11989.jpg", "empty file"), ("34762.jpg", "empty file")]
