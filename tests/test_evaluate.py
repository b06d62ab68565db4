"""Embedding (skips bad images, normalised, same result in batch or one by one) and evaluation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_jpeg, write_truncated_jpeg
from test_checkpoint import TinyAttributeNet, TinyNet

from fashion_retrieval.data.table import Sample, SampleTable
from fashion_retrieval.engine.embed import embed_images, embed_table, embed_table_attributes


def _table(root: Path, count: int = 7, broken: tuple[int, ...] = (2,)) -> SampleTable:
    samples = []
    for i in range(count):
        path = root / f"img{i}.jpg"
        if i in broken:
            write_truncated_jpeg(path)
        else:
            write_jpeg(path, size=(30, 40), color=(30 * i % 256, 200 - 20 * i, 90))
        samples.append(Sample(path=path.name, item_id=str(i)))
    samples.append(Sample(path="missing.jpg", item_id="missing"))
    return SampleTable(samples, root=root)


def test_embed_table_skips_bad_images_and_matches_embed_images(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet(num_items=3)
    model.train()  # embedding must switch to eval (BN statistics, no dropout) and back
    table = _table(tmp_path)
    result = embed_table(model, table, (64, 48), batch_size=3, progress=False)
    assert model.training
    assert result.indices.tolist() == [0, 1, 3, 4, 5, 6]
    assert result.embeddings.shape == (6, 16) and result.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, rtol=1e-5)
    assert len(result.skipped) == 2
    assert any("missing.jpg" in s for s in result.skipped) and any("img2.jpg" in s for s in result.skipped)

    one_by_one = embed_images(model, [Image.open(tmp_path / f"img{i}.jpg") for i in result.indices], (64, 48))
    np.testing.assert_allclose(one_by_one, result.embeddings, atol=1e-5)


def test_embed_attribute_conditioned(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyAttributeNet(attribute_sizes=[2, 3])
    table = _table(tmp_path, count=4, broken=())
    both = embed_table_attributes(model, table, (32, 24), attributes=[0, 1], progress=False)
    for attribute in (0, 1):
        single = embed_table(model, table, (32, 24), attribute=attribute, progress=False)
        np.testing.assert_allclose(both.by_attribute[attribute], single.embeddings, atol=1e-6)
    assert not np.allclose(both.by_attribute[0], both.by_attribute[1])
    with pytest.raises(ValueError, match="attribute-conditioned"):
        embed_table(model, table, (32, 24), progress=False)


class _EmbedOnly(torch.nn.Module):
    """A wrapper with only ``embed`` (as scripts/m3_net_value_probe.py has): no embed_attributes."""

    attribute_conditioned = True

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def embed(self, images: torch.Tensor, attribute: int | None = None) -> torch.Tensor:
        return self.model.embed(images, attribute)


def test_embed_attribute_conditioned_wrapper_without_embed_attributes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyAttributeNet(attribute_sizes=[2, 3]).eval()
    table = _table(tmp_path, count=4, broken=())
    wrapped = embed_table_attributes(_EmbedOnly(model), table, (32, 24), attributes=[0, 1], progress=False,
                                     fold_norms=False)
    direct = embed_table_attributes(model, table, (32, 24), attributes=[0, 1], progress=False, fold_norms=False)
    for attribute in (0, 1):
        np.testing.assert_allclose(wrapped.by_attribute[attribute], direct.by_attribute[attribute], atol=1e-6)


# ---- evaluation ------------------------------------------------------------------------------
import csv
import json

from test_train import write_synthetic_viton

from fashion_retrieval.engine.checkpoint import save_for_inference
from fashion_retrieval.engine.evaluate import evaluate, load_npz, recompute_from_npz
from fashion_retrieval.models import MODELS

ATTRIBUTES = ["gender", "articleType", "baseColour", "season", "usage"]


def brute_force(query: np.ndarray, gallery: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                exclude_self: bool) -> dict[str, float]:
    """The metrics' definitions written out query by query, as an independent check."""
    hits = {k: [] for k in (1, 5, 10, 20, 50)}
    average_precisions, map100, recall100 = [], [], []
    for i in range(len(query)):
        if query_labels[i] < 0:
            continue
        scores = gallery @ query[i]
        order = [j for j in np.argsort(-scores, kind="stable") if not (exclude_self and j == i)]
        relevant = np.array([gallery_labels[j] == query_labels[i] and gallery_labels[j] >= 0 for j in order])
        if not relevant.any():
            continue
        for k in hits:
            hits[k].append(relevant[:k].any())
        ranks = np.flatnonzero(relevant) + 1
        average_precisions.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        head = ranks[ranks <= 100]
        map100.append(np.sum(np.arange(1, len(head) + 1) / head) / min(100, len(ranks)))
        recall100.append(len(head) / len(ranks))
    out = {f"top{k}": float(np.mean(v)) for k, v in hits.items()}
    out.update({"mAP": float(np.mean(average_precisions)), "MAP@all": float(np.mean(average_precisions)),
                "MAP@100": float(np.mean(map100)), "Recall@100": float(np.mean(recall100)),
                "queries": len(average_precisions)})
    return out


def _save_tiny(run: Path, name: str, kwargs: dict, meta: dict | None = None) -> None:
    torch.manual_seed(1)
    model = MODELS.build(name, **kwargs)
    save_for_inference(model, {"model": {"name": name, "kwargs": kwargs}, "image_size": [64, 48], **(meta or {})}, run)


def test_evaluate_instance_benchmark(tmp_path: Path) -> None:
    write_synthetic_viton(tmp_path / "data" / "viton", pairs=40, broken=(10,))
    _save_tiny(tmp_path / "run", "tiny_test_net", {"num_items": 3})
    evaluation = evaluate(tmp_path / "run", "viton_c2s", "test", tmp_path / "data", tmp_path / "out" / "viton.json",
                          plots_dir=tmp_path / "plots", device="cpu", num_workers=0, progress=False,
                          print_results=False)
    results = json.loads((tmp_path / "out" / "viton.json").read_text())
    assert results["benchmark"] == "viton_c2s" and results["kind"] == "instance" and results["split"] == "test"
    assert results["metric_names"] == ["top1", "top5", "top10", "top20", "top50", "mAP"]
    assert {"command", "hardware", "checkpoint", "counts", "skipped"} <= set(results)
    # 8 test pairs; pair 10's product photo is unreadable: 8 queries, 7 gallery images, 7 evaluable.
    assert results["counts"] == {"queries": 8, "gallery": 7, "skipped_images": 1}
    overall = results["metrics"]["overall"]
    assert overall["queries"] == 7 and set(results["metrics"]["per_attribute"]) == {"pair_id"}

    saved = load_npz(tmp_path / "out" / "viton.npz")
    expected = brute_force(saved["query"]["pair_id"], saved["gallery"]["pair_id"], saved["query_labels"]["pair_id"],
                           saved["gallery_labels"]["pair_id"], exclude_self=False)
    for name in results["metric_names"] + ["queries"]:
        assert overall[name] == pytest.approx(expected[name], abs=1e-9), name
    assert recompute_from_npz(tmp_path / "out" / "viton.npz") == results["metrics"]
    assert overall["top1"] < 1.0 and overall["top50"] == 1.0  # an untrained model is not perfect
    assert evaluation.results["metrics"] == results["metrics"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["top5_pair_id.png", "topk_accuracy.png"]


def _write_styles(root: Path, count: int = 60) -> None:
    rng = np.random.default_rng(3)
    values = {"gender": ["Men", "Women"], "articleType": ["Tshirts", "Jeans", "Dresses"],
              "baseColour": ["Red", "Blue", "Green"], "season": ["Summer", "Winter"], "usage": ["Casual", "Formal"]}
    palette = {"Red": (200, 30, 30), "Blue": (30, 30, 200), "Green": (30, 180, 30)}
    (root / "images").mkdir(parents=True)
    with open(root / "styles.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year",
                         "usage"])
        for number in range(count):
            row = {name: str(rng.choice(options)) for name, options in values.items()}
            if number == 15:
                row["season"] = ""  # a missing value: that query is not evaluated for season
            writer.writerow([number, row["gender"], "Apparel", "Topwear", row["articleType"], row["baseColour"],
                             row["season"], 2012, row["usage"]])
            write_jpeg(root / "images" / f"{number}.jpg", size=(48, 64), color=palette[row["baseColour"]])


@pytest.mark.parametrize("conditioned", [True, False])
def test_evaluate_attribute_benchmark(tmp_path: Path, conditioned: bool) -> None:
    _write_styles(tmp_path / "data" / "fashion-product")
    if conditioned:
        _save_tiny(tmp_path / "run", "tiny_test_attribute_net", {"attribute_sizes": [2, 3, 3, 2, 2]},
                   {"attributes": ATTRIBUTES[::-1]})  # the model's own attribute order differs from the benchmark's
    else:
        _save_tiny(tmp_path / "run", "tiny_test_net", {"num_items": 3})
    evaluate(tmp_path / "run", "fashion_product_attributes", "test", tmp_path / "data", tmp_path / "attr.json",
             device="cpu", num_workers=0, progress=False, print_results=False)
    results = json.loads((tmp_path / "attr.json").read_text())
    assert results["metric_names"] == ["MAP@all", "MAP@100", "Recall@100"]
    assert list(results["metrics"]["per_attribute"]) == ATTRIBUTES
    assert results["model"]["attribute_conditioned"] is conditioned

    saved = load_npz(tmp_path / "attr.npz")
    stored = [k for k in np.load(tmp_path / "attr.npz").files if k.startswith("query_embeddings__")]
    assert len(stored) == (5 if conditioned else 1)
    pooled = []
    for attribute in ATTRIBUTES:
        expected = brute_force(saved["query"][attribute], saved["gallery"][attribute], saved["query_labels"][attribute],
                               saved["gallery_labels"][attribute], exclude_self=True)
        got = results["metrics"]["per_attribute"][attribute]
        for name in ("MAP@all", "MAP@100", "Recall@100", "queries"):
            assert got[name] == pytest.approx(expected[name], abs=1e-9), (attribute, name)
        pooled.append((expected["MAP@all"], expected["queries"]))
    assert results["metrics"]["per_attribute"]["season"]["queries"] == 11  # 12 test images, one without season
    overall = sum(m * n for m, n in pooled) / sum(n for _, n in pooled)
    assert results["metrics"]["overall"]["MAP@all"] == pytest.approx(overall, abs=1e-9)
    assert results["metrics"]["mean_over_attributes"]["MAP@all"] == pytest.approx(np.mean([m for m, _ in pooled]))
    assert recompute_from_npz(tmp_path / "attr.npz") == results["metrics"]
    if conditioned:  # "gender" is attribute 4 of this model: its embedding must be the one stored
        from fashion_retrieval.data.benchmarks import BENCHMARKS
        from fashion_retrieval.engine.checkpoint import load_for_inference

        model, _ = load_for_inference(tmp_path / "run")
        queries = BENCHMARKS.build("fashion_product_attributes", data_root=tmp_path / "data", split="test").queries
        gender = embed_table(model, queries, (64, 48), attribute=4, progress=False).embeddings
        np.testing.assert_allclose(saved["query"]["gender"], gender, atol=1e-6)
        assert not np.allclose(saved["query"]["usage"], gender, atol=1e-3)
