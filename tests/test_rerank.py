"""α-query expansion and k-reciprocal re-ranking (src/fashion_retrieval/rerank.py): hand-checked
cases, an independent loop-and-set oracle of the re-ranking, and the options' validation."""
from __future__ import annotations

import numpy as np
import pytest

from fashion_retrieval import rerank
from fashion_retrieval.rerank import KReciprocal, QueryExpansion, k_reciprocal_distances, query_expansion


def _unit(rows) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_unit(seed: int, n: int, d: int = 8, clusters: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    return _unit(centres[rng.integers(0, clusters, n)] + 0.7 * rng.normal(size=(n, d)))


# ---- α-QE -------------------------------------------------------------------------------------
def test_query_expansion_with_k_zero_is_the_identity() -> None:
    queries, gallery = _random_unit(0, 5), _random_unit(1, 9)
    np.testing.assert_allclose(query_expansion(queries, gallery, k=0, alpha=3.0), queries, atol=1e-6)


def test_query_expansion_by_hand() -> None:
    query = _unit([[1.0, 0.0]])
    gallery = _unit([[0.0, 1.0], [1.0, 1.0], [1.0, 0.2], [-1.0, 0.1]])
    similarity = (gallery @ query.T).ravel()  # 0, 0.707, 0.981, -0.995: the two nearest are rows 2 and 1
    expected = query[0] + similarity[2] ** 3 * gallery[2] + similarity[1] ** 3 * gallery[1]
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(query_expansion(query, gallery, k=2, alpha=3.0)[0], expected, atol=1e-6)
    # alpha = 0: the plain sum of the query and its neighbours (average query expansion)
    plain = query[0] + gallery[2] + gallery[1]
    np.testing.assert_allclose(query_expansion(query, gallery, k=2, alpha=0.0)[0], plain / np.linalg.norm(plain),
                               atol=1e-6)


def test_query_expansion_skips_the_query_itself_and_negative_neighbours() -> None:
    gallery = _unit([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.0]])
    # query 0 is gallery row 0: its neighbours are rows 1 and 2, and row 2 (cosine -1) weighs 0
    expanded = query_expansion(gallery[:1], gallery, k=2, alpha=1.0, query_gallery_index=[0])
    expected = gallery[0] + 0.8 * gallery[1]
    np.testing.assert_allclose(expanded[0], expected / np.linalg.norm(expected), atol=1e-6)


def test_query_expansion_with_more_neighbours_than_gallery_items() -> None:
    query, gallery = _unit([[1.0, 0.0]]), _unit([[1.0, 1.0]])
    expected = query[0] + np.sqrt(0.5) * gallery[0]
    np.testing.assert_allclose(query_expansion(query, gallery, k=5, alpha=1.0)[0],
                               expected / np.linalg.norm(expected), atol=1e-6)


# ---- k-reciprocal re-ranking: an oracle written from the paper's definitions, with loops and sets
def _reference(queries: np.ndarray, gallery: np.ndarray, k1: int, k2: int, lam: float,
               self_index: list[int] | None = None) -> np.ndarray:
    q_num, g_num = len(queries), len(gallery)
    self_index = self_index if self_index is not None else [-1] * q_num
    pool = list(gallery)
    where = []
    for q, own in enumerate(self_index):
        if own >= 0:
            where.append(own)
        else:
            where.append(len(pool))
            pool.append(queries[q])
    pool = np.array(pool, dtype=np.float64)
    n = len(pool)
    dist = ((pool[:, None, :] - pool[None, :, :]) ** 2).sum(-1)
    dist = dist / dist.max(axis=1, keepdims=True)
    # ranking: self first, then by similarity (= distance for unit rows), ties by index
    order = [[i] + sorted((j for j in range(n) if j != i), key=lambda j: (-pool[i] @ pool[j], j)) for i in range(n)]

    def nearest(i: int, k: int) -> set[int]:
        return set(order[i][:k + 1])

    def reciprocal(i: int, k: int) -> set[int]:
        return {j for j in nearest(i, k) if i in nearest(j, k)}

    half = (k1 + 1) // 2
    encoding = np.zeros((n, n))
    for i in range(n):
        expanded = set(reciprocal(i, k1))
        for j in reciprocal(i, k1):
            candidate = reciprocal(j, half)
            if len(candidate & reciprocal(i, k1)) >= 2 / 3 * len(candidate):
                expanded |= candidate
        for j in expanded:
            encoding[i, j] = np.exp(-dist[i, j])
        encoding[i] /= encoding[i].sum()
    if k2 > 1:
        encoding = np.array([encoding[order[i][:k2]].mean(axis=0) for i in range(n)])
    out = np.zeros((q_num, g_num))
    for q in range(q_num):
        for g in range(g_num):
            low = np.minimum(encoding[where[q]], encoding[g]).sum()
            high = np.maximum(encoding[where[q]], encoding[g]).sum()
            out[q, g] = (1 - lam) * (1 - low / high) + lam * dist[where[q], g]
    return out


@pytest.mark.parametrize("k1,k2,lam", [(4, 3, 0.3), (6, 1, 0.0), (3, 2, 1.0), (40, 6, 0.3)])
def test_k_reciprocal_matches_the_reference(k1: int, k2: int, lam: float) -> None:
    queries, gallery = _random_unit(2, 7), _random_unit(3, 23)
    np.testing.assert_allclose(k_reciprocal_distances(queries, gallery, k1, k2, lam),
                               _reference(queries, gallery, k1, k2, lam), atol=1e-5)


def test_k_reciprocal_with_queries_inside_the_gallery(monkeypatch) -> None:
    gallery = _random_unit(4, 30)
    own = [3, 0, 17, -1]  # three queries are gallery rows, the last one is not
    queries = np.concatenate([gallery[own[:3]], _random_unit(5, 1)])
    expected = _reference(queries, gallery, 5, 3, 0.3, own)
    np.testing.assert_allclose(k_reciprocal_distances(queries, gallery, 5, 3, 0.3, query_gallery_index=own),
                               expected, atol=1e-5)
    # tiny blocks: the chunked paths give the same numbers
    monkeypatch.setattr(rerank, "PAIR_BUDGET", 7)
    monkeypatch.setattr(rerank, "BLOCK_ENTRIES", 31)
    np.testing.assert_allclose(k_reciprocal_distances(queries, gallery, 5, 3, 0.3, query_gallery_index=own),
                               expected, atol=1e-5)


def test_k_reciprocal_moves_a_reciprocal_neighbour_up() -> None:
    # The query q sits between a tight group A (a1, a2, a3, which it belongs with) and a lone
    # item x that is slightly closer to q than a2 and a3 are. A's members are each other's
    # nearest neighbours and have q among theirs; x's nearest are q and then the far group B.
    q = [1.0, 0.0, 0.0]
    a1, a2, a3 = [0.98, 0.2, 0.0], [0.9, 0.42, 0.0], [0.92, 0.38, 0.05]
    x = [0.95, -0.25, -0.2]
    b = [[0.2, -0.9, -0.6], [0.1, -1.0, -0.5], [0.0, -0.9, -0.7]]
    gallery = _unit([a1, a2, a3, x, *b])
    query = _unit([q])
    plain = np.argsort(-(query @ gallery.T)[0], kind="stable")
    assert plain.tolist().index(3) < plain.tolist().index(1)  # x outranks a2 by plain similarity
    distances = k_reciprocal_distances(query, gallery, k1=3, k2=1, lam=0.1)[0]
    reranked = np.argsort(distances, kind="stable")
    assert reranked.tolist().index(1) < reranked.tolist().index(3)  # the reciprocal neighbour a2 moves above x
    assert set(reranked[:3].tolist()) == {0, 1, 2}


def test_k_reciprocal_with_lambda_one_is_the_original_ranking() -> None:
    queries, gallery = _random_unit(6, 4), _random_unit(7, 15)
    distances = k_reciprocal_distances(queries, gallery, 5, 3, 1.0)
    for row, query in zip(distances, queries):
        assert np.argsort(row, kind="stable").tolist() == np.argsort(-(gallery @ query), kind="stable").tolist()


def test_k_reciprocal_refuses_a_matrix_over_the_limit() -> None:
    queries, gallery = _random_unit(8, 10), _random_unit(9, 10)
    with pytest.raises(ValueError, match="10 queries × 10 gallery items .*100 entries.*more than the 99 allowed"):
        k_reciprocal_distances(queries, gallery, 3, 2, 0.3, max_entries=99)


# ---- options ----------------------------------------------------------------------------------
def test_options_parse() -> None:
    assert QueryExpansion.parse("2,3") == QueryExpansion(2, 3.0)
    assert QueryExpansion.parse(" 0 , 0.5 ") == QueryExpansion(0, 0.5)
    assert KReciprocal.parse("20,6,0.3") == KReciprocal(20, 6, 0.3)
    assert KReciprocal(20, 6, 0.3).to_dict() == {"k1": 20, "k2": 6, "lambda": 0.3}


@pytest.mark.parametrize("text,message", [
    ("2", r"--query-expansion '2': expected k,alpha"),
    ("2,3,4", r"expected k,alpha"),
    ("two,3", r"--query-expansion: k must be an integer, got 'two'"),
    ("2.5,3", r"k must be an integer, got '2.5'"),
    ("2,x", r"alpha must be a number, got 'x'"),
    ("-1,3", r"k must be an integer ≥ 0, got -1"),
    ("2,-1", r"alpha must be a finite number ≥ 0, got -1.0"),
    ("2,nan", r"alpha must be a finite number ≥ 0"),
])
def test_query_expansion_option_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QueryExpansion.parse(text)


@pytest.mark.parametrize("text,message", [
    ("20,6", r"--rerank '20,6': expected k1,k2,lambda"),
    ("0,6,0.3", r"--rerank: k1 must be an integer ≥ 1, got 0"),
    ("20,0,0.3", r"k2 must be an integer ≥ 1, got 0"),
    ("20,6,1.5", r"lambda must lie in \[0, 1\], got 1.5"),
    ("20,6,", r"expected k1,k2,lambda"),
])
def test_rerank_option_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KReciprocal.parse(text)


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="differ in dimension: 2 vs 3"):
        query_expansion(np.ones((1, 2)), np.ones((2, 3)), 1, 1.0)
    with pytest.raises(ValueError, match="query_embeddings contains NaN"):
        k_reciprocal_distances(np.full((1, 2), np.nan), np.ones((2, 2)), 2, 1, 0.3)
    with pytest.raises(ValueError, match=r"query_gallery_index values must lie in \[-1, 2\)"):
        k_reciprocal_distances(np.ones((1, 2)), np.ones((2, 2)), 2, 1, 0.3, query_gallery_index=[5])
