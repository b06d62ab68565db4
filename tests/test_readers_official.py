"""Readers of the official dataset releases, checked row by row against hand-written tables."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures_official import (ASEN_FILES, FIRST_DATA_LINE, replace_line, write_asen_fashionai, write_asen_lists,
                               write_counted_list, write_deepfashion_asen_multivalued, write_deepfashion_attributes,
                               write_deepfashion_c2s, write_deepfashion_inshop, write_fashionai, write_street2shop,
                               write_text)
from fashion_retrieval.data.readers import READERS
from fashion_retrieval.data.readers._annotations import MissingAnnotationFile
from fashion_retrieval.data.readers.fashionai import hash_split
from fashion_retrieval.data.table import AnnotationError, Sample, SampleTable
from fashion_retrieval.registry import ConfigError


def read(name: str, root: Path, **options) -> SampleTable:
    return READERS.build(name, root=root, **options)


def annotation_error(name: str, root: Path, **options) -> AnnotationError:
    with pytest.raises(AnnotationError) as caught:
        read(name, root, **options)
    return caught.value


# ---- deepfashion_c2s ---------------------------------------------------------------------

def c2s_row(path: str, item: str, domain: str, split: str, category: str, bbox, clothes: str | None,
            attributes: tuple[str, ...] | None) -> Sample:
    attrs: dict = {"clothes_type": clothes} if clothes else {}
    if attributes is not None:
        attrs["attributes"] = attributes
    return Sample(path, item, domain, split, category, attrs, bbox)


TOPS, DRESS, PANTS, BLOUSE = "TOPS/Summer_Wear", "DRESSES/Dress", "TROUSERS/Pants", "TOPS/Blouse"
ID1_ATTRS, ID3_ATTRS = ("short sleeve", "red"), ("long sleeve", "stripe", "slim fit")
C2S_EXPECTED = [
    c2s_row("img/TOPS/Summer_Wear/id_00000001/comsumer_01.jpg", "id_00000001", "consumer", "train", TOPS,
            (10, 20, 110, 220), "upper-body", ID1_ATTRS),
    c2s_row("img/TOPS/Summer_Wear/id_00000001/shop_01.jpg", "id_00000001", "shop", "train", TOPS,
            (0, 0, 300, 280), "upper-body", ID1_ATTRS),
    c2s_row("img/TOPS/Summer_Wear/id_00000001/comsumer_02.jpg", "id_00000001", "consumer", "train", TOPS,
            (5, 6, 7, 8), "upper-body", ID1_ATTRS),
    c2s_row("img/DRESSES/Dress/id_00000002/comsumer_01.jpg", "id_00000002", "consumer", "val", DRESS,
            (1, 2, 3, 4), "full-body", ()),
    c2s_row("img/DRESSES/Dress/id_00000002/shop_01.jpg", "id_00000002", "shop", "val", DRESS,
            (11, 12, 13, 14), "full-body", ()),
    c2s_row("img/TROUSERS/Pants/id_00000003/comsumer_01.jpg", "id_00000003", "consumer", "test", PANTS,
            (50, 60, 150, 260), "lower-body", ID3_ATTRS),
    c2s_row("img/TROUSERS/Pants/id_00000003/shop_01.jpg", "id_00000003", "shop", "test", PANTS,
            (0, 0, 100, 100), "lower-body", ID3_ATTRS),
    c2s_row("img/TROUSERS/Pants/id_00000003/shop_02.jpg", "id_00000003", "shop", "test", PANTS,
            (1.5, 2.5, 99.5, 98), "lower-body", ID3_ATTRS),
    c2s_row("img/TOPS/Blouse/id_00000004/comsumer_01.jpg", "id_00000004", "consumer", "test", BLOUSE,
            (3, 3, 30, 30), "upper-body", None),
    c2s_row("img/TOPS/Blouse/id_00000004/shop_01.jpg", "id_00000004", "shop", "test", BLOUSE, None, None, None),
]


def test_c2s_table(tmp_path):
    facts = write_deepfashion_c2s(tmp_path)
    table = read("deepfashion_c2s", tmp_path)
    assert table.samples == C2S_EXPECTED
    assert len(table) == facts["rows"] and table.item_ids() == facts["items"]
    assert table.root == tmp_path and table.multi_label == ("attributes",)
    # the official protocol: consumer test photos query the shop test photos
    assert len(table.filter(split="test", domain="consumer")) == 2
    assert len(table.filter(split="test", domain="shop")) == 3


def test_c2s_without_optional_files(tmp_path):
    facts = write_deepfashion_c2s(tmp_path)
    for key in ("bbox", "items", "attribute_names", "item_attributes"):
        facts["files"][key].unlink()
    table = read("deepfashion_c2s", tmp_path)
    expected = [Sample(s.path, s.item_id, s.domain, s.split, s.category) for s in C2S_EXPECTED]
    assert table.samples == expected and table.multi_label == ()


def test_c2s_attributes_without_names_file_are_numbered(tmp_path):
    facts = write_deepfashion_c2s(tmp_path)
    facts["files"]["attribute_names"].unlink()
    table = read("deepfashion_c2s", tmp_path)
    assert table[0].attributes["attributes"] == ("attr_1", "attr_3")
    assert table[5].attributes["attributes"] == ("attr_2", "attr_4", "attr_5")


def test_c2s_highres_scales_boxes_and_paths(tmp_path):
    write_deepfashion_c2s(tmp_path)
    table = read("deepfashion_c2s", tmp_path, highres_scale=2.5)
    assert table[0].path == "img_highres/TOPS/Summer_Wear/id_00000001/comsumer_01.jpg"
    assert table[0].bbox == (25, 50, 275, 550)
    assert table[-1].path == "img_highres/TOPS/Blouse/id_00000004/shop_01.jpg" and table[-1].bbox is None


def test_c2s_highres_scale_must_be_positive(tmp_path):
    write_deepfashion_c2s(tmp_path)
    with pytest.raises(ConfigError, match="highres_scale"):
        read("deepfashion_c2s", tmp_path, highres_scale=0)


def test_c2s_image_in_two_roles_is_an_error(tmp_path):
    facts = write_deepfashion_c2s(tmp_path)
    # line 4 (second pair) names the first shop photo as its consumer photo
    replace_line(facts["files"]["partition"], 4, "img/TOPS/Summer_Wear/id_00000001/shop_01.jpg "
                 "img/TOPS/Summer_Wear/id_00000001/shop_09.jpg id_00000001 train")
    error = annotation_error("deepfashion_c2s", tmp_path)
    assert (error.path, error.line) == (str(facts["files"]["partition"]), 4)
    assert "domain 'consumer' here but 'shop' on line 3" in error.problem


def test_c2s_source_type_must_agree_with_pair_position(tmp_path):
    facts = write_deepfashion_c2s(tmp_path)
    replace_line(facts["files"]["bbox"], FIRST_DATA_LINE, "img/TOPS/Summer_Wear/id_00000001/comsumer_01.jpg 1 1 0 0 1 1")
    error = annotation_error("deepfashion_c2s", tmp_path)
    assert error.line == FIRST_DATA_LINE and "source_type 1 (shop)" in error.problem


def test_c2s_item_missing_from_item_list(tmp_path):
    facts = write_deepfashion_c2s(tmp_path)
    write_counted_list(facts["files"]["items"], None, ["id_00000001", "id_00000002", "id_00000004"])
    error = annotation_error("deepfashion_c2s", tmp_path)
    assert (error.path, error.line) == (str(facts["files"]["partition"]), 6)
    assert "item id_00000003" in error.problem


# ---- deepfashion_inshop --------------------------------------------------------------------

def inshop_row(path, item, split, category, bbox, clothes, pose, attributes) -> Sample:
    attrs = {"clothes_type": clothes, "pose": pose} if clothes else {}
    return Sample(path, item, "shop", split, category, {**attrs, "attributes": attributes}, bbox)


INSHOP_EXPECTED = [
    inshop_row("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train", "WOMEN/Dresses",
               (50, 20, 200, 250), "full-body", "frontal", ("floral print", "long sleeve")),
    inshop_row("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train", "WOMEN/Dresses",
               (55, 25, 195, 245), "full-body", "side", ("floral print", "long sleeve")),
    inshop_row("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "query", "MEN/Denim",
               (60, 100, 190, 256), "lower-body", "frontal", ("black", "denim")),
    inshop_row("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "gallery", "MEN/Denim",
               (70, 100, 180, 256), "lower-body", "side", ("black", "denim")),
    inshop_row("img/MEN/Denim/id_00000080/01_7_additional.jpg", "id_00000080", "gallery", "MEN/Denim",
               (0, 0, 256, 256), "lower-body", "stand-alone", ("black", "denim")),
    inshop_row("img/WOMEN/Blouses_Shirts/id_00000100/03_1_front.jpg", "id_00000100", "query",
               "WOMEN/Blouses_Shirts", (40, 30, 220, 200), "upper-body", "zoom-in", ()),
    inshop_row("img/WOMEN/Blouses_Shirts/id_00000100/03_4_full.jpg", "id_00000100", "gallery",
               "WOMEN/Blouses_Shirts", None, None, None, ()),
]


def test_inshop_table(tmp_path):
    facts = write_deepfashion_inshop(tmp_path)
    table = read("deepfashion_inshop", tmp_path)
    assert table.samples == INSHOP_EXPECTED
    assert len(table) == facts["rows"] and table.item_ids() == facts["items"]
    assert table.counts("split") == {"train": 2, "query": 2, "gallery": 3}


def test_inshop_rejects_a_c2s_status(tmp_path):
    facts = write_deepfashion_inshop(tmp_path)
    replace_line(facts["files"]["partition"], 5, "img/MEN/Denim/id_00000080/01_1_front.jpg id_00000080 test")
    error = annotation_error("deepfashion_inshop", tmp_path)
    assert error.line == 5 and "train, query, gallery" in error.problem and "'test'" in error.problem


def test_inshop_image_listed_twice_with_another_item(tmp_path):
    facts = write_deepfashion_inshop(tmp_path)
    replace_line(facts["files"]["partition"], 9, "img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000100 train")
    error = annotation_error("deepfashion_inshop", tmp_path)
    assert error.line == 9 and "item_id 'id_00000100' here but 'id_00000002' on line 3" in error.problem


# ---- deepfashion_attributes ----------------------------------------------------------------

def attr_row(path, split, category, bbox, positives, **by_type) -> Sample:
    types = {kind: tuple(by_type.get(kind, ())) for kind in ("texture", "fabric", "shape", "part", "style")}
    item = path.split("/")[1]
    return Sample(path, item, "unknown", split, category, {"attributes": positives, **types}, bbox)


ATTR_EXPECTED = [
    attr_row("img/Sheer_Pleated-Front_Blouse/img_00000001.jpg", "train", "Blouse", (0, 1, 100, 200),
             ("cotton", "long sleeve"), fabric=["cotton"], part=["long sleeve"]),
    attr_row("img/Sheer_Pleated-Front_Blouse/img_00000002.jpg", "train", "Blouse", (1, 2, 101, 201), ()),
    attr_row("img/Classic_Skinny_Jeans/img_00000001.jpg", "val", "Jeans", (2, 3, 102, 202), ("cotton",),
             fabric=["cotton"]),
    attr_row("img/Floral_A-Line_Dress/img_00000001.jpg", "test", "Dress", (3, 4, 103, 203), ("floral", "a-line"),
             texture=["floral"], shape=["a-line"]),
    attr_row("img/Floral_A-Line_Dress/img_00000002.jpg", "test", "Dress", (4, 5, 104, 204),
             ("floral", "a-line", "long sleeve"), texture=["floral"], shape=["a-line"], part=["long sleeve"]),
    attr_row("img/Boho_V-Neck_Dress/img_00000001.jpg", "train", "Dress", None, ("v neck", "boho"),
             part=["v neck"], style=["boho"]),
]


def test_attributes_table(tmp_path):
    facts = write_deepfashion_attributes(tmp_path)
    table = read("deepfashion_attributes", tmp_path)
    assert table.samples == ATTR_EXPECTED
    assert len(table) == facts["rows"] and table.item_ids() == facts["items"]
    assert table.multi_label == ("attributes", "texture", "fabric", "shape", "part", "style")
    assert table.attribute_values("part") == ["long sleeve", "v neck"]


def test_attributes_coarse_annotation_folder(tmp_path):
    write_deepfashion_attributes(tmp_path, annotation_dir="Anno_coarse")
    assert read("deepfashion_attributes", tmp_path, annotation_dir="Anno_coarse").samples == ATTR_EXPECTED


def test_attributes_labels_need_their_names_file(tmp_path):
    facts = write_deepfashion_attributes(tmp_path)
    facts["files"]["attribute_labels"].unlink()
    with pytest.raises(MissingAnnotationFile) as caught:
        read("deepfashion_attributes", tmp_path)
    assert caught.value.path == str(facts["files"]["attribute_labels"])
    assert "needed with list_attr_cloth.txt" in str(caught.value)


@pytest.mark.parametrize("line, text, problem", [
    (4, "img/Classic_Skinny_Jeans/img_00000001.jpg 1 1 1", "expected 6 attribute labels after the name, got 3"),
    (5, "img/Floral_A-Line_Dress/img_00000001.jpg 1 -1 1 -1 -1 2", "attribute labels must be 1, -1 or 0, got '2'"),
])
def test_attributes_bad_label_rows(tmp_path, line, text, problem):
    facts = write_deepfashion_attributes(tmp_path)
    replace_line(facts["files"]["attribute_labels"], line, text)
    error = annotation_error("deepfashion_attributes", tmp_path)
    assert (error.path, error.line, error.problem) == (str(facts["files"]["attribute_labels"]), line, problem)


def test_attributes_category_label_out_of_range(tmp_path):
    facts = write_deepfashion_attributes(tmp_path)
    replace_line(facts["files"]["category_labels"], 6, "img/Floral_A-Line_Dress/img_00000001.jpg 4")
    error = annotation_error("deepfashion_attributes", tmp_path)
    assert (error.line, error.problem) == (6, "category_label must be in 1..3, got 4")


# ---- DeepFashion list files in general ---------------------------------------------------------

@pytest.mark.parametrize("writer, reader, key, line, text, problem", [
    (write_deepfashion_c2s, "deepfashion_c2s", "partition", 5, "img/a.jpg img/b.jpg val",
     "expected 4 columns, got 3"),
    (write_deepfashion_c2s, "deepfashion_c2s", "bbox", 7, "img/DRESSES/Dress/id_00000002/shop_01.jpg 3 1 11 12 13",
     "expected 7 columns, got 6"),
    (write_deepfashion_c2s, "deepfashion_c2s", "bbox", 4, "img/TOPS/Summer_Wear/id_00000001/shop_01.jpg 1 1 0 0 3OO 280",
     "x_2 must be a number, got '3OO'"),
    (write_deepfashion_c2s, "deepfashion_c2s", "bbox", 3, "img/TOPS/Summer_Wear/id_00000001/comsumer_01.jpg 4 2 1 1 2 2",
     "clothes_type must be in 1..3, got 4"),
    (write_deepfashion_inshop, "deepfashion_inshop", "partition", 3,
     "img/WOMEN/Dresses/id_00000002/02_1_front.jpg train", "expected 3 columns, got 2"),
    (write_deepfashion_inshop, "deepfashion_inshop", "bbox", 8, "img/MEN/Denim/id_00000080/01_1_front.jpg 2 1 9 9 5 5",
     "bounding box 9,9,5,5 has x2 < x1 or y2 < y1"),
    (write_deepfashion_inshop, "deepfashion_inshop", "bbox", 8, "img/MEN/Denim/id_00000080/01_1_front.jpg 2 1 nan 9 5 5",
     "x_1 must be finite, got 'nan'"),
    (write_deepfashion_attributes, "deepfashion_attributes", "bbox", 3, "img/Boho_V-Neck_Dress/img_00000001.jpg 1 2 3 -inf",
     "y_2 must be finite, got '-inf'"),
    (write_deepfashion_attributes, "deepfashion_attributes", "partition", 8,
     "img/Boho_V-Neck_Dress/img_00000001.jpg train extra", "expected 2 columns, got 3"),
    (write_deepfashion_attributes, "deepfashion_attributes", "attribute_names", 6,
     "long sleeve                  9", "attribute_type must be in 1..5, got 9"),
])
def test_deepfashion_malformed_line_names_file_and_line(tmp_path, writer, reader, key, line, text, problem):
    facts = writer(tmp_path)
    path = facts["files"][key]
    replace_line(path, line, text)
    error = annotation_error(reader, tmp_path)
    assert (error.path, error.line, error.problem) == (str(path), line, problem)
    assert str(error).startswith(f"{path}:{line}: ")


@pytest.mark.parametrize("writer, reader", [
    (write_deepfashion_c2s, "deepfashion_c2s"),
    (write_deepfashion_inshop, "deepfashion_inshop"),
    (write_deepfashion_attributes, "deepfashion_attributes"),
])
def test_deepfashion_count_line(tmp_path, writer, reader):
    partition = writer(tmp_path)["files"]["partition"]
    replace_line(partition, 1, "99")
    error = annotation_error(reader, tmp_path)
    assert error.line == 1 and "says 99 rows but the file has" in error.problem
    replace_line(partition, 1, "many")
    assert "expected the number of rows" in annotation_error(reader, tmp_path).problem


def test_deepfashion_header_catches_the_wrong_benchmark(tmp_path):
    inshop = write_deepfashion_inshop(tmp_path / "inshop")
    c2s_root = tmp_path / "c2s"
    (c2s_root / "Eval").mkdir(parents=True)
    (c2s_root / "Eval" / "list_eval_partition.txt").write_bytes(inshop["files"]["partition"].read_bytes())
    error = annotation_error("deepfashion_c2s", c2s_root)
    assert error.line == 2 and "header should start with 'image_pair_name_1', got 'image_name'" in error.problem


@pytest.mark.parametrize("writer, reader", [
    (write_deepfashion_c2s, "deepfashion_c2s"),
    (write_deepfashion_inshop, "deepfashion_inshop"),
    (write_deepfashion_attributes, "deepfashion_attributes"),
])
def test_deepfashion_missing_partition(tmp_path, writer, reader):
    partition = writer(tmp_path)["files"]["partition"]
    partition.unlink()
    with pytest.raises(FileNotFoundError) as caught:
        read(reader, tmp_path)
    assert isinstance(caught.value, AnnotationError)
    assert str(caught.value) == f"{partition}: file not found"


def test_non_utf8_line_is_named(tmp_path):
    facts = write_deepfashion_inshop(tmp_path)
    path = facts["files"]["partition"]
    lines = path.read_bytes().split(b"\n")
    lines[5] = "img/MEN/Denim/id_00000080/01_2_sidé.jpg id_00000080 gallery".encode("latin-1")
    path.write_bytes(b"\n".join(lines))
    error = annotation_error("deepfashion_inshop", tmp_path)
    assert error.line == 6 and error.problem.startswith("not utf-8 text (invalid")


def test_c2s_attribute_names_in_another_encoding(tmp_path):
    facts = write_deepfashion_c2s(tmp_path)
    names = facts["files"]["attribute_names"]
    names.write_bytes(names.read_text(encoding="utf-8").encode("gb18030"))
    error = annotation_error("deepfashion_c2s", tmp_path)
    assert error.path == str(names) and error.line == 3 and "not utf-8 text" in error.problem
    table = read("deepfashion_c2s", tmp_path, attribute_names_encoding="gb18030")
    assert table.samples == C2S_EXPECTED


def test_bom_and_crlf_are_tolerated(tmp_path):
    facts = write_deepfashion_inshop(tmp_path)
    path = facts["files"]["partition"]
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    assert read("deepfashion_inshop", tmp_path).samples == INSHOP_EXPECTED


# ---- street2shop -------------------------------------------------------------------------

STREET2SHOP_EXPECTED = [
    Sample("images/1.jpg", "101", "consumer", "train", "dresses", {}, (10, 20, 40, 60)),
    Sample("images/2.jpg", "100", "consumer", "test", "dresses", {}, (0, 0, 50, 60)),
    Sample("images/2.jpg", "101", "consumer", "test", "dresses", {}, (60, 5, 80.5, 35)),
    Sample("images/11.jpg", "100", "shop", "test", "dresses"),
    Sample("images/12.jpg", "100", "shop", "test", "dresses"),
    Sample("images/13.jpg", "101", "shop", "test", "dresses"),  # also in a train pair: test wins
    Sample("images/14.jpg", "102", "shop", "test", "dresses"),  # in no pair: a gallery distractor
    Sample("images/3.jpg", "200", "consumer", "train", "skirts", {}, (1, 2, 4, 6)),  # repeat dropped
    Sample("images/21.jpg", "200", "shop", "train", "skirts"),
    Sample("images/22.jpg", "201", "shop", "test", "skirts"),
]


def test_street2shop_table(tmp_path):
    facts = write_street2shop(tmp_path)
    table = read("street2shop", tmp_path)
    assert table.samples == STREET2SHOP_EXPECTED
    assert len(table) == facts["rows"] and table.categories() == facts["categories"]


def test_street2shop_pattern_and_category_choice(tmp_path):
    write_street2shop(tmp_path)
    table = read("street2shop", tmp_path, image_pattern="photos/{photo:06d}.jpeg", categories=["skirts"])
    assert [s.path for s in table] == ["photos/000003.jpeg", "photos/000021.jpeg", "photos/000022.jpeg"]
    with pytest.raises(ConfigError, match="must contain"):
        read("street2shop", tmp_path, image_pattern="images/{id}.jpg")


def test_street2shop_problems(tmp_path):
    facts = write_street2shop(tmp_path)
    test_pairs = facts["files"]["test_pairs_dresses.json"]
    test_pairs.write_text('[\n {"photo": 2, "product": 100, "bbox": {"left": 0, "top": 0, "width": 5, "height": 6}},\n'
                          ' {"photo": 2 "product": 101}\n]', encoding="utf-8")
    error = annotation_error("street2shop", tmp_path)
    assert error.path == str(test_pairs) and error.line == 3 and "invalid JSON" in error.problem

    test_pairs.write_text(json.dumps([{"photo": 2, "product": 100, "bbox": {"left": 0, "top": 0, "width": 5}}]))
    assert annotation_error("street2shop", tmp_path).problem == "entry 1: bbox height must be a number, got None"
    test_pairs.write_text(json.dumps([{"photo": 2, "product": 100}]))
    assert annotation_error("street2shop", tmp_path).problem == "entry 1: expected a 'bbox' object, got None"
    negative = {"left": 10, "top": 0, "width": -5, "height": 6}
    test_pairs.write_text(json.dumps([{"photo": 2, "product": 100, "bbox": negative}]))
    assert annotation_error("street2shop", tmp_path).problem == "entry 1: bounding box 10,0,5,6 has x2 < x1 or y2 < y1"
    # finite columns whose sum overflows: the box itself must be finite
    huge = {"left": 1e308, "top": 0, "width": 1e308, "height": 6}
    test_pairs.write_text(json.dumps([{"photo": 2, "product": 100, "bbox": huge}]))
    assert annotation_error("street2shop", tmp_path).problem == "entry 1: x2 must be finite, got inf"
    test_pairs.write_text(json.dumps([{"photo": "x2", "product": 100}]))
    assert "'photo' must be a non-negative integer id" in annotation_error("street2shop", tmp_path).problem
    test_pairs.write_text("[" * 100_000)
    assert annotation_error("street2shop", tmp_path).problem == "invalid JSON: nested too deeply"
    test_pairs.write_text(json.dumps({"photo": 2}))
    assert "expected a JSON list" in annotation_error("street2shop", tmp_path).problem
    test_pairs.unlink()
    with pytest.raises(MissingAnnotationFile) as caught:
        read("street2shop", tmp_path)
    assert caught.value.path == str(test_pairs)


def test_street2shop_without_meta_folder(tmp_path):
    with pytest.raises(MissingAnnotationFile, match=r"retrieval_<category>\.json"):
        read("street2shop", tmp_path)


# ---- fashionai -----------------------------------------------------------------------------

FASHIONAI_ATTRIBUTES = {
    "Images/collar_design_labels/a1.jpg": {"collar_design": "Peter Pan"},
    "Images/collar_design_labels/a2.jpg": {"collar_design": "Invisible"},
    "Images/skirt_length_labels/b1.jpg": {"skirt_length": "Ankle Length"},
    "Images/neckline_design_labels/c1.jpg": {"neckline_design": "Sweat Heart Neck"},
    "Images/sleeve_length_labels/d1.jpg": {"sleeve_length": "Extra Long Sleeves", "coat_length": "Regular Length"},
}


def test_fashionai_table(tmp_path):
    facts = write_fashionai(tmp_path)
    table = read("fashionai", tmp_path)
    assert len(table) == facts["rows"]
    assert {s.path: s.attributes for s in table} == FASHIONAI_ATTRIBUTES
    assert [s.item_id for s in table] == ["a1", "a2", "b1", "c1", "d1"]
    assert {s.domain for s in table} == {"shop"} and {s.category for s in table} == {None}
    assert [s.split for s in table] == [hash_split(s.item_id) for s in table]


PINNED_SPLITS = {"img0": "test", "img1": "train", "img10": "val", "img15": "test", "img23": "val"}


def test_fashionai_hash_split_is_stable_and_about_80_10_10():
    # pinned: a changed hash would silently move images between train and test
    assert [hash_split(name) for name in PINNED_SPLITS] == list(PINNED_SPLITS.values())
    counts = {split: 0 for split in ("train", "val", "test")}
    for number in range(2000):
        counts[hash_split(f"{number:032x}")] += 1
    assert 1500 < counts["train"] < 1700 and 150 < counts["val"] < 250 and 150 < counts["test"] < 250


def test_fashionai_split_file(tmp_path):
    write_fashionai(tmp_path)
    write_text(tmp_path / "split.txt", ["Images/collar_design_labels/a1.jpg train",
                                        "Images/collar_design_labels/a2.jpg,valid",
                                        "Images/sleeve_length_labels/d1.jpg test"])
    table = read("fashionai", tmp_path, split_file="split.txt")
    assert [s.split for s in table] == ["train", "val", "unknown", "unknown", "test"]
    write_text(tmp_path / "split.txt", ["Images/collar_design_labels/a1.jpg train",
                                        "Images/collar_design_labels/a1.jpg holdout"])
    error = annotation_error("fashionai", tmp_path, split_file="split.txt")
    assert error.line == 2 and "unknown split 'holdout'" in error.problem


def test_fashionai_base_and_web_folders(tmp_path):
    write_fashionai(tmp_path, folder="base")
    web = write_fashionai(tmp_path, folder="web")["files"]["labels"]
    write_text(web, ["Images/pant_length_labels/p1.jpg,pant_length_labels,nnnnny"])
    table = read("fashionai", tmp_path)
    assert [s.path for s in table] == [f"base/{p}" for p in FASHIONAI_ATTRIBUTES] + \
           ["web/Images/pant_length_labels/p1.jpg"]
    assert table[-1].attributes == {"pant_length": "Full Length"}
    only_web = read("fashionai", tmp_path, label_files=["web/Annotations/label.csv"])
    assert [s.item_id for s in only_web] == ["p1"]


@pytest.mark.parametrize("text, problem", [
    ("Images/collar_design_labels/a9.jpg,collar_design_labels,nnnnn",
     "label string 'nnnnn' must mark exactly one value with 'y', it marks 0"),
    ("Images/collar_design_labels/a9.jpg,collar_design_labels,ynynn",
     "label string 'ynynn' must mark exactly one value with 'y', it marks 2"),
    ("Images/collar_design_labels/a9.jpg,collar_design_labels,nnyn",
     "collar_design needs 5 letters of y/m/n, got 'nnyn'"),
    ("Images/collar_design_labels/a9.jpg,collar_design_labels,nnxnn",
     "collar_design needs 5 letters of y/m/n, got 'nnxnn'"),
    ("Images/collar_design_labels/a9.jpg,collar_design_labels", "expected 3 columns, got 2"),
    ("Images/x/a9.jpg,hem_design_labels,ynn", "unknown attribute key 'hem_design_labels'"),
    ("Images/collar_design_labels/a1.jpg,collar_design_labels,ynnnn",
     "a1.jpg has collar_design 'Invisible' here but 'Peter Pan' in label.csv line 1"),
])
def test_fashionai_bad_lines(tmp_path, text, problem):
    labels = write_fashionai(tmp_path)["files"]["labels"]
    replace_line(labels, 4, text)
    error = annotation_error("fashionai", tmp_path)
    assert (error.path, error.line) == (str(labels), 4)
    assert problem in error.problem


def test_fashionai_missing_and_non_utf8(tmp_path):
    with pytest.raises(MissingAnnotationFile) as caught:
        read("fashionai", tmp_path)
    assert caught.value.path == str(tmp_path / "Annotations" / "label.csv")
    with pytest.raises(FileNotFoundError, match="nope.csv: file not found"):
        read("fashionai", tmp_path, label_files=["nope.csv"])
    labels = write_fashionai(tmp_path)["files"]["labels"]
    labels.write_bytes(labels.read_bytes() + b"Images/x/\xff.jpg,collar_design_labels,ynnnn\n")
    error = annotation_error("fashionai", tmp_path)
    assert error.line == 7 and "not utf-8" in error.problem


def test_fashionai_asen_split(tmp_path):
    facts = write_asen_fashionai(tmp_path)
    table = read("fashionai", tmp_path, split_dir="split")
    assert table.samples == [
        Sample("train/Images/skirt_length_labels/s0.jpg", "s0", "shop", "train", None, {"skirt_length": "Ankle Length"}),
        Sample("train/Images/collar_design_labels/k0.jpg", "k0", "shop", "train", None, {"collar_design": "Peter Pan"}),
        Sample("test/Images/skirt_length_labels/s1.jpg", "s1", "shop", "query", None, {"skirt_length": "Floor Length"}),
        Sample("test/Images/collar_design_labels/k1.jpg", "k1", "shop", "gallery", None, {"collar_design": "Invisible"}),
    ]
    assert len(table) == facts["rows"]
    with pytest.raises(ConfigError, match="split_dir reads ASEN"):
        read("fashionai", tmp_path, split_dir="split", split_file="x.txt")


def test_fashionai_asen_split_without_meta_uses_the_eight_attributes(tmp_path):
    facts = write_asen_fashionai(tmp_path)
    facts["files"]["meta"].unlink()
    table = read("fashionai", tmp_path, split_dir="split")
    # without meta.json the indices follow ASEN's order: skirt, sleeve, coat, pant, collar, ...
    assert [s.attributes for s in table] == [{"skirt_length": "Ankle Length"}, {"sleeve_length": "Cup Sleeves"},
                                             {"skirt_length": "Floor Length"}, {"sleeve_length": "Invisible"}]


# ---- darn (ASEN split lists) ---------------------------------------------------------------

DARN_EXPECTED = [
    Sample("pic/t0.jpg", "t0", "unknown", "train", None, {"clothes category": "value_3", "clothes color": "value_54"}),
    Sample("pic/t1.jpg", "t1", "unknown", "train", None, {"sleeve length": "value_0"}),
    Sample("pic/t2.jpg", "t2", "unknown", "train", None, {"sleeve shape": "value_16"}),
    Sample("pic/v0.jpg", "v0", "unknown", "val", None, {"clothes button": "value_2", "clothes length": "value_6"}),
    Sample("pic/v1.jpg", "v1", "unknown", "val", None, {"clothes button": "value_2"}),
    Sample("pic/q0.jpg", "q0", "unknown", "query", None, {"clothes pattern": "value_27"}),
    Sample("pic/both.jpg", "both", "unknown", "query", None, {"clothes shape": "value_1"}),
    Sample("pic/c0.jpg", "c0", "unknown", "gallery", None, {"clothes pattern": "value_27"}),
    Sample("pic/c1.jpg", "c1", "unknown", "gallery", None, {"clothes pattern": "value_0"}),
    Sample("pic/both.jpg", "both", "unknown", "gallery", None, {"collar shape": "value_25"}),
]


def test_darn_table(tmp_path):
    facts = write_asen_lists(tmp_path)
    table = read("darn", tmp_path)
    assert table.samples == DARN_EXPECTED
    assert len(table) == facts["rows"]


def test_darn_evaluating_on_valid(tmp_path):
    write_asen_lists(tmp_path)
    table = read("darn", tmp_path, eval_split="valid")
    assert [(s.item_id, s.split) for s in table] == [
        ("t0", "train"), ("t1", "train"), ("t2", "train"), ("v0", "query"), ("v0", "gallery"), ("v1", "gallery"),
        ("q0", "test"), ("c0", "test"), ("c1", "test"), ("both", "test")]
    assert table[-1].attributes == {"clothes shape": "value_1", "collar shape": "value_25"}
    with pytest.raises(ConfigError, match="eval_split must be one of valid, test"):
        read("darn", tmp_path, eval_split="val")


def test_darn_valid_lists_are_optional_and_prefix_and_names_apply(tmp_path):
    write_asen_lists(tmp_path / "data", {k: v for k, v in ASEN_FILES.items() if "valid" not in k})
    names = [f"a{i}" for i in range(9)]
    table = read("darn", tmp_path, split_dir="data", image_prefix="DARN/", attributes=names)
    assert [s.split for s in table] == ["train"] * 3 + ["query"] * 2 + ["gallery"] * 3
    assert table[0].path == "DARN/pic/t0.jpg" and table[0].attributes == {"a0": "value_3", "a2": "value_54"}
    with pytest.raises(ConfigError, match="gives 2 names but the split has 9 attributes"):
        read("darn", tmp_path, split_dir="data", attributes=["a", "b"])


def test_darn_meta_json_names_values(tmp_path):
    write_asen_lists(tmp_path)
    meta = {"ATTRIBUTES": [f"attr{i}" for i in range(9)],
            "ATTRIBUTES_NUM": {"attr7": 2}, "ATTRIBUTES_VALUES": {"attr7": ["short", "long"]}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    table = read("darn", tmp_path)
    assert table[0].attributes == {"attr0": "value_3", "attr2": "value_54"}
    assert table[1].attributes == {"attr7": "short"}
    (tmp_path / "meta.json").write_text(json.dumps({"ATTRIBUTES_NUM": {}}))
    assert "\"ATTRIBUTES\" is a list of names" in annotation_error("darn", tmp_path).problem


@pytest.mark.parametrize("file, line, text, problem", [
    ("label_train.txt", 2, "1 7", "expected '<image index> <attribute> <value>'"),
    ("label_train.txt", 2, "1 7 0 3", "got 4 columns"),
    ("label_train.txt", 3, "9 8 16", "image index 9 has no path: the filenames list has 4 lines"),
    ("label_train.txt", 1, "0 9 0", "attribute index must be in 0..8, got 9"),
    ("label_train.txt", 1, "0 0 20", "value of 'clothes category' must be in 0..19, got 20"),
    ("label_train.txt", 4, "2 8 15", "pic/t2.jpg has 'sleeve shape' = 'value_15' here but 'value_16' on line 3"),
    ("candidate_valid.txt", 1, "0 1 3",
     "pic/v0.jpg has 'clothes button' = 'value_3' here but 'value_2' on query_valid.txt line 1"),
    ("query_test.txt", 2, "3 x 1", "attribute index must be an integer, got 'x'"),
])
def test_darn_bad_lines(tmp_path, file, line, text, problem):
    facts = write_asen_lists(tmp_path)
    path = facts["files"][file]
    replace_line(path, line, text)
    error = annotation_error("darn", tmp_path)
    assert (error.path, error.line) == (str(path), line)
    assert problem in error.problem


def test_darn_missing_lists(tmp_path):
    facts = write_asen_lists(tmp_path)
    facts["files"]["candidate_test.txt"].unlink()
    with pytest.raises(MissingAnnotationFile) as caught:
        read("darn", tmp_path)
    assert caught.value.path == str(facts["files"]["candidate_test.txt"])
    # the split that is evaluated on is required, the other one is not
    facts["files"]["filenames_valid.txt"].unlink()
    with pytest.raises(MissingAnnotationFile, match="filenames_valid.txt: file not found"):
        read("darn", tmp_path, eval_split="valid")


# ---- deepfashion_asen (ASEN's DeepFashion split lists) ----------------------------------------

DEEPFASHION_ASEN_FILES = {
    "filenames_train.txt": ["img/Sheer_Blouse/img_00000001.jpg", "img/Sheer_Blouse/img_00000002.jpg",
                            "img/Floral_Dress/img_00000001.jpg"],
    "label_train.txt": ["0 0 1 4 229", "1 1 0", "2 2 2"],
    "filenames_test.txt": ["img/Denim_Shorts/img_00000001.jpg", "img/Knit_Top/img_00000003.jpg"],
    "query_test.txt": ["0 3 215"],
    "candidate_test.txt": ["1 3 215", "1 1 217"],
}


def test_deepfashion_asen_table_counts_values_per_type_and_items_are_product_folders(tmp_path):
    write_asen_lists(tmp_path / "split", DEEPFASHION_ASEN_FILES)
    table = read("deepfashion_asen", tmp_path, split_dir="split")
    assert [(s.path, s.item_id, s.split) for s in table] == [
        ("img/Sheer_Blouse/img_00000001.jpg", "Sheer_Blouse", "train"),
        ("img/Sheer_Blouse/img_00000002.jpg", "Sheer_Blouse", "train"),
        ("img/Floral_Dress/img_00000001.jpg", "Floral_Dress", "train"),
        ("img/Denim_Shorts/img_00000001.jpg", "Denim_Shorts", "query"),
        ("img/Knit_Top/img_00000003.jpg", "Knit_Top", "gallery")]
    assert table[0].attributes == {"texture": "value_1", "style": "value_229"}
    assert table[4].attributes == {"part": "value_215", "fabric": "value_217"}
    # the last value of each type is the largest index the type accepts
    replace_line(tmp_path / "split" / "label_train.txt", 2, "1 1 218")
    error = annotation_error("deepfashion_asen", tmp_path, split_dir="split")
    assert error.line == 2 and "value of 'fabric' must be in 0..217, got 218" in error.problem


def test_deepfashion_asen_names_values_from_the_official_attribute_list(tmp_path):
    write_asen_lists(tmp_path / "split", DEEPFASHION_ASEN_FILES)
    counts = {1: 156, 2: 218, 3: 180, 4: 216, 5: 230}
    # the official list interleaves types; values count the attributes of one type in file order
    rows = [f"{kind}-{n} name{'':<12} {kind}" for n in range(230) for kind in counts if n < counts[kind]]
    write_counted_list(tmp_path / "Anno" / "list_attr_cloth.txt", "attribute_name attribute_type", rows)
    table = read("deepfashion_asen", tmp_path, split_dir="split", attribute_list="Anno/list_attr_cloth.txt")
    assert table[0].attributes == {"texture": "1-1 name", "style": "5-229 name"}
    assert table[4].attributes == {"part": "4-215 name", "fabric": "2-217 name"}
    with pytest.raises(MissingAnnotationFile, match="named by attribute_list"):
        read("deepfashion_asen", tmp_path, split_dir="split", attribute_list="Anno/absent.txt")
    with pytest.raises(ConfigError, match="meta or attribute_list, not both"):
        read("deepfashion_asen", tmp_path, split_dir="split", meta="meta.json", attribute_list="Anno/list_attr_cloth.txt")


def test_deepfashion_asen_reads_several_values_of_one_type_as_a_tuple(tmp_path):
    facts = write_deepfashion_asen_multivalued(tmp_path)
    table = read("deepfashion_asen", tmp_path, split_dir="split")
    assert len(table) == facts["rows"] and table.multi_label == ("texture", "style")
    assert [(s.item_id, s.split) for s in table] == [
        ("Floral_Striped_Blouse", "train"), ("Floral_Striped_Blouse", "train"), ("Denim_Shorts", "train"),
        ("Q", "query"), ("A", "query"), ("B", "gallery"), ("C", "gallery"), ("D", "gallery")]
    attributes = [s.attributes for s in table]
    # two pairs of a type on one line (and a repeated pair), or two lines: one value set, in index order
    assert attributes[0] == {"texture": ("value_3", "value_7"), "style": ("value_1",)}
    assert attributes[1] == {"texture": ("value_7", "value_12"), "shape": "value_5"}
    assert attributes[2] == {"texture": ("value_3",)}  # a multi-valued type is a tuple on every row
    assert attributes[3:5] == [{"texture": ("value_3", "value_7")}, {"style": ("value_2",)}]
    assert attributes[5:] == [{"texture": ("value_7", "value_12")}, {"texture": ("value_3",), "style": ("value_2",)},
                              {"texture": ("value_9",), "style": ("value_2", "value_6")}]


def test_deepfashion_asen_multivalued_lists_still_name_malformed_lines(tmp_path):
    facts = write_deepfashion_asen_multivalued(tmp_path)
    replace_line(facts["files"]["candidate_test.txt"], 6, "4 4 2 4")
    error = annotation_error("deepfashion_asen", tmp_path, split_dir="split")
    assert (error.path, error.line) == (str(facts["files"]["candidate_test.txt"]), 6)
    assert "got 4 columns" in error.problem
    replace_line(facts["files"]["candidate_test.txt"], 6, "4 4 2 4 230")
    error = annotation_error("deepfashion_asen", tmp_path, split_dir="split")
    assert error.line == 6 and "value of 'style' must be in 0..229, got 230" in error.problem


def test_single_label_asen_datasets_still_refuse_a_second_value(tmp_path):
    # DARN's attributes are single-label: two values of one attribute are a mistake in the lists
    facts = write_asen_lists(tmp_path)
    replace_line(facts["files"]["label_train.txt"], 1, "0 0 3 0 4")
    error = annotation_error("darn", tmp_path)
    assert error.line == 1 and "pic/t0.jpg has 'clothes category' = 'value_4' here but 'value_3' on line 1" in error.problem
