from __future__ import annotations

import numpy as np
import pytest

from fashion_retrieval.data.benchmarks import BENCHMARKS, Benchmark, load_category_map
from fashion_retrieval.data.readers import READERS
from fashion_retrieval.data.table import AnnotationError
from fashion_retrieval.registry import ConfigError


def build(name: str, data_root, split: str = "test") -> Benchmark:
    return BENCHMARKS.build(name, data_root=data_root, split=split)


def test_registered_benchmarks():
    assert BENCHMARKS.names() == ["catalog", "clothing_to_shop_category", "darn", "deepfashion_asen", "deepfashion_c2s",
                                 "deepfashion_inshop", "fashion_product_attributes", "fashionai", "street2shop", "viton_c2s"]


def test_viton_one_product_per_person(tiny_data_root):
    bench = build("viton_c2s", tiny_data_root)
    assert bench.kind == "instance" and bench.attributes == ["pair_id"] and not bench.exclude_self
    assert {s.domain for s in bench.queries} == {"consumer"} and {s.domain for s in bench.gallery} == {"shop"}
    assert [s.item_id for s in bench.queries] == ["000010", "000015", "000020"]
    q, g = bench.query_labels["pair_id"], bench.gallery_labels["pair_id"]
    for i, sample in enumerate(bench.queries):
        assert [bench.gallery[j].item_id for j in np.flatnonzero(g == q[i])] == [sample.item_id]
    assert bench.relevant_counts("pair_id").tolist() == [1, 1, 1]
    assert len(build("viton_c2s", tiny_data_root, split="val").queries) == 1  # 000019


def test_fashion_product_attributes_protocol(tiny_data_root):
    bench = build("fashion_product_attributes", tiny_data_root)
    assert bench.exclude_self and bench.queries is bench.gallery
    assert bench.attributes == ["gender", "articleType", "baseColour", "season", "usage"]
    ids = [s.item_id for s in bench.queries]
    assert ids == ["10", "15", "20", "25", "30", "35", "40"]
    colour = bench.query_labels["baseColour"]
    assert colour[ids.index("20")] == -1  # empty cell
    assert bench.values["baseColour"][colour[ids.index("10")]] == "Blue"
    # Blue: 10, 15, 30 -> each has two others; a missing label counts nothing
    assert bench.relevant_counts("baseColour").tolist() == [2, 2, 0, 0, 2, 0, 0]
    assert bench.evaluable("baseColour").tolist() == [True, True, False, False, True, False, False]
    usage = bench.query_labels["usage"]
    assert usage[ids.index("15")] == -1 and bench.relevant_counts("usage")[ids.index("15")] == 0


def test_clothing_to_shop_maps_article_types(tiny_data_root):
    bench = build("clothing_to_shop_category", tiny_data_root)
    assert bench.kind == "category" and {s.split for s in bench.queries} == {"val"}
    assert len(bench.queries) == 6
    shop = {s.item_id: bench.values["category"][label]
            for s, label in zip(bench.gallery, bench.gallery_labels["category"])}
    # test ids 10, 15, 20, 25, 30, 35, 40; "Tops" (40) is deliberately unmapped
    assert shop == {"10": "t-shirt", "15": "t-shirt", "20": "dress", "25": "shoes", "30": "pants", "35": "shoes"}
    query_categories = [bench.values["category"][label] for label in bench.query_labels["category"]]
    assert sorted(query_categories) == ["dress", "pants", "pants", "shoes", "t-shirt", "t-shirt"]
    assert bench.relevant_counts("category").tolist() == [
        {"dress": 1, "pants": 1, "shoes": 2, "t-shirt": 2}[c] for c in query_categories]


def test_clothing_queries_stay_validation_for_every_split(tiny_data_root):
    val = build("clothing_to_shop_category", tiny_data_root, split="val")
    assert len(val.queries) == 6 and [s.item_id for s in val.gallery] == ["39"]  # 29 is a watch: unmapped
    train = build("clothing_to_shop_category", tiny_data_root, split="train")
    assert [s.item_id for s in train.gallery] == ["11"] and len(train.queries) == 6


def test_drop_removes_rows_on_both_sides_when_self_excluded(tiny_data_root):
    bench = build("fashion_product_attributes", tiny_data_root)
    smaller = bench.drop(queries=[0], gallery=[4])
    assert len(smaller.queries) == len(smaller.gallery) == 5
    assert [s.item_id for s in smaller.queries] == ["15", "20", "25", "35", "40"]
    assert smaller.relevant_counts("baseColour").tolist() == [0, 0, 0, 0, 0]
    c2s = build("viton_c2s", tiny_data_root).drop(gallery=[1])
    assert len(c2s.queries) == 3 and c2s.relevant_counts("pair_id").tolist() == [1, 0, 1]


def test_bad_arguments(tiny_data_root, tmp_path):
    with pytest.raises(ConfigError, match="unknown split 'tset'"):
        build("viton_c2s", tiny_data_root, split="tset")
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        build("viton_c2s", tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="unknown benchmark"):
        BENCHMARKS.build("vitonc2s", data_root=tiny_data_root)


def test_summary_counts(tiny_data_root):
    summary = build("viton_c2s", tiny_data_root).summary()
    assert summary["queries"] == summary["gallery"] == 3
    assert summary["attributes"] == {"pair_id": {"values": 3, "evaluable_queries": 3}}


# ---- the category map ----------------------------------------------------------------

CLOTHING_CATEGORIES = {"dress", "hat", "longsleeve", "outwear", "pants", "shirt", "shoes", "shorts", "skirt",
                       "t-shirt"}


def test_shipped_category_map_targets_clothing_categories():
    mapping = load_category_map()
    assert set(mapping.values()) == CLOTHING_CATEGORIES
    assert mapping["Tshirts"] == "t-shirt" and mapping["Jeans"] == "pants" and "Tops" not in mapping


@pytest.mark.parametrize("text, line, problem", [
    ("type,cat\n", 1, "header must be"),
    ("articleType,category\nJeans\n", 2, "two non-empty columns"),
    ("articleType,category\nJeans,pants\nJeans,shorts\n", 3, "mapped twice"),
])
def test_malformed_category_map(tmp_path, text, line, problem):
    (tmp_path / "map.csv").write_text(text)
    with pytest.raises(AnnotationError, match=problem) as caught:
        load_category_map(tmp_path / "map.csv")
    assert caught.value.line == line


@pytest.mark.shared_data
def test_category_map_names_real_article_types(shared_data_root):
    table = READERS.build("fashion_product", root=shared_data_root / "fashion-product")
    assert set(load_category_map()) <= set(table.attribute_values("articleType"))


@pytest.mark.shared_data
@pytest.mark.parametrize("name, queries, gallery", [
    ("viton_c2s", 1419, 1419),
    ("fashion_product_attributes", 4174, 4174),
    ("clothing_to_shop_category", 341, 2510),
])
def test_shared_benchmark_sizes(shared_data_root, name, queries, gallery):
    bench = build(name, shared_data_root)
    assert (len(bench.queries), len(bench.gallery)) == (queries, gallery)
    for attribute in bench.attributes:
        assert bench.evaluable(attribute).sum() > 0.99 * queries


# ---- the papers' datasets, official protocols (fixtures in tests/fixtures_official.py) ----------

def test_deepfashion_c2s_consumer_test_photos_against_shop_test_photos(tmp_path):
    from fixtures_official import write_deepfashion_c2s

    write_deepfashion_c2s(tmp_path / "deepfashion_c2s")
    bench = build("deepfashion_c2s", tmp_path)
    assert bench.kind == "instance" and bench.crop_bbox
    assert {s.domain for s in bench.queries} == {"consumer"} and {s.domain for s in bench.gallery} == {"shop"}
    assert len(bench.queries) == 2 and len(bench.gallery) == 3  # id_3: 1 consumer + 2 shop; id_4: 1 + 1
    assert bench.relevant_counts("item").tolist() == [2, 1]
    assert len(build("deepfashion_c2s", tmp_path, split="val").queries) == 1


def test_deepfashion_inshop_query_against_gallery(tmp_path):
    from fixtures_official import write_deepfashion_inshop

    write_deepfashion_inshop(tmp_path / "deepfashion_inshop")
    bench = build("deepfashion_inshop", tmp_path)
    assert len(bench.queries) == 2 and len(bench.gallery) == 3 and not bench.crop_bbox
    assert sorted(bench.relevant_counts("item").tolist()) == [1, 2]
    with pytest.raises(ConfigError, match="only the test protocol"):
        build("deepfashion_inshop", tmp_path, split="val")


def test_street2shop_test_street_photos_against_the_test_gallery(tmp_path):
    from fixtures_official import write_street2shop

    write_street2shop(tmp_path / "street2shop")
    bench = build("street2shop", tmp_path)
    # photo 2 is in two test pairs (products 100 and 101); the gallery is every shop photo of a
    # product in a test pair or in no pair (100, 101, 102, 201), over both categories.
    assert sorted(s.item_id for s in bench.queries) == ["100", "101"] and bench.crop_bbox
    assert sorted(s.item_id for s in bench.gallery) == ["100", "100", "101", "102", "201"]
    assert sorted(bench.relevant_counts("item").tolist()) == [1, 2]


def test_asen_lists_give_one_query_set_per_attribute(tmp_path):
    from fixtures_official import write_asen_lists

    write_asen_lists(tmp_path / "darn" / "split")
    bench = build("darn", tmp_path)
    assert bench.kind == "attribute" and bench.attributes == ["clothes pattern", "clothes shape"]
    assert len(bench.queries) == 2 and len(bench.gallery) == 3
    # q0 (pattern 27) has c0 as its one relevant candidate; both.jpg's shape query has none.
    assert bench.evaluable("clothes pattern").tolist() == [True, False]
    assert bench.relevant_counts("clothes pattern").tolist() == [1, 0]
    assert not bench.evaluable("clothes shape").any()
    with pytest.raises(FileNotFoundError, match="fashionai/ in the layout of the 'fashionai' reader"):
        build("fashionai", tmp_path)


def test_deepfashion_asen_benchmark_queries_per_attribute_type(tmp_path):
    from fixtures_official import write_asen_lists

    write_asen_lists(tmp_path / "deepfashion_asen" / "split", {
        "filenames_train.txt": ["img/A/1.jpg"], "label_train.txt": ["0 0 1"],
        "filenames_test.txt": ["img/B/1.jpg", "img/C/1.jpg", "img/D/1.jpg", "img/E/1.jpg"],
        "query_test.txt": ["0 0 5", "1 4 7"],
        "candidate_test.txt": ["2 0 5", "3 0 6", "3 4 7", "2 4 8"]})
    bench = build("deepfashion_asen", tmp_path)
    assert bench.kind == "attribute" and bench.attributes == ["texture", "style"]
    assert bench.relevant_counts("texture").tolist() == [1, 0] and bench.relevant_counts("style").tolist() == [0, 1]
    with pytest.raises(ConfigError, match="use split test or val"):
        build("deepfashion_asen", tmp_path, split="train")
