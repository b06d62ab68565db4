"""How a smaller gallery moves the metrics (engine.evaluate.smaller_gallery_metrics): checked
against the hypergeometric law on a gallery whose ranks are known, and on a self-retrieval set."""
from __future__ import annotations

import json
from math import comb
from pathlib import Path

import numpy as np
import pytest

from fashion_retrieval.engine.evaluate import recompute_from_npz, smaller_gallery_metrics

ITEMS = 30  # one product photo per item, one consumer photo per item


def _instance_npz(path: Path) -> Path:
    """Query i ranks two other items (i+1, i+2) above its own product, every other item below it."""
    gallery = np.eye(ITEMS, dtype=np.float32)
    query = np.zeros((ITEMS, ITEMS), dtype=np.float32)
    for i in range(ITEMS):
        query[i, i] = 1.0
        query[i, (i + 1) % ITEMS] = query[i, (i + 2) % ITEMS] = 2.0
    labels = np.arange(ITEMS)
    np.savez(path, query_embeddings__pair_id=query / np.linalg.norm(query, axis=1, keepdims=True),
             gallery_embeddings__pair_id=gallery, query_labels__pair_id=labels, gallery_labels__pair_id=labels,
             exclude_self=np.array(False), kind=np.array("instance"),
             test_time=np.array(json.dumps({"flip": False, "query_expansion": None, "rerank": None})))
    return path


def test_the_full_gallery_gives_the_saved_metrics(tmp_path: Path):
    npz = _instance_npz(tmp_path / "eval.npz")
    (full,) = smaller_gallery_metrics(npz, [ITEMS], draws=5)
    assert full["draws"] == 1 and full["gallery"] == ITEMS
    assert full["mean"]["top1"] == 0.0 and full["mean"]["top5"] == 1.0
    assert full["mean"]["mAP"] == pytest.approx(recompute_from_npz(npz)["overall"]["mAP"])


def test_a_smaller_gallery_follows_the_hypergeometric_law(tmp_path: Path):
    npz = _instance_npz(tmp_path / "eval.npz")
    size = 10
    (curve,) = smaller_gallery_metrics(npz, [size], draws=400, seed=1)
    # Given its product was drawn, a query keeps X of its 2 distractors, X hypergeometric.
    draws_given_kept = comb(ITEMS - 1, size - 1)
    p = [comb(2, x) * comb(ITEMS - 3, size - 1 - x) / draws_given_kept for x in range(3)]
    assert curve["mean"]["top1"] == pytest.approx(p[0], abs=0.04)  # 0.468
    assert curve["mean"]["mAP"] == pytest.approx(p[0] + p[1] / 2 + p[2] / 3, abs=0.03)  # 0.719
    assert curve["mean"]["top5"] == 1.0 and curve["std"]["top5"] == 0.0
    assert curve["mean"]["queries"] == size  # the queries whose product left the gallery drop out


def test_self_retrieval_draws_the_queries_with_the_gallery(tmp_path: Path):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(40, 8)).astype(np.float32)
    labels = np.arange(40) % 4
    npz = tmp_path / "attributes.npz"
    np.savez(npz, query_embeddings__colour=embeddings, query_labels__colour=labels, gallery_labels__colour=labels,
             exclude_self=np.array(True), kind=np.array("attribute"),
             test_time=np.array(json.dumps({"flip": False, "query_expansion": None, "rerank": None})))
    half, full = smaller_gallery_metrics(npz, [20, 40], draws=3)
    assert half["mean"]["queries"] == 20 and full["mean"]["queries"] == 40
    with pytest.raises(ValueError, match="outside 1..40"):
        smaller_gallery_metrics(npz, [41])
