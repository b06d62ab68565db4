"""Attribute loss terms on hand-built embeddings and logits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fashion_retrieval.losses import LOSSES
from fashion_retrieval.registry import ConfigError


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def separated_batch():
    """Two attributes; within each, the two values sit on orthogonal axes (cosine distance 1), the
    two samples of a value almost coincide. Value ids are reused across attributes on *opposite*
    axes, so a loss that compared across attributes would see far positives and close negatives."""
    embeddings = torch.tensor([
        [1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.05, 1.0],  # attribute 0: values 0, 0, 1, 1
        [0.0, 1.0], [0.05, 1.0], [1.0, 0.0], [1.0, 0.05],  # attribute 1: values 0, 0, 1, 1
    ], requires_grad=True)
    batch = {"attribute": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
             "attr_value": torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])}
    return {"embedding": embeddings}, batch


def mixed_batch():
    """Both values have one sample on each axis: positives are as far as negatives."""
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    batch = {"attribute": torch.zeros(4, dtype=torch.long), "attr_value": torch.tensor([0, 0, 1, 1])}
    return {"embedding": embeddings}, batch


@pytest.mark.parametrize("mining", ["batch_hard", "all"])
def test_attribute_triplet_is_zero_when_every_positive_is_closer_by_the_margin(mining):
    outputs, batch = separated_batch()
    loss = LOSSES.build("attribute_triplet", margin=0.2, mining=mining)(outputs, batch)
    assert loss.item() == 0.0
    loss.backward()  # stays connected to the graph even when nothing violates the margin


@pytest.mark.parametrize("mining,expected", [
    # anchor (1,0), positive (0,1) at cosine similarity 0; negatives at similarity 1 and 0:
    # hinge 1 - 0 + 0.2 = 1.2 and 0 - 0 + 0.2 = 0.2, the same for every anchor by symmetry.
    ("all", (1.2 + 0.2) / 2),
    ("batch_hard", 1.2),
])
def test_attribute_triplet_matches_hand_values_when_violated(mining, expected):
    outputs, batch = mixed_batch()
    loss = LOSSES.build("attribute_triplet", margin=0.2, mining=mining, reduction="mean")(outputs, batch)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert outputs["embedding"].grad.abs().sum() > 0


def test_attribute_triplet_prefers_features_and_skips_groups_without_negatives():
    outputs, batch = mixed_batch()
    single_value = {"attribute": batch["attribute"], "attr_value": torch.zeros(4, dtype=torch.long)}
    term = LOSSES.build("attribute_triplet")
    assert term(outputs, single_value).item() == 0.0
    separated, _ = separated_batch()
    # "features" wins over "embedding": the separated features give zero although "embedding" would not.
    both = {"embedding": outputs["embedding"], "features": separated["embedding"][:4]}
    assert term(both, {"attribute": torch.zeros(4, dtype=torch.long),
                       "attr_value": torch.tensor([0, 0, 1, 1])}).item() == 0.0


def test_cluster_triplet_batch_centers_zero_and_positive():
    term = LOSSES.build("cluster_triplet", margin=0.2)
    outputs, batch = separated_batch()
    assert term(outputs, batch).item() == 0.0
    outputs, batch = mixed_batch()
    # Both class centers are the normalised mean of (1,0) and (0,1): own and other distances are
    # equal, so every sample pays exactly the margin.
    loss = term(outputs, batch)
    assert loss.item() == pytest.approx(0.2, abs=1e-6)


def test_cluster_triplet_batch_centers_hand_value():
    embeddings = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], requires_grad=True)
    batch = {"attribute": torch.zeros(3, dtype=torch.long), "attr_value": torch.tensor([0, 0, 1])}
    loss = LOSSES.build("cluster_triplet", margin=0.5)({"embedding": embeddings}, batch)
    center0 = F.normalize(torch.tensor([0.8, 0.4]), dim=0)
    center1 = torch.tensor([0.0, 1.0])
    expected = 0.0
    for e, own, other in [(embeddings[0], center0, center1), (embeddings[1], center0, center1),
                          (embeddings[2], center1, center0)]:
        expected += max(0.0, (1 - e @ own).item() - (1 - e @ other).item() + 0.5)
    assert loss.item() == pytest.approx(expected / 3, abs=1e-5)
    assert loss.item() > 0
    loss.backward()
    assert embeddings.grad.abs().sum() > 0


def test_cluster_triplet_ema_centers_persist_and_move_with_momentum():
    term = LOSSES.build("cluster_triplet", margin=0.2, centers="ema", momentum=0.9,
                        attribute_sizes=[2, 2], feat_dim=2)
    outputs, batch = separated_batch()
    assert term(outputs, batch).item() == 0.0
    assert term.initialised.all()
    before = term.centers.clone()
    # Now a batch of attribute 0 only, where value 0 sits on value 1's stored center: the stored
    # centers make this a violation although the batch alone has just one class per value.
    flipped = {"embedding": torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])}
    flipped_batch = {"attribute": torch.zeros(4, dtype=torch.long), "attr_value": torch.tensor([0, 0, 1, 1])}
    assert term(flipped, flipped_batch).item() > 0.2
    torch.testing.assert_close(term.centers[0, 0], 0.9 * before[0, 0] + 0.1 * torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(term.centers[1], before[1])  # attribute 1 was not in the batch


def test_cluster_triplet_ema_needs_sizes():
    with pytest.raises(ConfigError, match="feat_dim"):
        LOSSES.build("cluster_triplet", centers="ema")


def test_attribute_bce_matches_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 1.0, -1e4], [3.0, 3.0, -1e4]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, False]])
    batch = {"attr_value": torch.tensor([0, 1, -1])}  # third sample: value unknown, ignored
    outputs = {"attr_value_logits": logits, "attr_value_mask": mask}
    # Default positive weight = number of values - 1: 2 for the first sample, 1 for the second.
    slots = [2 * softplus(-2.0), softplus(-1.0), softplus(0.0),  # sample 0: value 0 positive
             softplus(0.5), 1 * softplus(-1.0)]                   # sample 1: value 1 positive
    loss = LOSSES.build("attribute_bce")(outputs, batch)
    assert loss.item() == pytest.approx(sum(slots) / 5, rel=1e-6)
    fixed = LOSSES.build("attribute_bce", pos_weight=1.0)(outputs, batch)
    plain = [softplus(-2.0), softplus(-1.0), softplus(0.0), softplus(0.5), softplus(-1.0)]
    assert fixed.item() == pytest.approx(sum(plain) / 5, rel=1e-6)


def test_attribute_bce_every_attribute_sums_each_attributes_own_bce():
    head0 = torch.tensor([[2.0, -1.0], [0.5, 1.0], [0.0, 3.0]])
    head1 = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, -2.0], [0.0, 0.0, 3.0]])
    attrs = torch.tensor([[0, 2], [-1, 0], [1, -1]])  # sample 1 lacks attribute 0, sample 2 attribute 1
    term = LOSSES.build("attribute_bce", every_attribute=True)
    loss = term({"all_attr_logits": [head0, head1]}, {"attrs": attrs})
    # attribute 0 (2 values, weight 1): samples 0 and 2; attribute 1 (3 values, weight 2): samples 0 and 1
    attr0 = [softplus(-2.0), softplus(-1.0), softplus(0.0), softplus(-3.0)]
    attr1 = [softplus(0.0), softplus(1.0), 2 * softplus(-2.0), 2 * softplus(-1.0), softplus(0.0), softplus(-2.0)]
    assert loss.item() == pytest.approx(sum(attr0) / 4 + sum(attr1) / 6, rel=1e-6)
    # with the flat multi-hot, a second value of attribute 1 on sample 0 is a positive too (weight 1/2)
    multi_hot = torch.tensor([[1, 0, 1, 0, 1], [0, 0, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.float32)
    loss = term({"all_attr_logits": [head0, head1]}, {"attrs": attrs, "attr_multi_hot": multi_hot})
    attr1 = [0.5 * softplus(-0.0), softplus(1.0), 0.5 * softplus(-2.0), 2 * softplus(-1.0), softplus(0.0), softplus(-2.0)]
    assert loss.item() == pytest.approx(sum(attr0) / 4 + sum(attr1) / 6, rel=1e-6)


def test_attribute_bce_every_attribute_names_the_model_switch():
    with pytest.raises(ConfigError, match="classify_every_attribute"):
        LOSSES.build("attribute_bce", every_attribute=True)({"attr_value_logits": torch.zeros(2, 2)},
                                                           {"attrs": torch.zeros(2, 1, dtype=torch.long)})


def test_multihead_ce_sums_heads_and_ignores_missing():
    head0 = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    head1 = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    head2 = torch.zeros(3, 2)
    attrs = torch.tensor([[0, 2, -1], [-1, 0, -1], [1, -1, -1]])  # attribute 2 unlabelled everywhere
    outputs = {"all_attr_logits": [head0, head1, head2]}

    def ce(logits, target):
        return -torch.log_softmax(logits, 0)[target].item()

    expected0 = (ce(head0[0], 0) + ce(head0[2], 1)) / 2
    expected1 = (ce(head1[0], 2) + ce(head1[1], 0)) / 2
    total = LOSSES.build("multihead_ce")(outputs, {"attrs": attrs})
    assert total.item() == pytest.approx(expected0 + expected1, rel=1e-6)
    mean = LOSSES.build("multihead_ce", reduction="mean")(outputs, {"attrs": attrs})
    assert mean.item() == pytest.approx((expected0 + expected1) / 2, rel=1e-6)


def test_attribute_ce_is_the_softmax_cross_entropy_of_the_batch_attribute():
    from fashion_retrieval.models.attention import PADDED_LOGIT

    logits = torch.tensor([[2.0, 0.0, PADDED_LOGIT], [0.0, 1.0, 0.5], [1.0, 1.0, 0.0]])
    outputs = {"attr_value_logits": logits}
    batch = {"attr_value": torch.tensor([0, 2, -1])}

    def log_p(row, value):
        return torch.log_softmax(logits[row], 0)[value].item()

    loss = LOSSES.build("attribute_ce")(outputs, batch)
    assert loss.item() == pytest.approx(-(log_p(0, 0) + log_p(1, 2)) / 2, rel=1e-6)
    assert torch.log_softmax(logits[0], 0)[2].exp().item() == 0.0  # a padded slot gets no probability
    multi = {"attr_value": torch.tensor([0, 1, -1]),
             "attr_value_multi_hot": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])}
    both = LOSSES.build("attribute_ce")(outputs, multi)
    assert both.item() == pytest.approx((-log_p(0, 0) - (log_p(1, 1) + log_p(1, 2)) / 2) / 2, rel=1e-6)
    assert LOSSES.build("attribute_ce")(outputs, {"attr_value": torch.tensor([-1, -1, -1])}).item() == 0.0


def test_multihead_ce_trains_a_multi_label_attribute_towards_all_its_values():
    head0 = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [1.0, 1.0, 0.0]])
    head1 = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.3, 0.0]])
    attrs = torch.tensor([[0, 1], [1, 0], [-1, 0]])  # the lowest value of each, as LabelSpace.encode keeps
    multi_hot = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0],  # image 0 has values 0 and 2 of attribute 0
                              [0.0, 1.0, 0.0, 1.0, 0.0],
                              [0.0, 0.0, 0.0, 1.0, 0.0]])  # attribute 0 missing
    outputs = {"all_attr_logits": [head0, head1]}
    loss = LOSSES.build("multihead_ce")(outputs, {"attrs": attrs, "attr_multi_hot": multi_hot})

    def log_p(logits, value):
        return torch.log_softmax(logits, 0)[value].item()

    expected0 = (-(log_p(head0[0], 0) + log_p(head0[0], 2)) / 2 - log_p(head0[1], 1)) / 2
    expected1 = -(log_p(head1[0], 1) + log_p(head1[1], 0) + log_p(head1[2], 0)) / 3
    assert loss.item() == pytest.approx(expected0 + expected1, rel=1e-6)
    # one value per image: the multi-hot changes nothing
    single = multi_hot.clone()
    single[0, 2] = 0.0
    with_single = LOSSES.build("multihead_ce")(outputs, {"attrs": attrs, "attr_multi_hot": single})
    assert with_single.item() == pytest.approx(LOSSES.build("multihead_ce")(outputs, {"attrs": attrs}).item(), rel=1e-6)
    with pytest.raises(ValueError, match="attr_multi_hot has 4 values"):
        LOSSES.build("multihead_ce")(outputs, {"attrs": attrs, "attr_multi_hot": multi_hot[:, :4]})


@pytest.mark.parametrize("name,kwargs,word", [
    ("attribute_triplet", {"margn": 0.1}, "margn"),
    ("attribute_triplet", {"mining": "semi"}, "semi"),
    ("cluster_triplet", {"centres": "batch"}, "centres"),
    ("attribute_bce", {"pos_weight": -1.0}, "pos_weight"),
    ("multihead_ce", {"reduction": "max"}, "max"),
])
def test_bad_loss_config_is_named(name, kwargs, word):
    with pytest.raises(ConfigError, match=word):
        LOSSES.build(name, **kwargs)
