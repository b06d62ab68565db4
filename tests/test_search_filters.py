"""Search filters on every store: exact among the matches, k results whenever k items match."""
from __future__ import annotations

import numpy as np
import pytest

from fashion_retrieval.index.filters import FilterError, SearchFilter, facets, known_fields
from fashion_retrieval.index.faiss_store import FaissStore

DIM = 16
N = 600
CATEGORIES = ["Shirts", "Jeans", "Dresses", "Shoes", "Watches"]
STORES = ["flat", "ivf", "hnsw", "ivfpq", "milvus"]
EXACT = {"flat", "hnsw", "milvus"}  # exact at this size; IVF kinds probe a few lists


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def metadata(i: int) -> dict:
    """Category cycles; 12 items are "Rare" (scattered over the catalog); colour is multi-valued
    for every third item; gender is missing for every seventh."""
    attributes = {"colour": ["Red", "Blue"] if i % 3 == 0 else "Green", "gender": "Men" if i % 2 else "Women"}
    if i % 7 == 0:
        del attributes["gender"]
    category = "Rare" if i % 50 == 7 else CATEGORIES[i % len(CATEGORIES)]
    return {"item_id": f"sku-{i // 2}", "category": category, "domain": "shop", "attributes": attributes}


@pytest.fixture(scope="module", params=STORES)
def store(request, tmp_path_factory):
    kind = request.param
    path = tmp_path_factory.mktemp(f"filters-{kind}") / "index"
    if kind == "milvus":
        pytest.importorskip("milvus_lite")
        from fashion_retrieval.index.milvus_store import MilvusStore

        store = MilvusStore(path, DIM)
    else:
        store = FaissStore(path, DIM, kind)
        store.nprobe = 1  # one list of many: an unfiltered-style probe misses most matches
    store.add([f"img-{i}" for i in range(N)], unit_vectors(N), [metadata(i) for i in range(N)])
    yield kind, store
    if kind == "milvus":
        store.close()


def brute_force(query: np.ndarray, where: SearchFilter, k: int) -> list[str]:
    vectors = unit_vectors(N)
    scores = vectors @ query
    matching = [i for i in np.argsort(-scores, kind="stable") if where.matches(f"img-{i}", metadata(int(i)))]
    return [f"img-{i}" for i in matching[:k]]


@pytest.mark.parametrize("fields, ids, expected_count", [
    ({"category": "Rare"}, None, 12),                       # fewer matches than k: all of them
    ({"category": "Shirts"}, None, 10),                     # many matches: k of them
    ({"category": ["Rare", "Jeans"], "gender": "Men"}, None, 10),
    ({"colour": "Blue", "category": "Dresses"}, None, 10),  # a value inside a multi-valued attribute
    ({}, ["sku-3", "img-100", "sku-250"], 5),               # item ids (two images each) and an image id
    ({"category": "Shoes"}, ["sku-4", "sku-8"], 1),         # img-8 and img-9 are sku-4: only img-8 is a shoe
    ({"category": "No such value"}, None, 0),
])
def test_filtered_search_returns_the_best_matches_only(store, fields, ids, expected_count):
    kind, store = store
    where = SearchFilter.build(fields, ids)
    queries = unit_vectors(4, seed=1)
    k = 10 if expected_count != 12 else 20
    scores, found = store.search(queries, k, where=where)
    assert scores.shape == (4, min(k, expected_count))
    for query, row, row_scores in zip(queries, found, scores):
        assert len(row) == min(k, expected_count)
        assert all(where.matches(i, metadata(int(i[4:]))) for i in row)
        assert np.all(np.diff(row_scores) <= 1e-6)
        if kind in EXACT or kind == "ivf":  # IVF-flat falls back to an exhaustive probe: exact too
            assert row == brute_force(query, where, k)


def test_an_unfiltered_search_is_unchanged(store):
    kind, store = store
    scores, found = store.search(unit_vectors(2, seed=3), 10)
    assert scores.shape == (2, 10)


def test_hnsw_filter_skips_removed_items(tmp_path):
    store = FaissStore(tmp_path / "index", DIM, "hnsw")
    store.add([f"img-{i}" for i in range(N)], unit_vectors(N), [metadata(i) for i in range(N)])
    store.remove(["img-7", "img-57"])  # two of the Rare items, tombstoned
    where = SearchFilter.build({"category": "Rare"})
    _, found = store.search(unit_vectors(1, seed=2), 20, where=where)
    assert len(found[0]) == 10 and not {"img-7", "img-57"} & set(found[0])
    store.add(["img-7"], unit_vectors(1, seed=9), [metadata(7)])  # back again: postings follow
    _, found = store.search(unit_vectors(1, seed=9), 1, where=where)
    assert found == [["img-7"]]


def test_filter_parsing_and_unknown_fields():
    where = SearchFilter.parse(["category=Shirts", "category=Tops", "gender=Men", "note=a=b"])
    assert where.to_dict() == {"category": ["Shirts", "Tops"], "gender": ["Men"], "note": ["a=b"]}
    assert SearchFilter.parse([]) is None
    with pytest.raises(FilterError, match="'category' is not FIELD=VALUE"):
        SearchFilter.parse(["category"])
    fields = known_fields([metadata(i) for i in range(10)])
    assert fields == ["category", "colour", "domain", "gender", "item_id"]
    where.check_fields(["category", "gender", "note"])
    with pytest.raises(FilterError, match="unknown filter field 'note'; this index has category, colour, domain"):
        where.check_fields(fields)
    # an attribute named like a top-level field is reached as attributes.NAME
    assert SearchFilter.build({"attributes.category": "x"}).matches("a", {"attributes": {"category": "x"}})
    assert not SearchFilter.build({"category": "x"}).matches("a", {"attributes": {"category": "x"}})


def test_facets_count_items_per_value():
    counted = facets([metadata(i) for i in range(6)])
    assert counted["colour"] == {"Red": 2, "Blue": 2, "Green": 4}
    assert counted["gender"] == {"Men": 3, "Women": 2}  # item 0 has none
    assert "item_id" not in counted


def test_every_store_lists_its_items_for_the_filter_fields(store):
    """What CatalogIndex.facets and filter_fields read (a Milvus store scans its collection)."""
    _, store = store
    items = store.items()
    assert len(items) == N
    assert known_fields(items) == ["category", "colour", "domain", "gender", "item_id"]
    assert facets(items)["category"]["Rare"] == 12
