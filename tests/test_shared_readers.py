from __future__ import annotations

from pathlib import Path

import pytest

from conftest import (STYLES_HEADER, TINY_STYLES, write_clothing, write_fashion_product, write_jpeg,
                      write_viton)
from fashion_retrieval.data.readers import READERS
from fashion_retrieval.data.readers._annotations import split_by_number
from fashion_retrieval.data.table import AnnotationError, Sample, SampleTable


def read(name: str, root: Path, **options) -> SampleTable:
    return READERS.build(name, root=root, **options)


def annotation_error(name: str, root: Path, **options) -> AnnotationError:
    with pytest.raises(AnnotationError) as caught:
        read(name, root, **options)
    return caught.value


@pytest.mark.parametrize("number, split", [(10, "test"), (15, "test"), (19, "val"), (11, "train"), (4, "train")])
def test_split_convention(number, split):
    assert split_by_number(number) == split


# ---- fashion_product -----------------------------------------------------------------

def test_fashion_product_rows(tmp_path):
    table = read("fashion_product", write_fashion_product(tmp_path))
    assert len(table) == len(TINY_STYLES)
    first = table[0]
    assert first == Sample("images/10.jpg", "10", "shop", "test", "Tshirts", {
        "gender": "Men", "masterCategory": "Apparel", "subCategory": "Topwear", "articleType": "Tshirts",
        "baseColour": "Blue", "season": "Summer", "usage": "Casual"})
    assert table.resolve(first).is_file()
    assert {s.item_id: s.split for s in table}["29"] == "val"
    assert "usage" not in table[2].attributes and "baseColour" not in table[3].attributes
    assert "year" not in table.attribute_names()


def test_fashion_product_tolerates_bom_extra_columns_and_blank_lines(tmp_path):
    root = write_fashion_product(tmp_path, header=STYLES_HEADER + ["productDisplayName"],
                                 rows=[r + ["A, quoted name"] for r in TINY_STYLES[:2]], images=False)
    styles = root / "styles.csv"
    styles.write_bytes(b"\xef\xbb\xbf" + styles.read_bytes() + b"\r\n\r\n")
    assert [s.item_id for s in read("fashion_product", root)] == ["10", "11"]


@pytest.mark.parametrize("bad_row, problem", [
    (["12", "Men", "Apparel"], "expected 9 columns, got 3"),
    (["1x", *TINY_STYLES[0][1:]], "id '1x' is not a non-negative integer"),
    (TINY_STYLES[1], "duplicate id 11 (first on line 3)"),
])
def test_fashion_product_malformed_rows_name_file_and_line(tmp_path, bad_row, problem):
    root = write_fashion_product(tmp_path, rows=[*TINY_STYLES[:3], bad_row], images=False)
    error = annotation_error("fashion_product", root)
    assert (error.path, error.line, error.problem) == (str(root / "styles.csv"), 5, problem)
    assert str(error) == f"{root / 'styles.csv'}:5: {problem}"


def test_fashion_product_header_and_file_problems(tmp_path):
    error = annotation_error("fashion_product", tmp_path)
    assert error.problem == "file not found"
    root = write_fashion_product(tmp_path, header=[h for h in STYLES_HEADER if h != "season"],
                                 rows=[], images=False)
    assert "lacks column(s) season" in annotation_error("fashion_product", root).problem
    (root / "styles.csv").write_bytes(b"id,gender\n1,M\xe9n\n")
    error = annotation_error("fashion_product", root)
    assert error.line == 2 and "not UTF-8" in error.problem


# ---- clothing ------------------------------------------------------------------------

def test_clothing_folders(tmp_path):
    table = read("clothing", write_clothing(tmp_path))
    assert len(table) == 13
    assert table.counts("split") == {"train": 7, "val": 6}
    assert table.counts("domain") == {"consumer": 13}
    assert table.categories() == ["dress", "pants", "shoes", "t-shirt"]
    sample = table.filter(split="val", predicate=lambda s: s.category == "shoes")[0]
    assert sample.item_id == "validation-shoes-0" and sample.path == "validation/shoes/validation-shoes-0.jpg"
    assert len(table.item_ids()) == 13  # each photo its own item


def test_clothing_without_split_folders_or_with_clashing_names(tmp_path):
    write_jpeg(tmp_path / "dress" / "x.jpg")
    assert "train/ and validation/" in annotation_error("clothing", tmp_path).problem
    write_jpeg(tmp_path / "train" / "dress" / "same.jpg")
    write_jpeg(tmp_path / "validation" / "hat" / "same.jpg")
    assert "also used by" in annotation_error("clothing", tmp_path).problem


def test_clothing_to_shop_joins_consumer_photos_and_mapped_shop_photos(tiny_data_root):
    table = read("clothing_to_shop", tiny_data_root)
    consumer, shop = table.filter(domain="consumer"), table.filter(domain="shop")
    assert len(consumer) == 13 and consumer[0].path.startswith("clothing/")
    # TINY_STYLES: Watches and Tops have no clothing category and are left out.
    assert {s.attributes["articleType"]: s.category for s in shop} == {
        "Tshirts": "t-shirt", "Dresses": "dress", "Casual Shoes": "shoes", "Jeans": "pants", "Sports Shoes": "shoes",
        "Shirts": "shirt"}
    assert len(shop) == 8 and {s.split for s in shop} == {"train", "val", "test"}
    sample = shop.filter(predicate=lambda s: s.item_id == "fashion-product/10")[0]
    assert sample.path == "fashion-product/images/10.jpg" and sample.split == "test"
    assert all(path.is_file() for path in table.paths())
    assert all(s.attributes["category"] == s.category for s in table)


# ---- viton ---------------------------------------------------------------------------

def test_viton_two_rows_per_pair(tmp_path):
    table = read("viton", write_viton(tmp_path))
    assert len(table) == 10
    person, product = table[0], table[1]
    assert (person.path, person.domain, person.item_id) == ("person/000010.jpg", "consumer", "000010")
    assert (product.path, product.domain, product.item_id) == ("product/000010.jpg", "shop", "000010")
    assert {s.item_id: s.split for s in table} == {"000010": "test", "000011": "train", "000015": "test",
                                                   "000019": "val", "000020": "test"}
    assert all(table.resolve(s).is_file() for s in table)


@pytest.mark.parametrize("line, problem", [
    ("000010,person/000010.jpg", "expected 3 columns, got 2"),
    ("abc,person/a.jpg,product/a.jpg", "pair_id 'abc' is not a non-negative integer"),
    ("000011,person/000011.jpg,product/000011.jpg", "duplicate pair_id 000011 (first on line 2)"),
    ("000012,,product/000012.jpg", "empty person path"),
])
def test_viton_malformed_lines(tmp_path, line, problem):
    root = write_viton(tmp_path, pair_ids=["000011"])
    with open(root / "pairs.csv", "a") as f:
        f.write(line + "\n")
    error = annotation_error("viton", root)
    assert (error.line, error.problem) == (3, problem)


# ---- own catalogs --------------------------------------------------------------------

def test_csv_catalog_round_trip(tmp_path):
    original = SampleTable([
        Sample("a.jpg", "p1", "shop", "train", "tee", {"colour": "red", "tags": ("x", "y")}, (1, 2, 3, 4)),
        Sample("b.jpg", "p1", "consumer", "query"),
    ], multi_label=["tags"])
    original.to_csv(tmp_path / "catalog.csv")
    table = read("csv", tmp_path)
    assert table.samples == original.samples and table.multi_label == ("tags",)
    assert table.root == tmp_path
    assert annotation_error("csv", tmp_path, file="other.csv").problem == "catalog file not found"


def test_folder_of_classes(tmp_path):
    write_jpeg(tmp_path / "boots" / "b1.jpg")
    write_jpeg(tmp_path / "boots" / "b2.png")
    write_jpeg(tmp_path / "coats" / "c1.jpg")
    (tmp_path / "coats" / "notes.txt").write_text("not an image")
    table = read("folder", tmp_path)
    assert [(s.path, s.item_id, s.category, s.split, s.domain) for s in table] == [
        ("boots/b1.jpg", "b1", "boots", "unknown", "shop"),
        ("boots/b2.png", "b2", "boots", "unknown", "shop"),
        ("coats/c1.jpg", "c1", "coats", "unknown", "shop"),
    ]


def test_folder_with_splits_products_and_domain(tmp_path):
    write_jpeg(tmp_path / "train" / "sku-1" / "front.jpg")
    write_jpeg(tmp_path / "train" / "sku-1" / "back.jpg")
    write_jpeg(tmp_path / "validation" / "sku-2" / "front.jpg")
    table = read("folder", tmp_path, item_from="folder", domain="consumer")
    assert [(s.item_id, s.split, s.domain) for s in table] == [
        ("sku-1", "train", "consumer"), ("sku-1", "train", "consumer"), ("sku-2", "val", "consumer")]
    assert "also used by" in annotation_error("folder", tmp_path).problem  # front.jpg twice as items


def test_folder_without_images(tmp_path):
    (tmp_path / "empty-class").mkdir()
    assert annotation_error("folder", tmp_path).problem.startswith("no image files found")
    assert annotation_error("folder", tmp_path / "missing").problem == "not a folder"


# ---- the real shared data ------------------------------------------------------------

@pytest.mark.shared_data
def test_shared_fashion_product(shared_data_root):
    table = read("fashion_product", shared_data_root / "fashion-product")
    assert len(table) == 18800 and table.counts("split") == {"train": 12526, "val": 2100, "test": 4174}
    assert len(table.attribute_values("gender")) == 5 and len(table.attribute_values("season")) == 4
    assert all(table.resolve(s).exists() for s in table.samples[:200])


@pytest.mark.shared_data
def test_shared_clothing(shared_data_root):
    table = read("clothing", shared_data_root / "clothing")
    assert len(table) == 3409 and table.counts("split") == {"train": 3068, "val": 341}
    assert table.categories() == ["dress", "hat", "longsleeve", "outwear", "pants", "shirt", "shoes", "shorts",
                                  "skirt", "t-shirt"]


@pytest.mark.shared_data
def test_shared_viton(shared_data_root):
    table = read("viton", shared_data_root / "viton")
    assert len(table) == 13020 and len(table.item_ids()) == 6510
    assert table.counts("domain") == {"consumer": 6510, "shop": 6510}
