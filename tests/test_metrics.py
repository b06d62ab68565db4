"""Retrieval metrics: hand-computed cases, the one-query oracle (tests/metric_oracle.py), chunking
invariance, the scan paths against each other and agreement with pytorch-metric-learning where the
definitions coincide."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metric_oracle import average_precision, average_precision_from_ranks, hit_at_k, map_at_k, ranking, recall_at_k

from fashion_retrieval import scan as scan_module
from fashion_retrieval.metrics import (
    MetricSpec,
    RetrievalResult,
    chunked_topk,
    evaluate_attribute_retrieval,
    evaluate_retrieval,
    evaluate_retrieval_from_scores,
    relevant_ranks,
    retrieve,
    retrieve_from_scores,
)

# ---------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------

# One query [1.0] against 1-D gallery embeddings, so the scores are the gallery values exactly.
TIE_GALLERY = np.array([[0.9], [0.5], [0.9], [0.1], [0.5]], dtype=np.float32)
TIE_GALLERY_LABELS = np.array([7, 3, 3, 7, 3])
TIE_QUERY = np.array([[1.0]], dtype=np.float32)
TIE_QUERY_LABELS = np.array([3])
# Ranking: 0.9 at indices 0 and 2 → gallery order puts 0 first; 0.5 at 1 and 4 → 1 first.
#   order = [0, 2, 1, 4, 3], labels [7, 3, 3, 3, 7], relevant = [0, 1, 1, 1, 0], n_relevant = 3
# (the opposite tie rule would give [2, 0, 4, 1, 3] and a hit at rank 1)
TIE_AP = (1 / 2 + 2 / 3 + 3 / 4) / 3  # = 0.638888…


def test_pure_functions_on_a_ranked_row():
    row = [0, 1, 1, 1, 0]
    assert average_precision(row) == pytest.approx(TIE_AP)
    # truncated row: the AP denominator is the number of relevant items given
    assert average_precision(row, n_relevant=4) == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 4)
    assert average_precision_from_ranks([4, 2, 3]) == pytest.approx(TIE_AP)
    assert map_at_k(row, 2) == pytest.approx((1 / 2) / 2)  # one hit at 2, / min(2, 3)
    assert map_at_k(row, 3) == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert map_at_k(row, 100) == pytest.approx(TIE_AP)  # k ≥ everything: MAP@k = AP
    assert recall_at_k(row, 2) == pytest.approx(1 / 3)
    assert hit_at_k(row, 1) == 0.0 and hit_at_k(row, 2) == 1.0
    assert math.isnan(average_precision([0, 0, 0]))
    assert math.isnan(map_at_k([0, 0], 1))
    with pytest.raises(ValueError, match="n_relevant"):
        average_precision(row, n_relevant=2)
    with pytest.raises(ValueError, match="k must be"):
        map_at_k(row, 0)
    with pytest.raises(ValueError, match="distinct"):
        average_precision_from_ranks([2, 2])


def test_ranking_breaks_ties_by_gallery_order():
    assert ranking(np.array([0.9, 0.5, 0.9, 0.1, 0.5])).tolist() == [0, 2, 1, 4, 3]
    assert ranking(np.array([0.9, 0.5, 0.9, 0.1, 0.5]), ignore=0).tolist() == [2, 1, 4, 3]


def test_ties_are_broken_by_gallery_order():
    result = retrieve(TIE_QUERY, TIE_GALLERY, TIE_QUERY_LABELS, TIE_GALLERY_LABELS, k=5)
    assert result.topk_indices.tolist() == [[0, 2, 1, 4, 3]]
    assert result.topk_relevant.tolist() == [[False, True, True, True, False]]
    assert result.ranks_of(0).tolist() == [2, 3, 4]
    metrics = evaluate_retrieval(TIE_QUERY, TIE_GALLERY, TIE_QUERY_LABELS, TIE_GALLERY_LABELS,
                                 spec=MetricSpec((1, 2, 5), (2, 3), (2,)))
    assert metrics["top1"] == 0.0  # the irrelevant index 0 wins the 0.9 tie
    assert metrics["top2"] == 1.0
    assert metrics["MAP@2"] == pytest.approx(0.25)  # (1/2) / min(2, 3)
    assert metrics["MAP@3"] == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert metrics["Recall@2"] == pytest.approx(1 / 3)
    assert metrics["MAP@all"] == pytest.approx(TIE_AP)
    assert metrics["queries_evaluated"] == 1


def test_tie_rule_holds_with_one_item_per_gallery_chunk():
    result = retrieve(TIE_QUERY, TIE_GALLERY, TIE_QUERY_LABELS, TIE_GALLERY_LABELS, k=3,
                      query_chunk=1, gallery_chunk=1)
    assert result.topk_indices.tolist() == [[0, 2, 1]]
    assert result.ranks_of(0).tolist() == [2, 3, 4]


def test_distance_matrix_gives_the_same_ranking():
    distances = 1.0 - TIE_GALLERY.T  # smaller = more similar; ties stay ties
    metrics = evaluate_retrieval_from_scores(distances, TIE_QUERY_LABELS, TIE_GALLERY_LABELS,
                                             higher_is_better=False, spec=MetricSpec((1, 2), (2,), ()))
    assert metrics["top1"] == 0.0 and metrics["top2"] == 1.0
    assert metrics["MAP@2"] == pytest.approx(0.25)
    assert metrics["MAP@all"] == pytest.approx(TIE_AP)


def test_unlabelled_queries_queries_without_relevant_and_distractor_gallery_labels():
    gallery = np.array([[0.2], [0.8], [0.6], [0.4]], dtype=np.float32)
    gallery_labels = np.array([3, -1, 4, 3])  # item 1 is a distractor: ranked, never relevant
    queries = np.array([[1.0], [1.0], [1.0], [-1.0]], dtype=np.float32)
    query_labels = np.array([3, 9, -1, 4])  # query 1: no label-9 item; query 2: not evaluated
    # q0 (label 3): scores [.2, .8, .6, .4] → order [1, 2, 3, 0] → labels [-1, 4, 3, 3]
    #    relevant at ranks 3 and 4 → AP = (1/3 + 2/4) / 2 = 5/12; top1 = 0, top5 = 1
    # q3 (label 4): scores [-.2, -.8, -.6, -.4] → order [0, 3, 2, 1] → labels [3, 3, 4, -1]
    #    relevant at rank 3 → AP = 1/3; top1 = 0
    metrics = evaluate_retrieval(queries, gallery, query_labels, gallery_labels,
                                 spec=MetricSpec((1, 3, 5), (3,), (3,)))
    assert metrics["queries_evaluated"] == 2
    assert metrics["queries_without_relevant"] == 1
    assert metrics["queries_unlabelled"] == 1
    assert metrics["MAP@all"] == pytest.approx((5 / 12 + 1 / 3) / 2)
    assert metrics["top1"] == 0.0
    assert metrics["top3"] == 1.0
    # MAP@3: q0 (1/3) / min(3, 2) = 1/6; q3 (1/3) / min(3, 1) = 1/3 → mean 1/4
    assert metrics["MAP@3"] == pytest.approx(0.25)
    # Recall@3: q0 1/2, q3 1/1 → 3/4
    assert metrics["Recall@3"] == pytest.approx(0.75)
    per_query = relevant_ranks(queries, gallery, query_labels, gallery_labels)
    assert [r.tolist() for r in per_query] == [[3, 4], [], [], [3]]


def test_self_exclusion_when_queries_are_in_the_gallery():
    items = np.array([[1.0], [0.8], [0.3], [0.8]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    own = np.arange(4)
    # q0: scores [1, .8, .3, .8] minus itself → order [1, 3, 2] (0.8 tie: index 1 first)
    #     labels [0, 1, 1] → AP 1, top1 1
    # q1: scores [.8, .64, .24, .64] minus itself → order [0, 3, 2] → labels [0, 1, 1] → AP 1
    # q2: scores [.3, .24, .09, .24] minus itself → order [0, 1, 3] → labels [0, 0, 1] → AP 1/3
    # q3: scores [.8, .64, .24, .64] minus itself → order [0, 1, 2] → labels [0, 0, 1] → AP 1/3
    metrics = evaluate_retrieval(items, items, labels, labels, spec=MetricSpec((1,), (), ()),
                                 query_gallery_index=own)
    assert metrics["MAP@all"] == pytest.approx((1 + 1 + 1 / 3 + 1 / 3) / 4)
    assert metrics["top1"] == 0.5
    result = retrieve(items, items, labels, labels, k=4, query_gallery_index=own)
    assert result.topk_indices.tolist() == [[1, 3, 2, -1], [0, 3, 2, -1], [0, 1, 3, -1], [0, 1, 2, -1]]
    assert np.all(np.isneginf(result.topk_scores[:, 3]))
    assert result.n_relevant.tolist() == [1, 1, 1, 1]
    # without exclusion each query's own item is ranked and relevant:
    # q0 order [0, 1, 3, 2] → labels [0, 0, 1, 1] → AP 1;  q1 order [0, 1, 3, 2] → AP 1
    # q2 order [0, 1, 3, 2] → labels [0, 0, 1, 1] → relevant at 3, 4 → AP (1/3 + 2/4) / 2 = 5/12
    # q3 order [0, 1, 3, 2] → AP 5/12
    kept = evaluate_retrieval(items, items, labels, labels, spec=MetricSpec((1,), (), ()))
    assert kept["MAP@all"] == pytest.approx((2 + 2 * 5 / 12) / 4)


def test_a_query_whose_only_relevant_item_is_itself_is_counted_not_evaluated():
    items = np.array([[1.0], [0.5]], dtype=np.float32)
    metrics = evaluate_retrieval(items, items, [0, 1], [0, 1], spec=MetricSpec((1,), (), ()),
                                 query_gallery_index=[0, 1])
    assert metrics["queries_evaluated"] == 0
    assert metrics["queries_without_relevant"] == 2
    assert math.isnan(metrics["top1"]) and math.isnan(metrics["MAP@all"])


def test_attribute_retrieval_overall_is_query_weighted():
    gallery_items = np.array([[0.9], [0.1]], dtype=np.float32)
    gallery = {"color": gallery_items, "sleeve": gallery_items}
    gallery_labels = {"color": [0, 1], "sleeve": [0, 1]}
    queries = {"color": np.ones((1, 1), dtype=np.float32), "sleeve": np.ones((3, 1), dtype=np.float32)}
    query_labels = {"color": [0], "sleeve": [0, 1, 7]}
    # color: q0 relevant at rank 1 → AP 1, top1 1
    # sleeve: q0 AP 1, top1 1; q1 relevant at rank 2 → AP 1/2, top1 0; q2 has no label-7 item
    out = evaluate_attribute_retrieval(queries, gallery, query_labels, gallery_labels,
                                       spec=MetricSpec((1,), (), ()))
    assert out["per_attribute"]["color"]["MAP@all"] == pytest.approx(1.0)
    assert out["per_attribute"]["sleeve"]["MAP@all"] == pytest.approx(0.75)
    assert out["per_attribute"]["sleeve"]["queries_without_relevant"] == 1
    # overall = mean over the 3 evaluated queries (1 + 1 + 1/2) / 3, not (1 + 0.75) / 2
    assert out["overall"]["MAP@all"] == pytest.approx(2.5 / 3)
    assert out["overall"]["top1"] == pytest.approx(2 / 3)
    assert out["overall"]["queries_evaluated"] == 3
    assert out["overall"]["queries_without_relevant"] == 1
    with pytest.raises(ValueError, match="gallery_embeddings"):
        evaluate_attribute_retrieval(queries, {"color": gallery["color"]}, query_labels, gallery_labels)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_are_rejected_with_clear_errors():
    gallery = np.zeros((3, 2), dtype=np.float32)
    query = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="differ in dimension"):
        evaluate_retrieval(query, np.zeros((3, 4), dtype=np.float32), [0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="gallery_labels has 2 entries"):
        evaluate_retrieval(query, gallery, [0, 0], [0, 0])
    bad = query.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_retrieval(bad, gallery, [0, 0], [0, 0, 0])
    with pytest.raises(TypeError, match="integers"):
        evaluate_retrieval(query, gallery, [0.5, 0.0], [0, 0, 0])
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        evaluate_retrieval(query, gallery, [0, 0], [0, 0, 0], query_gallery_index=[0, 3])
    with pytest.raises(ValueError, match="2-D"):
        evaluate_retrieval(np.zeros(2, dtype=np.float32), gallery, [0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="chunk"):
        evaluate_retrieval(query, gallery, [0, 0], [0, 0, 0], query_chunk=0)
    with pytest.raises(ValueError, match="retrieve with k"):
        top1_only = retrieve(query, gallery, [0, 0], [0, 0, 0], k=1, full_ranks=False)
        top1_only.metrics(spec=MetricSpec((2,), (), (), full_map=False))


def _result(**changes) -> RetrievalResult:
    fields = dict(
        query_indices=np.array([0]), topk_indices=np.array([[2, 0]]), topk_scores=np.array([[0.5, 0.1]]),
        topk_relevant=np.array([[True, False]]), n_relevant=np.array([2]), queries_without_relevant=0,
        queries_unlabelled=0, relevant_ranks=np.array([1, 3]), rank_offsets=np.array([0, 2]),
    )
    fields.update(changes)
    return RetrievalResult(**fields)


def test_retrieval_result_validation():
    assert _result().metrics(spec=MetricSpec((1,), (), ()))["MAP@all"] == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="topk_scores has shape"):
        _result(topk_scores=np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        _result(topk_scores=np.array([[np.nan, 0.1]]))
    with pytest.raises(ValueError, match="n_relevant ≥ 1"):
        _result(n_relevant=np.array([0]), relevant_ranks=np.array([], dtype=np.int64), rank_offsets=np.array([0, 0]),
                topk_relevant=np.array([[False, False]]))
    with pytest.raises(ValueError, match="strictly increasing"):
        _result(relevant_ranks=np.array([3, 1]))
    with pytest.raises(ValueError, match="do not match n_relevant"):
        _result(rank_offsets=np.array([0, 1]))
    with pytest.raises(ValueError, match="padding"):
        _result(topk_indices=np.array([[2, -1]]), topk_relevant=np.array([[True, True]]))
    with pytest.raises(ValueError, match="come together"):
        _result(rank_offsets=None)


# ---------------------------------------------------------------------------------------------
# Independent naive reference (full sort with np.lexsort) on data with heavy ties
# ---------------------------------------------------------------------------------------------

def _naive_metrics(scores: np.ndarray, query_labels, gallery_labels, own, ks, map_at, recall_at):
    """The metrics query by query from the one-query oracle over a full lexsort ranking; labels
    are [N] ids or value sets [N, W] (-1 padded)."""
    per_metric: dict[str, list[float]] = {}
    without, unlabelled = 0, 0
    for q in range(scores.shape[0]):
        if not np.any(np.asarray(query_labels[q]) >= 0):
            unlabelled += 1
            continue
        order = ranking(scores[q], ignore=own[q])
        if query_labels.ndim == 2:  # value sets: relevant = shares a value, by Python sets
            wanted = {int(v) for v in query_labels[q] if v >= 0}
            relevant = np.array([bool(wanted & {int(v) for v in gallery_labels[g] if v >= 0}) for g in order])
        else:
            relevant = (gallery_labels[order] == query_labels[q]) & (gallery_labels[order] >= 0)
        if not relevant.any():
            without += 1
            continue
        values = {"MAP@all": average_precision(relevant)}
        for k in ks:
            values[f"top{k}"] = hit_at_k(relevant, k)
        for k in map_at:
            values[f"MAP@{k}"] = map_at_k(relevant, k)
        for k in recall_at:
            values[f"Recall@{k}"] = recall_at_k(relevant, k)
        for key, value in values.items():
            per_metric.setdefault(key, []).append(value)
    out: dict[str, float | int] = {key: float(np.mean(v)) for key, v in per_metric.items()}
    out.update(queries_evaluated=len(per_metric.get("MAP@all", [])), queries_without_relevant=without,
               queries_unlabelled=unlabelled)
    return out


def _tied_problem(rng: np.random.Generator, n_queries: int, n_gallery: int, dim: int, n_labels: int):
    # values in {-1, -0.5, 0, 0.5, 1}: dot products are exact in float32 and tie very often
    queries = rng.integers(-2, 3, (n_queries, dim)).astype(np.float32) / 2
    gallery = rng.integers(-2, 3, (n_gallery, dim)).astype(np.float32) / 2
    query_labels = rng.integers(-1, n_labels, n_queries)
    gallery_labels = rng.integers(-1, n_labels, n_gallery)
    return queries, gallery, query_labels, gallery_labels


@pytest.mark.parametrize("seed", range(6))
def test_matches_naive_full_sort_reference_with_heavy_ties(seed):
    rng = np.random.default_rng(seed)
    n_queries, n_gallery = int(rng.integers(20, 60)), int(rng.integers(50, 300))
    queries, gallery, query_labels, gallery_labels = _tied_problem(rng, n_queries, n_gallery, 3, 6)
    own = np.where(rng.random(n_queries) < 0.5, rng.integers(0, n_gallery, n_queries), -1)
    ks, map_at, recall_at = (1, 5, 10, 20), (10, 100), (5, 100)
    ours = evaluate_retrieval(queries, gallery, query_labels, gallery_labels, spec=MetricSpec(ks, map_at, recall_at),
                              query_gallery_index=own, query_chunk=7, gallery_chunk=13)
    scores = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    expected = _naive_metrics(scores, query_labels, gallery_labels, own, ks, map_at, recall_at)
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


def _value_set_labels(rng: np.random.Generator, rows: int, width: int, n_labels: int) -> np.ndarray:
    """[rows, width] value sets, -1 padded: every fifth row empty (unlabelled), some rows with a
    value twice."""
    labels = rng.integers(-1, n_labels, (rows, width))
    labels[::5] = -1
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_value_sets_match_the_naive_shares_a_value_reference(seed, monkeypatch):
    rng = np.random.default_rng(100 + seed)
    n_queries, n_gallery = int(rng.integers(20, 60)), int(rng.integers(50, 300))
    queries, gallery, _, _ = _tied_problem(rng, n_queries, n_gallery, 3, 6)
    query_labels = _value_set_labels(rng, n_queries, 3, 7)
    gallery_labels = _value_set_labels(rng, n_gallery, 2, 7)
    own = np.where(rng.random(n_queries) < 0.5, rng.integers(0, n_gallery, n_queries), -1)
    if seed % 2:  # relevant counts a few queries at a time
        monkeypatch.setattr(scan_module, "SHARED_VALUE_PAIRS_PER_CHUNK", 40)
    ks, map_at, recall_at = (1, 5, 10, 20), (10, 100), (5, 100)
    spec = MetricSpec(ks, map_at, recall_at)
    ours = evaluate_retrieval(queries, gallery, query_labels, gallery_labels, spec=spec,
                              query_gallery_index=own, query_chunk=7, gallery_chunk=13)
    scores = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    expected = _naive_metrics(scores, query_labels, gallery_labels, own, ks, map_at, recall_at)
    assert expected["queries_evaluated"] > 0 and expected["queries_unlabelled"] > 0
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    # metrics past the kept top-k come from the ranks of the relevant items: the same numbers
    narrow = retrieve(queries, gallery, query_labels, gallery_labels, k=1, query_gallery_index=own, query_chunk=5)
    for key, value in narrow.metrics(spec).items():
        assert value == pytest.approx(expected[key], abs=1e-12), key


def test_value_sets_of_one_value_are_single_labels():
    rng = np.random.default_rng(8)
    queries, gallery, query_labels, gallery_labels = _tied_problem(rng, 30, 120, 3, 5)
    single = retrieve(queries, gallery, query_labels, gallery_labels, k=10)
    for q, g in ((query_labels[:, None], gallery_labels[:, None]), (query_labels, gallery_labels[:, None]),
                 (np.stack([query_labels, np.full(30, -1)], 1), gallery_labels)):
        sets = retrieve(queries, gallery, q, g, k=10)
        for field in ("query_indices", "topk_indices", "topk_relevant", "n_relevant", "relevant_ranks"):
            np.testing.assert_array_equal(getattr(sets, field), getattr(single, field), err_msg=field)
    with pytest.raises(ValueError, match=r"1-D \[N\] or value sets \[N, W\]"):
        retrieve(queries, gallery, query_labels[:, None, None], gallery_labels)


def test_chunked_topk_matches_lexsort_order():
    rng = np.random.default_rng(11)
    queries, gallery, _, _ = _tied_problem(rng, 25, 90, 2, 3)
    own = rng.integers(-1, 90, 25)
    scores, indices = chunked_topk(queries, gallery, 12, query_gallery_index=own, query_chunk=4, gallery_chunk=9)
    full = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    for q in range(25):
        order = np.lexsort((np.arange(90), -full[q]))
        order = order[order != own[q]][:12]
        assert indices[q].tolist() == order.tolist()
        np.testing.assert_array_equal(scores[q], full[q, order].astype(np.float32))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_queries=st.integers(1, 30),
    n_gallery=st.integers(1, 80),
    k=st.integers(1, 90),
    query_chunk=st.integers(1, 11),
    gallery_chunk=st.integers(1, 37),
)
def test_chunked_equals_unchunked(seed, n_queries, n_gallery, k, query_chunk, gallery_chunk):
    rng = np.random.default_rng(seed)
    queries, gallery, query_labels, gallery_labels = _tied_problem(rng, n_queries, n_gallery, 2, 4)
    own = np.where(rng.random(n_queries) < 0.5, rng.integers(0, n_gallery, n_queries), -1)
    args = (queries, gallery, query_labels, gallery_labels)
    whole = retrieve(*args, k=k, query_gallery_index=own, query_chunk=10**6, gallery_chunk=10**6)
    chunked = retrieve(*args, k=k, query_gallery_index=own, query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    for field in ("query_indices", "topk_indices", "topk_scores", "topk_relevant", "n_relevant",
                  "relevant_ranks", "rank_offsets"):
        np.testing.assert_array_equal(getattr(chunked, field), getattr(whole, field), err_msg=field)
    # the precomputed-matrix path ranks the same way
    from_matrix = retrieve_from_scores(queries @ gallery.T, query_labels, gallery_labels, k=k,
                                       query_gallery_index=own, gallery_chunk=gallery_chunk)
    np.testing.assert_array_equal(from_matrix.topk_indices, whole.topk_indices)
    np.testing.assert_array_equal(from_matrix.relevant_ranks, whole.relevant_ranks)


def test_metrics_from_ranks_agree_with_metrics_from_topk():
    rng = np.random.default_rng(5)
    queries, gallery, query_labels, gallery_labels = _tied_problem(rng, 40, 200, 3, 5)
    wide = retrieve(queries, gallery, query_labels, gallery_labels, k=60)
    narrow = retrieve(queries, gallery, query_labels, gallery_labels, k=1)  # k > 1 comes from the ranks
    request = MetricSpec((1, 5, 50), (7, 60), (3, 60))
    wide_values = wide.per_query(request)
    narrow_values = narrow.per_query(request)
    for key in wide_values:
        np.testing.assert_allclose(narrow_values[key], wide_values[key], rtol=0, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
])
def test_torch_inputs_and_explicit_device_match_numpy(device):
    rng = np.random.default_rng(3)
    queries, gallery, query_labels, gallery_labels = _tied_problem(rng, 15, 40, 3, 4)
    own = rng.integers(-1, 40, 15)
    from_numpy = retrieve(queries, gallery, query_labels, gallery_labels, k=10, query_gallery_index=own)
    on_device = retrieve(torch.from_numpy(queries).to(device), torch.from_numpy(gallery).to(device),
                         torch.from_numpy(query_labels), torch.from_numpy(gallery_labels), k=10,
                         query_gallery_index=own, device=device, gallery_chunk=7)
    for field in ("topk_indices", "topk_scores", "relevant_ranks", "n_relevant"):
        np.testing.assert_array_equal(getattr(on_device, field), getattr(from_numpy, field), err_msg=field)


# ---------------------------------------------------------------------------------------------
# pytorch-metric-learning, where the definitions coincide
# ---------------------------------------------------------------------------------------------

def _clustered(rng, n_queries, n_gallery, per_label, dim=16):
    n_labels = n_gallery // per_label
    centres = rng.standard_normal((n_labels, dim)).astype(np.float32)
    gallery_labels = np.arange(n_gallery) // per_label
    query_labels = rng.integers(0, n_labels, n_queries)
    gallery = centres[gallery_labels] + 1.0 * rng.standard_normal((n_gallery, dim)).astype(np.float32)
    queries = centres[query_labels] + 1.0 * rng.standard_normal((n_queries, dim)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries, gallery, query_labels, gallery_labels


def _pml_accuracy(queries, gallery, query_labels, gallery_labels, k):
    import faiss
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKNN

    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision"), k=k,
                                    device=torch.device("cpu"), knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP))
    return calculator.get_accuracy(queries, query_labels, gallery, gallery_labels)


def test_agrees_with_pytorch_metric_learning_when_relevant_fit_in_k():
    # 10 relevant per query ≤ k = 100: PML's MAP@k denominator (all relevant) = ours (min(k, n))
    rng = np.random.default_rng(0)
    queries, gallery, query_labels, gallery_labels = _clustered(rng, 300, 1500, per_label=10)
    ours = evaluate_retrieval(queries, gallery, query_labels, gallery_labels,
                              spec=MetricSpec((1,), (100,), (), full_map=False), gallery_chunk=256)
    pml = _pml_accuracy(queries, gallery, query_labels, gallery_labels, k=100)
    assert 0.05 < ours["MAP@100"] < 0.95  # neither trivial nor hopeless
    # the tolerance only absorbs a score difference in the last float bit between FAISS and torch
    assert ours["top1"] == pytest.approx(pml["precision_at_1"], abs=1e-4)
    assert ours["MAP@100"] == pytest.approx(pml["mean_average_precision"], abs=1e-4)


def test_pml_divides_map_at_k_by_all_relevant_items():
    # 30 relevant per query, k = 10: PML divides by 30, we divide by min(10, 30) = 10
    rng = np.random.default_rng(1)
    queries, gallery, query_labels, gallery_labels = _clustered(rng, 200, 1500, per_label=30)
    ours = evaluate_retrieval(queries, gallery, query_labels, gallery_labels,
                              spec=MetricSpec((), (10,), (), full_map=False))
    pml = _pml_accuracy(queries, gallery, query_labels, gallery_labels, k=10)
    assert ours["MAP@10"] == pytest.approx(3 * pml["mean_average_precision"], abs=1e-4)


def test_a_relevant_item_never_outranks_itself_when_pass_two_scores_differ_in_the_last_bits(monkeypatch):
    # Another BLAS kernel may round the second pass over the gallery differently; scaling every
    # pass-2 score by (1 + 1e-6) keeps their order but lifts each relevant item above the score
    # recorded for it in pass 1. Continuous data: no two scores closer than that.
    rng = np.random.default_rng(8)
    queries, gallery, query_labels, gallery_labels = _clustered(rng, 20, 200, per_label=10)
    expected = retrieve(queries, gallery, query_labels, gallery_labels, k=0).relevant_ranks

    class Rescaled:
        def __init__(self, source):
            self.source, self.device, self.num_gallery = source, source.device, source.num_gallery

        def query_block(self, rows):
            return self.source.query_block(rows)

        def scores(self, block, start, stop, out):
            return self.source.scores(block, start, stop, out).mul_(1 + 1e-6)

    original = scan_module._count_ranks
    monkeypatch.setattr(scan_module, "_count_ranks", lambda source, *rest: original(Rescaled(source), *rest))
    perturbed = retrieve(queries, gallery, query_labels, gallery_labels, k=0, gallery_chunk=64).relevant_ranks
    np.testing.assert_array_equal(perturbed, expected)


def test_rank_pass_splits_query_chunks_with_many_relevant_items(monkeypatch):
    rng = np.random.default_rng(4)
    queries, gallery, query_labels, gallery_labels = _tied_problem(rng, 30, 120, 2, 2)
    expected = retrieve(queries, gallery, query_labels, gallery_labels, k=5)
    # ~40 relevant items per query: a budget of 50 table entries forces one query per chunk
    monkeypatch.setattr(scan_module, "RANK_WORKSPACE_ENTRIES", 50)
    assert scan_module._rank_chunk_bounds(expected.n_relevant, 16) == list(range(expected.num_evaluated))
    split = retrieve(queries, gallery, query_labels, gallery_labels, k=5, query_chunk=16)
    np.testing.assert_array_equal(split.relevant_ranks, expected.relevant_ranks)
    np.testing.assert_array_equal(split.topk_indices, expected.topk_indices)


@pytest.mark.parametrize("duplicates", [False, True])
def test_faiss_scan_equals_the_torch_scan(monkeypatch, duplicates):
    """The top-k-only scan runs on FAISS's k-NN kernel on the CPU: same top-k, same tie rule
    (equal scores by gallery index), own item excluded, as the torch scan."""
    rng = np.random.default_rng(3)
    gallery = rng.standard_normal((700, 16)).astype(np.float32)
    if duplicates:  # exact ties everywhere, across the k-th place too
        gallery[350:] = gallery[:350]
    queries = np.concatenate([gallery[:40], rng.standard_normal((60, 16)).astype(np.float32)])
    query_labels = rng.integers(0, 30, 100)
    gallery_labels = rng.integers(0, 30, 700)
    own = np.concatenate([np.arange(40), -np.ones(60, dtype=np.int64)])
    used, original = [], scan_module._faiss_topk
    monkeypatch.setattr(scan_module, "_faiss_topk", lambda *a: used.append(original(*a)) or used[-1])
    results = {}
    for use_faiss in (True, False):
        monkeypatch.setattr(scan_module, "FAISS_SCAN", use_faiss)
        results[use_faiss] = retrieve(queries, gallery, query_labels, gallery_labels, k=25,
                                      full_ranks=False, query_gallery_index=own, query_chunk=32)
    fast, exact = results[True], results[False]
    assert np.array_equal(fast.topk_indices, exact.topk_indices)
    np.testing.assert_allclose(fast.topk_scores, exact.topk_scores, rtol=1e-5, atol=1e-5)
    assert not np.any(fast.topk_indices == own[fast.query_indices][:, None])
    taken = [r for r in used if r is not None]
    assert taken and (sum(r[2].size for r in taken) > 0) is duplicates  # ties went to the exact scan


@pytest.mark.parametrize("kind", ["distinct", "ties", "masked", "nan"])
def test_grouped_topk_prefilter_equals_the_full_row_topk(kind):
    """The group-maximum prefilter keeps exactly the top-k set that a top-k over the whole row
    keeps, ties at the cut by the lower column, -inf (masked own items) and NaN rows included."""
    from fashion_retrieval import topk

    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(64, 1003, generator=generator)  # not a multiple of the group: a tail
    if kind == "ties":
        scores = torch.round(scores * 3) / 3
    elif kind == "masked":
        scores[:, 1::2] = -math.inf
        scores[:4, :-5] = -math.inf  # fewer than k finite scores
    elif kind == "nan":
        scores[::9, 17] = math.nan
    k = 20
    assert 1003 // topk.GROUP >= topk.GROUPS_PER_K * (k + 1)  # the prefilter applies
    grouped = topk.grouped_candidates(scores, k)
    full = topk._full_row_candidates(scores, k)
    assert torch.equal(torch.sort(grouped[1], dim=1).values, torch.sort(full[1], dim=1).values)
    torch.testing.assert_close(grouped[0], scores.gather(1, grouped[1]), rtol=0, atol=0, equal_nan=True)


def test_faiss_scan_auto_follows_the_timing(monkeypatch):
    """FAISS_SCAN="auto" takes FAISS's kernel on a large chunk only where the one-off timing found
    it faster; both answers give the same top-k."""
    rng = np.random.default_rng(4)
    gallery = rng.standard_normal((3000, 32)).astype(np.float32)
    queries = rng.standard_normal((200, 32)).astype(np.float32)
    labels_q, labels_g = rng.integers(0, 50, 200), rng.integers(0, 50, 3000)
    monkeypatch.setattr(scan_module, "FAISS_SCAN", "auto")
    monkeypatch.setattr(scan_module, "CALIBRATE_ABOVE", 1)
    used, original = [], scan_module._faiss_topk
    monkeypatch.setattr(scan_module, "_faiss_topk", lambda *a: used.append(original(*a)) or used[-1])
    results = {}
    for faster in (True, False):
        monkeypatch.setattr(scan_module, "_faiss_is_faster", lambda dim, k, faster=faster: faster)
        used.clear()
        results[faster] = retrieve(queries, gallery, labels_q, labels_g, k=30, full_ranks=False)
        assert all((r is not None) is faster for r in used) and used
    assert np.array_equal(results[True].topk_indices, results[False].topk_indices)


def test_faiss_timing_runs_once_per_shape(monkeypatch):
    monkeypatch.setattr(scan_module, "CALIBRATION_SHAPE", (64, 2048))
    monkeypatch.setattr(scan_module, "_faiss_faster", {})
    answer = scan_module._faiss_is_faster(16, 10)
    assert isinstance(answer, bool) and len(scan_module._faiss_faster) == 1
    assert scan_module._faiss_is_faster(16, 10) is answer and len(scan_module._faiss_faster) == 1


# ---------------------------------------------------------------------------------------------
# The int8 first pass (scan_int8): candidates by a rigorous bound, float32 re-scoring
# ---------------------------------------------------------------------------------------------

def _small_int8_pass(monkeypatch):
    """Make the int8 pass apply to test-sized galleries, with several ragged blocks."""
    from fashion_retrieval import scan_int8

    if not scan_int8.available():
        pytest.skip("oneDNN's int8 product is missing or not exact on this CPU: the exact scans run")
    monkeypatch.setattr(scan_int8, "MIN_GALLERY", 64)
    monkeypatch.setattr(scan_int8, "MIN_QUERIES", 1)
    monkeypatch.setattr(scan_int8, "GALLERY_BLOCK", 100)  # not a multiple of 8: padded blocks
    monkeypatch.setattr(scan_int8, "SAMPLE_MIN", 64)
    calls = []
    original = scan_int8.Int8Gallery.topk
    monkeypatch.setattr(scan_int8.Int8Gallery, "topk",
                        lambda self, *args: calls.append(original(self, *args)) or calls[-1])
    return scan_int8, calls


def _int8_against_exact(monkeypatch, scan_int8, queries, gallery, query_labels, gallery_labels, own, k):
    results = {}
    for use_int8 in (True, False):
        monkeypatch.setattr(scan_int8, "INT8_SCAN", use_int8)
        results[use_int8] = retrieve(queries, gallery, query_labels, gallery_labels, k=k, full_ranks=False,
                                     query_gallery_index=own, query_chunk=37)
    fast, exact = results[True], results[False]
    np.testing.assert_array_equal(fast.topk_indices, exact.topk_indices)
    np.testing.assert_allclose(fast.topk_scores, exact.topk_scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(fast.topk_relevant, exact.topk_relevant)
    return fast


@pytest.mark.parametrize("duplicates", [False, True])
def test_int8_pass_equals_the_exact_scans(monkeypatch, duplicates):
    scan_int8, calls = _small_int8_pass(monkeypatch)
    rng = np.random.default_rng(12)
    gallery = rng.standard_normal((450, 16)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    if duplicates:  # exact ties everywhere, across the k-th place too
        gallery[225:] = gallery[:225]
    queries = np.concatenate([gallery[:30], rng.standard_normal((50, 16)).astype(np.float32) / 4])
    own = np.concatenate([np.arange(30), -np.ones(50, dtype=np.int64)])
    labels = rng.integers(0, 20, 450)
    _int8_against_exact(monkeypatch, scan_int8, queries, gallery, rng.integers(0, 20, 80), labels, own, k=12)
    assert any(found is not None for found in calls)  # the int8 pass ran


def test_int8_pass_on_heavily_tied_scores(monkeypatch):
    scan_int8, calls = _small_int8_pass(monkeypatch)
    queries, gallery, query_labels, gallery_labels = _tied_problem(np.random.default_rng(2), 70, 400, 6, 5)
    own = np.where(np.arange(70) % 3 == 0, np.arange(70) * 5, -1)
    _int8_against_exact(monkeypatch, scan_int8, queries, gallery, query_labels, gallery_labels, own, k=25)
    assert any(found is not None for found in calls)


def test_int8_pass_redoes_the_queries_it_cannot_prove(monkeypatch):
    # aiming the threshold at the best sampled score makes it too high for most queries: their
    # proof (k kept items 2B above the threshold) fails and the exact scan answers them
    scan_int8, calls = _small_int8_pass(monkeypatch)
    monkeypatch.setattr(scan_int8, "TARGET_RANK", 1e-3)
    rng = np.random.default_rng(5)
    gallery = rng.standard_normal((500, 8)).astype(np.float32)
    queries = rng.standard_normal((40, 8)).astype(np.float32)
    _int8_against_exact(monkeypatch, scan_int8, queries, gallery, rng.integers(0, 9, 40), rng.integers(0, 9, 500),
                        None, k=30)
    redone = sum(found[2].size for found in calls if found is not None)
    assert redone > 0


def test_int8_pass_gives_up_on_dense_scores(monkeypatch):
    # more kept pairs than the budget: the chunk goes to the exact scan, memory stays bounded
    scan_int8, calls = _small_int8_pass(monkeypatch)
    monkeypatch.setattr(scan_int8, "PAIR_BUDGET", 0)
    monkeypatch.setattr(scan_int8, "PAIR_FLOOR", 1)
    rng = np.random.default_rng(6)
    gallery = rng.standard_normal((300, 8)).astype(np.float32)
    queries = rng.standard_normal((20, 8)).astype(np.float32)
    _int8_against_exact(monkeypatch, scan_int8, queries, gallery, rng.integers(0, 5, 20), rng.integers(0, 5, 300),
                        None, k=10)
    assert calls and all(found is None for found in calls)
