"""Attribute-conditioned models: ASEN (+ ASEN++ local branch), M3-Net ablations, classifier baseline."""
from __future__ import annotations

import math

import pytest
import torch

from fashion_retrieval.losses import LOSSES
from fashion_retrieval.models import MODELS
from fashion_retrieval.models.asen import attention_box
from fashion_retrieval.models.attention import PADDED_LOGIT, AttributeSpatialAttention
from fashion_retrieval.registry import ConfigError
from conftest import TEST_THREADS

SIZES = [3, 5]
SMALL = {"embedding_dim": 32, "attr_dim": 16, "joint_dim": 16}
VARIANTS = {
    "asen": ("asen", SMALL),
    "asen_local": ("asen", {**SMALL, "local_branch": True}),
    "asen_authors": ("asen", {**SMALL, "attention_stage": "c4", "spatial_tanh": True}),
    "m3_attribute": ("m3_net", {**SMALL, "attention": "attribute"}),
    "m3_class": ("m3_net", {**SMALL, "attention": "class"}),
    "m3_both": ("m3_net", {**SMALL, "attention": "both"}),
    "classifier_softmax": ("attribute_classifier", {"embedding": "softmax"}),
    "classifier_penultimate": ("attribute_classifier", {"embedding": "penultimate"}),
}
HAS_VALUE_CLASSIFIER = {"m3_attribute", "m3_class", "m3_both", "classifier_softmax", "classifier_penultimate"}


@pytest.fixture(autouse=True)
def _small_cpu():
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def build(variant: str, sizes: list[int] = SIZES):
    name, kwargs = VARIANTS[variant]
    return MODELS.build(name, num_items=7, attribute_sizes=sizes, **kwargs)


def images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 64, 48)


def test_models_are_registered():
    assert {"asen", "m3_net", "attribute_classifier"} <= set(MODELS.names())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_output_shapes_and_masks(variant):
    model = build(variant)
    assert model.attribute_conditioned is True
    attribute = torch.tensor([0, 1, 0, 1])
    outputs = model.train()(images(), attribute)
    assert outputs["embedding"].shape == (4, model.feat_dim)
    assert outputs["features"].shape[0] == 4
    if variant in HAS_VALUE_CLASSIFIER:
        logits, mask = outputs["attr_value_logits"], outputs["attr_value_mask"]
        assert logits.shape == mask.shape == (4, max(SIZES))
        assert mask.dtype == torch.bool
        assert mask.sum(1).tolist() == [3, 5, 3, 5]
        assert (logits[~mask] == PADDED_LOGIT).all()
    else:
        assert "attr_value_logits" not in outputs

    evaluated = model.eval()(images(), attribute)
    assert set(evaluated) == {"embedding"}  # training-only keys stay out of inference
    assert evaluated["embedding"].shape == (4, model.feat_dim)


def test_feat_dims_follow_the_documented_rules():
    assert build("asen").feat_dim == 32
    assert build("asen_local").feat_dim == 64  # [normalised global, normalised local]
    assert build("m3_both").feat_dim == 32
    assert build("classifier_softmax").feat_dim == max(SIZES)
    assert build("classifier_penultimate").feat_dim == 512  # resnet18 C5 channels


@pytest.mark.parametrize("variant", ["asen", "asen_local", "m3_attribute", "m3_class", "m3_both", "classifier_softmax"])
def test_embedding_depends_on_the_attribute(variant):
    model = build(variant).eval()
    x = images()
    with torch.no_grad():
        for_attr0 = model(x, torch.zeros(4, dtype=torch.long))["embedding"]
        for_attr1 = model(x, torch.ones(4, dtype=torch.long))["embedding"]
        mixed = model(x, torch.tensor([0, 1, 1, 0]))["embedding"]
    assert not torch.allclose(for_attr0, for_attr1, atol=1e-4)
    # Each sample is conditioned on its own attribute, independently of the rest of the batch.
    expected = torch.stack([for_attr0[0], for_attr1[1], for_attr1[2], for_attr0[3]])
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-4)


SHARED_BACKBONE = set(VARIANTS) - {"asen_local"}  # ASEN++ crops per attribute


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_embed_attributes_matches_embed_and_shares_the_backbone(variant):
    model = build(variant).eval()
    backbone_calls = []
    for backbone in model.backbones():
        backbone.register_forward_hook(lambda *_: backbone_calls.append(1))
    x = images()
    with torch.no_grad():
        one_by_one = [model.embed(x, attribute) for attribute in (1, 0, 1)]
        calls_one_by_one = len(backbone_calls)
        together = model.embed_attributes(x, [1, 0, 1])
    for expected, got in zip(one_by_one, together, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    if variant in SHARED_BACKBONE:  # the attribute is read after the backbone: one pass for all three
        assert len(backbone_calls) - calls_one_by_one == 1
    else:
        assert len(backbone_calls) - calls_one_by_one == calls_one_by_one


def test_penultimate_classifier_embedding_is_shared_across_attributes():
    model = build("classifier_penultimate").eval()
    x = images()
    with torch.no_grad():
        a = model(x, torch.zeros(4, dtype=torch.long))["embedding"]
        b = model(x, torch.ones(4, dtype=torch.long))["embedding"]
    torch.testing.assert_close(a, b)


def test_softmax_classifier_embedding_is_zero_padded_probabilities():
    model = build("classifier_softmax").eval()
    with torch.no_grad():
        embedding = model(images(), torch.tensor([0, 1, 0, 1]))["embedding"]
    torch.testing.assert_close(embedding.sum(1), torch.ones(4))
    assert (embedding[[0, 2], 3:] == 0).all()  # attribute 0 has 3 values


def test_classifier_returns_every_head_for_multihead_training():
    model = build("classifier_softmax").train()
    outputs = model(images(), torch.tensor([0, 1, 0, 1]))
    assert [tuple(t.shape) for t in outputs["all_attr_logits"]] == [(4, 3), (4, 5)]
    torch.testing.assert_close(outputs["attr_value_logits"][1], outputs["all_attr_logits"][1][1])


@pytest.mark.parametrize("variant", ["m3_attribute", "m3_class", "m3_both"])
def test_m3_net_classifies_every_attribute_when_asked(variant):
    name, kwargs = VARIANTS[variant]
    model = MODELS.build(name, attribute_sizes=SIZES, classify_every_attribute=True, **kwargs).train()
    batch, attribute = images(), torch.tensor([0, 1, 1, 0])
    outputs = model(batch, attribute)
    every = outputs["all_attr_logits"]
    assert [tuple(t.shape) for t in every] == [(4, 3), (4, 5)]
    # each image's own attribute: the same logits the batch's Loss 1 reads
    for row, attr in enumerate(attribute.tolist()):
        torch.testing.assert_close(every[attr][row], outputs["attr_value_logits"][row, :SIZES[attr]])
    every[0].sum().backward()  # the other attribute's logits train the shared layers too
    assert model.value_classifier.weight.grad[0].abs().sum() > 0
    assert "all_attr_logits" not in build(variant).train()(batch, attribute)  # off by default
    assert "all_attr_logits" not in model.eval()(batch, attribute)


def test_attribute_is_required_and_a_scalar_is_broadcast():
    model = build("asen").eval()
    with pytest.raises(ValueError, match="attribute"):
        model(images())
    with torch.no_grad():
        scalar = model(images(2), torch.tensor(1))["embedding"]
    assert scalar.shape == (2, 32)


@pytest.mark.parametrize("variant", ["asen", "asen_local", "asen_authors", "m3_attribute", "m3_class", "m3_both",
                                     "classifier_softmax"])
def test_gradients_reach_every_parameter(variant):
    model = build(variant).train()
    outputs = model(images(), torch.tensor([0, 1, 0, 1]))
    loss = outputs["embedding"].pow(2).mean()
    if "attr_value_logits" in outputs:
        loss = loss + outputs["attr_value_logits"][outputs["attr_value_mask"]].sum()
    for logits in outputs.get("all_attr_logits", []):
        loss = loss + logits.sum()
    loss.backward()
    # A spatial attention without tanh adds its score bias to every location before the softmax,
    # which is shift-invariant: that bias gets no gradient by construction (only rounding noise).
    inert = {f"{name}.score.bias" for name, m in model.named_modules()
             if isinstance(m, AttributeSpatialAttention) and not m.score_tanh}
    for name, p in model.named_parameters():
        if name in inert:
            assert p.grad is None or p.grad.abs().max() < 1e-6, name
    dead = [name for name, p in model.named_parameters()
            if name not in inert and (p.grad is None or p.grad.abs().sum() == 0)]
    assert dead == []
    names = {name.split(".")[0] for name, _ in model.named_parameters()}
    expected = {
        "asen": {"global_branch"},
        "asen_local": {"global_branch", "local_branch"},
        "asen_authors": {"global_branch"},  # no backbone stage after C4 is left without gradient
        "m3_attribute": {"backbone", "attribute_embedding", "attribute_attention", "value_classifier", "fc"},
        "m3_class": {"backbone", "class_attention", "class_prototypes", "value_classifier", "fc"},  # class alone
        "m3_both": {"backbone", "attribute_embedding", "attribute_attention", "class_attention", "class_prototypes",
                    "value_classifier", "fc"},
        "classifier_softmax": {"backbone", "heads"},
    }[variant]
    assert names == expected  # each ablation builds exactly its parts, so "every parameter" means those


@pytest.mark.parametrize("variant", ["m3_class", "m3_both"])
def test_class_condition_mixes_prototypes_by_normalised_sigmoids(variant):
    # The value classifier is trained with independent sigmoids (attribute_bce), so the mixture is
    # sigma(z_v) / sum_u sigma(z_u) over the attribute's values, not a softmax of the same logits;
    # M3-Net_c conditions on that class mixture alone, M3-Net adds the attribute embedding.
    model = build(variant).train()
    bias = torch.tensor([[2.0, -1.0, 0.5, 9.0, 9.0], [1.0, 3.0, -2.0, 0.0, -4.0]])  # attribute 0 has 3 values
    with torch.no_grad():
        model.value_classifier.weight.zero_()
        model.value_classifier.bias.copy_(bias)
    conditions = []
    model.class_attention[0].register_forward_hook(lambda module, args, output: conditions.append(args[1]))
    attribute = torch.tensor([0, 1, 0, 1])
    model(images(), attribute)

    valid = torch.arange(5)[None, :] < torch.tensor(SIZES)[attribute][:, None]
    sigmoids = torch.sigmoid(bias[attribute]) * valid
    weights = sigmoids / sigmoids.sum(1, keepdim=True)
    expected = torch.einsum("bv,bvd->bd", weights, model.class_prototypes[attribute])
    if variant == "m3_both":
        expected = expected + model.attribute_embedding(attribute)
    else:
        assert model.attribute_embedding is None
    torch.testing.assert_close(conditions[0], expected)
    softmax = bias[attribute].masked_fill(~valid, float("-inf")).softmax(1)
    assert not torch.allclose(softmax, weights, atol=1e-3)  # the two readings really differ here


def test_asen_branch_has_both_attentions_and_the_attribute_embedding():
    names = [name for name, _ in build("asen").global_branch.named_parameters()]
    for part in ["backbone.", "attribute_embedding.", "attention.spatial.", "attention.channel.", "fc."]:
        assert any(name.startswith(part) for name in names), part


@pytest.mark.parametrize("backbone, channels", [("resnet18", 256), ("efficientnet_lite0", 112)])
def test_asen_authors_variant_attends_over_c4(backbone, channels):
    model = MODELS.build("asen", attribute_sizes=SIZES, backbone=backbone, attention_stage="c4", spatial_tanh=True,
                         **SMALL).train()
    branch = model.global_branch
    assert branch.backbone.channels == branch.backbone.channels[:3] and branch.backbone.channels[-1] == channels
    assert branch.attention.spatial.image_proj.in_channels == channels
    _, attention = branch(images(2), torch.tensor([0, 1]))
    assert attention.shape == (2, 64 // 16, 48 // 16)  # stride 16, as the authors' 14x14 at 224 px
    assert model(images(2), torch.tensor([0, 1]))["embedding"].shape == (2, 32)
    default = build("asen").global_branch
    assert default.backbone.channels[-1] == 512 and default.attention.spatial.score_tanh is False


def test_spatial_tanh_squashes_the_scores_before_the_softmax():
    from fashion_retrieval.models.attention import AttributeSpatialAttention

    feature_map, condition = torch.randn(2, 8, 4, 3), torch.randn(2, 6)
    ratios = {}
    for squash in (False, True):
        torch.manual_seed(1)
        spatial = AttributeSpatialAttention(8, 6, joint_dim=5, score_tanh=squash)
        with torch.no_grad():
            spatial.score.weight.mul_(100.0)  # scores far beyond [-1, 1]
            raw = spatial.score(torch.tanh(spatial.image_proj(feature_map))
                                * torch.tanh(spatial.cond_proj(condition))[:, :, None, None]).flatten(1)
            _, weights = spatial(feature_map, condition)
        expected = (torch.tanh(raw) if squash else raw).softmax(1)
        torch.testing.assert_close(weights.flatten(1), expected)
        ratios[squash] = float((weights.flatten(1).max(1).values / weights.flatten(1).min(1).values).max())
    assert ratios[True] <= math.e ** 2 + 1e-4 < ratios[False]  # tanh bounds the weight ratio by e^2


def test_attention_box_covers_the_attended_cells():
    attention = torch.full((1, 2, 4), 0.02)
    attention[0, 1, 2] = 1 - 0.02 * 7  # one dominant cell: row 1, column 2
    box = attention_box(attention, image_size=(64, 48), threshold=1.0)
    torch.testing.assert_close(box, torch.tensor([[24.0, 32.0, 36.0, 64.0]]))
    uniform = torch.full((1, 2, 4), 1 / 8)
    full = attention_box(uniform, image_size=(64, 48), threshold=2.0)  # capped at the max: never empty
    torch.testing.assert_close(full, torch.tensor([[0.0, 0.0, 48.0, 64.0]]))


def _overfit(model, terms, max_steps: int = 40) -> list[float]:
    torch.manual_seed(1)
    x = torch.rand(32, 3, 64, 48)
    attribute = torch.arange(32) // 16  # 2 attributes × 4 values × 4 images
    batch = {"attribute": attribute, "attr_value": (torch.arange(32) % 16) // 4}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history: list[float] = []
    model.train()
    for _ in range(max_steps):
        outputs = model(x, attribute)
        loss = sum(term(outputs, batch) for term in terms)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        if len(history) >= 3 and max(history[-3:]) < history[0] / 10:
            break  # three steps in a row at least 10× lower: converged, save the time budget
    return history


@pytest.mark.parametrize("variant,terms", [
    ("asen", lambda: [LOSSES.build("attribute_triplet", mining="all", reduction="mean")]),
    ("m3_both", lambda: [LOSSES.build("attribute_bce"),
                         LOSSES.build("attribute_triplet", mining="all", reduction="mean")]),
])
def test_tiny_model_overfits_a_fixed_batch(variant, terms):
    name, kwargs = VARIANTS[variant]
    model = MODELS.build(name, num_items=1, attribute_sizes=[4, 4], **kwargs)
    history = _overfit(model, terms())
    assert history[0] > 0
    assert max(history[-3:]) < history[0] / 10, history


@pytest.mark.parametrize("name", ["asen", "m3_net", "attribute_classifier"])
def test_misspelled_key_is_named(name):
    with pytest.raises(ConfigError, match="backbon"):
        MODELS.build(name, num_items=3, attribute_sizes=SIZES, backbon="resnet18")


@pytest.mark.parametrize("name,kwargs,word", [
    ("m3_net", {"attention": "channel"}, "channel"),
    ("m3_net", {"levels": ["c6"]}, "c6"),
    ("attribute_classifier", {"embedding": "logits"}, "logits"),
    ("asen", {"backbone": "resnet19"}, "resnet19"),
])
def test_bad_values_are_named(name, kwargs, word):
    with pytest.raises(ConfigError, match=word):
        MODELS.build(name, num_items=3, attribute_sizes=SIZES, **kwargs)


def test_empty_attribute_sizes_fail_clearly():
    with pytest.raises(ConfigError, match="attribute_sizes"):
        MODELS.build("asen", num_items=3, attribute_sizes=[])
