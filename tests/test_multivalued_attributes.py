"""Multi-valued attributes end to end (DeepFashion's types: an image may be floral *and* striped),
on the generated ASEN-format fixture of fixtures_official.py: the labels every value of a type
gets, the sampler's groups, the losses' positives (shares a value) and the benchmark's relevance.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_jpeg
from fixtures_official import write_deepfashion_asen_multivalued
from fashion_retrieval.data.benchmarks import BENCHMARKS, encode_value_sets
from fashion_retrieval.data.images import ImageDataset, default_transform
from fashion_retrieval.data.labels import LabelSpace
from fashion_retrieval.data.readers import READERS
from fashion_retrieval.data.samplers import SAMPLERS, AttributeBatchSampler
from fashion_retrieval.data.table import Sample, SampleTable
from fashion_retrieval.losses import LOSSES
from fashion_retrieval.losses.attribute import _shared_value_triplets
from fashion_retrieval.metrics import evaluate_attribute_retrieval


@pytest.fixture
def train_table(tmp_path) -> SampleTable:
    write_deepfashion_asen_multivalued(tmp_path)
    return READERS.build("deepfashion_asen", root=tmp_path, split_dir="split").filter(split="train")


# ---- labels -----------------------------------------------------------------------------------

def test_every_value_of_a_multi_valued_type_is_a_label(train_table, tmp_path):
    labels = LabelSpace.from_table(train_table)
    assert labels.multi_label == ("texture", "style")
    assert labels.attributes["texture"] == ["value_12", "value_3", "value_7"]  # sorted names
    texture, offset = labels.attribute_index("texture"), labels.attribute_offsets[0]
    first = labels.encode(train_table[0])  # texture {3, 7}
    assert first["attr_multi_hot"][offset:offset + 3].tolist() == [0, 1, 1]
    assert first["attrs"][texture] == 1  # the single-label view keeps the lowest id
    per_attribute = labels.attribute_multi_hot(first["attr_multi_hot"], texture)
    assert per_attribute.shape == (labels.max_values,) and per_attribute.tolist()[:3] == [0, 1, 1]
    assert per_attribute[3:].sum() == 0
    # what a training batch carries: every value of the attribute the sample is embedded for
    for sample in train_table:
        write_jpeg(train_table.resolve(sample))
    dataset = ImageDataset(train_table, default_transform((16, 12)), labels)
    record = dataset[(1, texture)]  # texture {7, 12}
    assert record["attr_value"] == 0 and record["attr_value_multi_hot"].tolist()[:3] == [1, 0, 1]


# ---- sampler ----------------------------------------------------------------------------------

def test_the_attribute_sampler_puts_an_image_in_the_group_of_each_of_its_values(train_table):
    labels = LabelSpace.from_table(train_table)
    spec = SimpleNamespace(p=2, k=1)
    sampler = SAMPLERS.build("attribute", table=train_table, labels=labels, spec=spec, seed=0, rank=0, world_size=1)
    texture = labels.attribute_index("texture")
    # value_12: image 1; value_3: images 0 and 2; value_7: images 0 and 1
    assert sorted(sorted(group) for group in sampler.values[texture]) == [[0, 1], [0, 2], [1]]


def test_each_drawn_run_of_k_images_shares_the_drawn_value():
    rng = np.random.default_rng(4)
    value_sets = [tuple(sorted(set(rng.integers(0, 5, int(rng.integers(1, 3))).tolist()))) for _ in range(60)]
    lowest = np.array([[min(v)] for v in value_sets])
    sampler = AttributeBatchSampler(lowest, p=3, k=4, seed=1, multi_values={0: value_sets})
    groups = sampler.values[0]
    assert sum(map(len, groups)) == sum(map(len, value_sets))  # an image is in one group per value
    for batch in sampler:
        for start in range(0, len(batch), 4):
            run = [set(value_sets[i]) for i, _ in batch[start:start + 4]]
            assert set.intersection(*run), run
    with pytest.raises(ValueError, match=r"multi_values\[0\] must give the value ids of each of the 60 rows"):
        AttributeBatchSampler(lowest, p=3, k=4, multi_values={0: value_sets[:5]})


# ---- losses -----------------------------------------------------------------------------------

# one attribute; value sets {0, 1}, {1}, {0}, {2}: sample 0 shares a value with 1 and 2, sample 3
# with nobody; 1 and 2 share none (the lowest-id labels 0, 1, 0, 2 would call 0 and 1 negatives)
SETS = [[1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]]
POSITIVE_PAIRS = {(0, 1), (1, 0), (0, 2), (2, 0)}


def multi_valued_batch(embeddings: torch.Tensor) -> tuple[dict, dict]:
    multi_hot = torch.tensor(SETS, dtype=torch.float32)
    batch = {"attribute": torch.zeros(4, dtype=torch.long), "attr_value": multi_hot.argmax(1),
             "attr_value_multi_hot": multi_hot}
    return {"embedding": embeddings}, batch


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a[None], b[None]).detach())


def test_triplets_pair_images_that_share_a_value_against_images_that_share_none():
    embeddings = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    sets = torch.tensor(SETS, dtype=torch.float32)
    shares = (sets @ sets.t()) > 0
    anchors, positives, negatives = _shared_value_triplets(embeddings, shares, hardest=False)
    found = set(zip(anchors.tolist(), positives.tolist(), negatives.tolist()))
    expected = {(a, p, n) for a, p in POSITIVE_PAIRS for n in range(4) if not shares[a, n]}
    assert found == expected and (1, 0, 2) in found and (0, 1, 3) in found


@pytest.mark.parametrize("mining", ["all", "batch_hard"])
def test_the_triplet_loss_counts_a_shared_value_as_positive(mining):
    embeddings = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, -0.6], [0.0, 1.0]], requires_grad=True)
    outputs, batch = multi_valued_batch(embeddings)
    margin = 0.2
    loss = LOSSES.build("attribute_triplet", margin=margin, mining=mining)(outputs, batch)
    sims = [[_cosine(embeddings[i], embeddings[j]) for j in range(4)] for i in range(4)]
    shares = [[any(x and y for x, y in zip(SETS[i], SETS[j])) for j in range(4)] for i in range(4)]
    triplets = []
    for a in range(4):
        positives = [p for q, p in POSITIVE_PAIRS if q == a]
        negatives = [n for n in range(4) if not shares[a][n]]
        if mining == "batch_hard" and positives and negatives:  # farthest positive, closest negative
            positives = [min(positives, key=lambda p: sims[a][p])]
            negatives = [max(negatives, key=lambda n: sims[a][n])]
        triplets += [(a, p, n) for p in positives for n in negatives]
    hinges = [max(0.0, sims[a][n] - sims[a][p] + margin) for a, p, n in triplets]
    violated = [h for h in hinges if h > 0]
    assert violated  # the case is not trivially zero
    assert loss.item() == pytest.approx(sum(violated) / len(violated), rel=1e-5)
    loss.backward()
    assert torch.isfinite(embeddings.grad).all()


def test_the_weighted_bce_takes_every_value_as_a_positive():
    logits = torch.tensor([[2.0, -1.0, 0.5, -1e4], [0.3, 0.0, -2.0, 1.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    multi_hot = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    batch = {"attr_value": torch.tensor([0, 1]), "attr_value_multi_hot": multi_hot}
    loss = LOSSES.build("attribute_bce")({"attr_value_logits": logits, "attr_value_mask": mask}, batch)

    def softplus(x: float) -> float:
        return math.log1p(math.exp(x))

    # sample 0: 2 of 3 values positive, weight (3 - 2) / 2; sample 1: 1 of 4, weight 3
    slots = [0.5 * softplus(-2.0), softplus(-1.0), 0.5 * softplus(-0.5),
             softplus(0.3), 3 * softplus(0.0), softplus(-2.0), softplus(1.0)]
    assert loss.item() == pytest.approx(sum(slots) / 7, rel=1e-6)


def test_the_cluster_triplet_puts_a_multi_valued_image_in_each_of_its_classes():
    embeddings = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, -0.6], [0.0, 1.0]])
    outputs, batch = multi_valued_batch(embeddings)
    margin = 0.2
    loss = LOSSES.build("cluster_triplet", margin=margin)(outputs, batch)
    unit = F.normalize(embeddings, dim=1)
    members = torch.tensor(SETS, dtype=torch.float32)  # class v holds every image that has v
    centers = F.normalize(members.t() @ unit / members.sum(0)[:, None], dim=1)
    distance = 1 - unit @ centers.t()
    per_image = []
    for i, own in enumerate(SETS):
        nearest_other = min(float(distance[i, c]) for c in range(3) if not own[c])
        hinges = [max(0.0, float(distance[i, c]) - nearest_other + margin) for c in range(3) if own[c]]
        per_image.append(sum(hinges) / len(hinges))
    assert loss.item() == pytest.approx(sum(per_image) / 4, rel=1e-5) and loss.item() > 0


# ---- benchmark relevance ------------------------------------------------------------------------

def test_the_benchmark_counts_a_gallery_image_relevant_when_it_shares_a_value(tmp_path):
    write_deepfashion_asen_multivalued(tmp_path / "deepfashion_asen")
    bench = BENCHMARKS.build("deepfashion_asen", data_root=tmp_path, split="test")
    assert bench.attributes == ["texture", "style"]
    names = bench.values["texture"]
    assert names == ["value_12", "value_3", "value_7", "value_9"]
    # query Q: texture {3, 7}; gallery B {7, 12}, C {3}, D {9}
    assert bench.query_labels["texture"].tolist() == [[1, 2], [-1, -1]]
    assert bench.gallery_labels["texture"].tolist() == [[0, 2], [1, -1], [3, -1]]
    assert bench.relevant_counts("texture").tolist() == [2, 0]
    # query A: style {2}; gallery C {2}, D {2, 6}
    assert bench.relevant_counts("style").tolist() == [0, 2]
    assert bench.evaluable("texture").tolist() == [True, False]
    # the metrics rank by the embeddings and mark exactly the images sharing a value
    query = {"texture": np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32),
             "style": np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)}
    gallery = {"texture": np.array([[0.0, 1.0], [0.9, 0.1], [0.95, 0.0]], dtype=np.float32),  # D, C, then B
               "style": np.array([[1.0, 0.0], [0.2, 0.9], [0.0, 1.0]], dtype=np.float32)}
    results = evaluate_attribute_retrieval(query, gallery, bench.query_labels, bench.gallery_labels)
    texture, style = results["per_attribute"]["texture"], results["per_attribute"]["style"]
    # texture ranking of Q: D (irrelevant), C, B: AP = (1/2 + 2/3) / 2
    assert texture["queries_evaluated"] == 1 and texture["MAP@all"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert texture["top1"] == 0.0 and texture["top5"] == 1.0
    # style ranking of A: D, C first (both relevant), then B
    assert style["MAP@all"] == pytest.approx(1.0)


def test_value_sets_are_only_used_where_a_row_has_several_values():
    q, g, names = encode_value_sets(["a", None, ("b",)], [("a", "c"), "b"])
    assert names == ["a", "b", "c"]
    assert q.tolist() == [[0, -1], [-1, -1], [1, -1]] and g.tolist() == [[0, 2], [1, -1]]
    single_q, single_g, _ = encode_value_sets(["a", None, ("b",)], [("c",), "b", ()])
    assert single_q.tolist() == [0, -1, 1] and single_g.tolist() == [2, 1, -1]


def test_a_catalog_attribute_given_as_a_list_shares_a_value(tmp_path):
    rows = ["path,item_id,split,attributes",
            'a.jpg,1,test,"{""colour"": [""red"", ""white""]}"',
            'b.jpg,2,test,"{""colour"": ""white""}"',
            'c.jpg,3,test,"{""colour"": [""blue""]}"',
            'd.jpg,4,test,"{""colour"": [""red"", ""blue""]}"']
    (tmp_path / "shop.csv").write_text("\n".join(rows) + "\n")
    bench = BENCHMARKS.build("catalog", data_root=tmp_path, split="test", catalog="shop.csv", queries="all",
                             level="attribute")
    # a {red, white}: b (white), d (red); b: a; c {blue}: d; d {red, blue}: a, c
    assert bench.relevant_counts("colour").tolist() == [2, 1, 1, 2]


def test_a_sample_without_values_of_a_multi_valued_type_is_unlabelled():
    table = SampleTable([Sample("a.jpg", "a", attributes={"texture": ("x", "y")}),
                         Sample("b.jpg", "b", attributes={"texture": ()})], multi_label=["texture"])
    labels = LabelSpace.from_table(table)
    assert labels.value_id_sets(table, "texture") == [(0, 1), ()]
    assert labels.encode(table[1])["attrs"].tolist() == [-1]
