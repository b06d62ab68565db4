"""Metric, margin-softmax and objective loss terms against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from fashion_retrieval.losses import LOSSES
from fashion_retrieval.losses.objective import Objective, build_objective
from fashion_retrieval.registry import ConfigError


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def points(*xs: float) -> torch.Tensor:
    """1-D positions as 2-D embeddings on the x axis, so Euclidean distances are |x_i - x_j|."""
    return torch.tensor([[x, 0.0] for x in xs], requires_grad=True)


ITEMS = torch.tensor([0, 0, 1, 1])
# Items 0 at x=0, 2 and item 1 at x=1, 5. Per anchor (hardest positive, hardest negative):
# x=0: (2, 1)   x=2: (2, 1)   x=1: (4, 1)   x=5: (4, 3)
MIXED = (0.0, 2.0, 1.0, 5.0)
# Each item's two samples 1 apart, the items 10 apart: every positive is closer by 9.
SEPARATED = (0.0, 1.0, 10.0, 11.0)


# --- trihard -------------------------------------------------------------------------------

def test_trihard_is_zero_when_every_positive_is_closer_by_the_margin():
    embeddings = points(*SEPARATED)
    loss = LOSSES.build("trihard", margin=0.3)({"features": embeddings}, {"item": ITEMS})
    assert loss.item() == 0.0
    loss.backward()  # still connected to the graph


def test_trihard_hand_value_hinge_and_soft_margin():
    outputs, batch = {"features": points(*MIXED)}, {"item": ITEMS}
    hinge = LOSSES.build("trihard", margin=0.5)(outputs, batch)
    # [d_ap - d_an + 0.5]_+ = 1.5, 1.5, 3.5, 1.5
    assert hinge.item() == pytest.approx((1.5 + 1.5 + 3.5 + 1.5) / 4, abs=1e-6)
    soft = LOSSES.build("trihard", soft_margin=True)(outputs, batch)  # margin defaults to 0 here
    assert soft.item() == pytest.approx((3 * softplus(1.0) + softplus(3.0)) / 4, abs=1e-6)
    hinge.backward()
    assert outputs["features"].grad.abs().sum() > 0


def test_trihard_normalize_uses_unit_vectors():
    # Normalised: items 0 = {e1, e2}, 1 = {e1, e2}; every anchor has d_ap = sqrt(2), d_an = 0.
    embeddings = torch.tensor([[2.0, 0.0], [0.0, 3.0], [5.0, 0.0], [0.0, 0.5]])
    loss = LOSSES.build("trihard", margin=0.1, normalize=True)({"features": embeddings}, {"item": ITEMS})
    assert loss.item() == pytest.approx(math.sqrt(2) + 0.1, abs=1e-6)


def test_trihard_averages_over_anchors_that_have_a_positive_and_over_branches():
    # The lone sample of item 1 has no positive and is left out: (1-10+9.5 + 1-9+9.5) / 2.
    lone = {"features": points(0.0, 1.0, 10.0)}
    assert LOSSES.build("trihard", margin=9.5)(lone, {"item": torch.tensor([0, 0, 1])}).item() == pytest.approx(1.0)
    branches = {"branch_features": [points(*MIXED), points(*SEPARATED)]}
    term = LOSSES.build("trihard", margin=0.5, input="branch_features")
    assert term(branches, {"item": ITEMS}).item() == pytest.approx((2.0 + 0.0) / 2, abs=1e-6)
    one = LOSSES.build("trihard", margin=0.5, input="branch_features.1")
    assert one(branches, {"item": ITEMS}).item() == 0.0


# --- improved trihard ----------------------------------------------------------------------

def test_improved_trihard_zero_only_when_positives_are_also_within_the_threshold():
    outputs, batch = {"features": points(*SEPARATED)}, {"item": ITEMS}
    # threshold_scale absolute: tau is a distance, which these hand values are about
    compact = LOSSES.build("improved_trihard", margin=0.3, positive_threshold=1.5, positive_weight=0.5,
                           threshold_scale="absolute")
    assert compact(outputs, batch).item() == 0.0
    # Ranked correctly but every hardest positive is at 1 > 0.5: 0.5 * (1 - 0.5) per anchor.
    strict = LOSSES.build("improved_trihard", margin=0.3, positive_threshold=0.5, positive_weight=0.5,
                          threshold_scale="absolute")
    loss = strict(outputs, batch)
    assert loss.item() == pytest.approx(0.25, abs=1e-6)
    loss.backward()
    # d(x0, x1) enters via anchors 0 and 1, each with weight 0.5 / 4: d/dx0 = -0.25, so a descent
    # step moves x0 towards x1 (the compactness term pulls the pair together).
    grad = outputs["features"].grad[:, 0]
    assert grad[:2].tolist() == pytest.approx([-0.25, 0.25], abs=1e-6)


def test_improved_trihard_hand_value_and_reduction_to_trihard():
    outputs, batch = {"features": points(*MIXED)}, {"item": ITEMS}
    term = LOSSES.build("improved_trihard", margin=0.5, positive_threshold=1.0, positive_weight=0.5,
                        threshold_scale="absolute")
    # ranking part 2.0 as for trihard; compactness [d_ap - 1]_+ = 1, 1, 3, 3 -> mean 2, times 0.5
    assert term(outputs, batch).item() == pytest.approx(2.0 + 1.0, abs=1e-6)
    plain = LOSSES.build("improved_trihard", margin=0.5, positive_weight=0.0)(outputs, batch)
    assert plain.item() == pytest.approx(LOSSES.build("trihard", margin=0.5)(outputs, batch).item(), abs=1e-6)


def test_improved_trihard_threshold_is_relative_to_the_negative_distances_by_default():
    # SEPARATED: every hardest positive at 1, hardest negatives 10, 9, 9, 10 (mean 9.5), ranked by far.
    batch = {"item": ITEMS}
    default = LOSSES.build("improved_trihard", margin=0.3)  # tau = 1.0 x mean d_an: positives are inside
    absolute = LOSSES.build("improved_trihard", margin=0.3, positive_threshold=0.1, threshold_scale="absolute")
    for scale in (1.0, 100.0):
        outputs = {"features": (points(*SEPARATED) * scale)}
        assert default(outputs, batch).item() == 0.0
        # an absolute tau = 0.1 is active at any scale: 0.5 * (d_ap - 0.1)
        assert absolute(outputs, batch).item() == pytest.approx(0.5 * (scale - 0.1), rel=1e-5)
    # tau = 0.1: the bound is 0.1 x 9.5 = 0.95, just inside every hardest positive
    strict = LOSSES.build("improved_trihard", margin=0.3, positive_threshold=0.1)
    features = points(*SEPARATED)
    loss = strict({"features": features}, batch)
    assert loss.item() == pytest.approx(0.5 * (1.0 - 0.95), abs=1e-6)
    loss.backward()
    # The bound is detached: only the positive pairs are pulled (each pair's distance with weight
    # 2 x 0.5 / 4, so x0 moves towards x1 and x2 towards x3); a gradient through the mean negative
    # distance would also push the items towards each other and break the symmetry.
    grad = features.grad[:, 0]
    assert grad.tolist() == pytest.approx([-0.25, 0.25, -0.25, 0.25], abs=1e-6)
    with pytest.raises(ConfigError, match="threshold_scale"):
        LOSSES.build("improved_trihard", threshold_scale="normalised")


# --- center loss ---------------------------------------------------------------------------

def center_term() -> torch.nn.Module:
    term = LOSSES.build("center", num_classes=2, embedding_size=2)
    with torch.no_grad():
        term.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    return term


def test_center_loss_hand_value_gradient_and_decrease():
    term = center_term()
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 1.0]], requires_grad=True)
    batch = {"item": torch.tensor([0, 1, 1])}
    loss = term({"features": features}, batch)
    assert loss.item() == pytest.approx(0.5 * (1 + 2 + 1) / 3, abs=1e-6)  # squared distances 1, 2, 1
    loss.backward()
    # d/dc_k = -(1/B) * sum over samples of item k of (f_i - c_k):
    # item 0: (1, 0); item 1: (-1, 1) + (1, 0) = (0, 1)
    expected = -torch.tensor([[1.0, 0.0], [0.0, 1.0]]) / 3
    assert torch.allclose(term.centers.grad, expected, atol=1e-6)
    halfway = features.detach() + 0.5 * (term.centers.detach()[batch["item"]] - features.detach())
    assert term({"features": halfway}, batch).item() == pytest.approx(loss.item() / 4, abs=1e-6)


def test_center_loss_centers_move_towards_features_under_sgd():
    term = center_term()
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 1.0]])
    batch = {"item": torch.tensor([0, 1, 1])}
    optimizer = torch.optim.SGD(term.parameters(), lr=0.5)
    values = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = term({"features": features}, batch)
        values.append(loss.item())
        loss.backward()
        optimizer.step()
    assert all(later < earlier for earlier, later in zip(values, values[1:]))


def test_center_loss_needs_one_tensor_and_sizes():
    with pytest.raises(ConfigError, match="num_classes"):
        LOSSES.build("center", embedding_size=2)
    term = LOSSES.build("center", num_classes=2, embedding_size=2, input="branch_features")
    with pytest.raises(ConfigError, match="branch_features.0"):
        term({"branch_features": [torch.zeros(2, 2), torch.zeros(2, 2)]}, {"item": torch.tensor([0, 1])})


# --- classification ------------------------------------------------------------------------

def test_cross_entropy_with_label_smoothing_matches_hand_computation():
    # Two classes, eps = 0.2: target (0.9, 0.1). Logits (1, 0), label 0:
    # -(0.9 (1 - log(1+e)) + 0.1 (-log(1+e))) = log(1+e) - 0.9
    outputs = {"logits": torch.tensor([[1.0, 0.0]]), "branch_logits": [torch.tensor([[1.0, 0.0]]),
                                                                        torch.tensor([[0.0, 1.0]])]}
    batch = {"item": torch.tensor([0])}
    log1pe = math.log1p(math.e)
    term = LOSSES.build("cross_entropy", label_smoothing=0.2)
    assert term(outputs, batch).item() == pytest.approx(log1pe - 0.9, abs=1e-6)
    # Second branch: logits (0, 1), label 0 -> log(1+e) - 0.1; the branches are averaged.
    branches = LOSSES.build("cross_entropy", label_smoothing=0.2, input="branch_logits")
    assert branches(outputs, batch).item() == pytest.approx(log1pe - 0.5, abs=1e-6)


def test_attribute_bce_weights_positives_and_masks_missing_rows():
    outputs = {"attr_logits": torch.zeros(2, 2, requires_grad=True)}
    batch = {"attr_multi_hot": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}
    # At logit 0 every entry costs log 2; the positive entry is weighted 3.
    weighted = LOSSES.build("attribute_multilabel_bce", pos_weight=[3.0, 1.0])
    assert weighted(outputs, batch).item() == pytest.approx((3 + 1 + 1 + 1) * math.log(2) / 4, abs=1e-6)
    from_frequencies = LOSSES.build("attribute_multilabel_bce", label_frequencies=[0.25, 0.5])  # (1-p)/p = 3, 1
    assert from_frequencies(outputs, batch).item() == pytest.approx(weighted(outputs, batch).item(), abs=1e-6)
    masked = dict(batch, attr_multi_mask=torch.tensor([1.0, 0.0]))
    assert weighted(outputs, masked).item() == pytest.approx((3 + 1) * math.log(2) / 2, abs=1e-6)
    with pytest.raises(ConfigError, match="3 positive weights"):
        LOSSES.build("attribute_multilabel_bce", pos_weight=[1.0, 1.0, 1.0], attribute_sizes=[1, 1])


def _tiny_label_table():
    from fashion_retrieval.data.table import Sample, SampleTable

    rows = [{"clothes_type": "top", "attributes": ("a", "b")}, {"clothes_type": "top", "attributes": ("a",)},
            {"clothes_type": "dress"}, {"attributes": ("a", "c")}]
    samples = [Sample(path=f"{n}.jpg", item_id=f"item{n}", attributes=attrs) for n, attrs in enumerate(rows)]
    return SampleTable(samples, multi_label=["attributes"])


def test_frequency_pos_weights_come_from_the_training_labels_and_change_the_loss():
    from types import SimpleNamespace

    from fashion_retrieval.config import load_config
    from fashion_retrieval.data.labels import LabelSpace
    from fashion_retrieval.engine.builders import build_objective_for

    table = _tiny_label_table()
    labels = LabelSpace.from_table(table)
    assert labels.attributes == {"clothes_type": ["dress", "top"], "attributes": ["a", "b", "c"]}
    assert labels.value_counts(table) == [1, 2, 3, 1, 1]
    # negatives / positives over the 4 images: dress 3/1, top 2/2, a 1/3, b 3/1, c 3/1 (the recipe's cap is 50)
    expected = torch.tensor([3.0, 1.0, 1.0 / 3.0, 3.0, 3.0])
    config = load_config("configs/deepfashion_c2s_mmfl_net.yaml")
    model = SimpleNamespace(feat_dim=8)
    objective = build_objective_for(config, model, labels, table)
    term = objective.terms[objective.labels.index("attribute_multilabel_bce")]
    torch.testing.assert_close(term.pos_weight, expected)

    outputs = {"attr_logits": torch.zeros(2, 5)}
    batch = {"attr_multi_hot": torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0, 1.0]])}
    weighted = term(outputs, batch).item()
    unweighted = LOSSES.build("attribute_multilabel_bce")(outputs, batch).item()
    # At logit 0 each entry costs log 2 times its weight: positives 1, 1/3, 3 and 3, 1/3, 3; four negatives.
    assert weighted == pytest.approx((1 + 1 / 3 + 3 + 3 + 1 / 3 + 3 + 4) * math.log(2) / 10, abs=1e-6)
    assert unweighted == pytest.approx(math.log(2), abs=1e-6)
    capped = LOSSES.build("attribute_multilabel_bce", pos_weight="frequency", max_pos_weight=2.0,
                          attribute_value_counts={"positives": labels.value_counts(table), "images": 4})
    torch.testing.assert_close(capped.pos_weight, torch.tensor([2.0, 1.0, 1.0 / 3.0, 2.0, 2.0]))


def test_a_cap_without_weights_and_frequency_weights_without_counts_are_refused():
    from fashion_retrieval.losses.metric import frequency_pos_weights

    with pytest.raises(ConfigError, match="pos_weight: frequency"):
        LOSSES.build("attribute_multilabel_bce", max_pos_weight=50)
    with pytest.raises(ConfigError, match="value counts"):
        LOSSES.build("attribute_multilabel_bce", pos_weight="frequency")
    with pytest.raises(ConfigError, match="'often'"):
        LOSSES.build("attribute_multilabel_bce", pos_weight="often")
    # a value no image has gets the cap's input N, one every image has 1/N instead of 0
    torch.testing.assert_close(frequency_pos_weights({"positives": [0, 4, 1], "images": 4}),
                               torch.tensor([4.0, 0.25, 3.0]))


# --- margin softmaxes and DML --------------------------------------------------------------

def dml(**kwargs) -> torch.nn.Module:
    return LOSSES.build("dml", num_classes=5, embedding_size=4, scale=16.0, **kwargs)


def random_batch(seed: int = 0) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(8, 4, generator=generator, requires_grad=True)
    return {"features": features}, {"item": torch.randint(0, 5, (8,), generator=generator)}


@pytest.mark.parametrize("shape", ["hardness", "constant"])
def test_dml_equals_cosface_when_the_margins_are_equal(shape):
    from pytorch_metric_learning.losses import CosFaceLoss

    term = dml(positive_margin=0.3, negative_margin=0.3, negative_margin_shape=shape)
    reference = CosFaceLoss(num_classes=5, embedding_size=4, margin=0.3, scale=16.0)
    ours = LOSSES.build("cosface", num_classes=5, embedding_size=4, margin=0.3, scale=16.0)
    with torch.no_grad():
        reference.W.copy_(term.weight.t())
        ours.loss.W.copy_(term.weight.t())
    outputs, batch = random_batch()
    value = term(outputs, batch).item()
    assert value == pytest.approx(reference(outputs["features"], batch["item"]).item(), abs=1e-5)
    assert value == pytest.approx(ours(outputs, batch).item(), abs=1e-5)


@pytest.mark.parametrize("shape", ["hardness", "constant"])
def test_dml_exceeds_cosface_when_the_negative_margin_is_larger(shape):
    equal = dml(positive_margin=0.3, negative_margin=0.3, negative_margin_shape=shape)
    larger = dml(positive_margin=0.3, negative_margin=0.5, negative_margin_shape=shape)
    larger.weight.data.copy_(equal.weight.data)
    outputs, batch = random_batch(1)
    assert larger(outputs, batch).item() > equal(outputs, batch).item() + 1e-3


def test_dml_hand_values_and_constant_shape_is_cosface_with_the_negative_margin():
    # Class weights e1, e2; the feature e1 of class 0: cosines (1, 0).
    outputs, batch = {"features": torch.tensor([[1.0, 0.0]])}, {"item": torch.tensor([0])}
    def build(shape: str) -> torch.nn.Module:
        term = LOSSES.build("dml", num_classes=2, embedding_size=2, positive_margin=0.2, negative_margin=0.4,
                            scale=2.0, negative_margin_shape=shape)
        term.weight.data.copy_(torch.eye(2))
        return term
    # hardness: target 2(1 - 0.2) = 1.6, other 2(0 + 0.2 (1 + 0)/2) = 0.2
    assert build("hardness")(outputs, batch).item() == pytest.approx(math.log1p(math.exp(0.2 - 1.6)), abs=1e-6)
    # constant: other 2(0 + 0.2) = 0.4, the same softmax as CosFace with margin 0.4: log(1 + e^{2(0 - 0.6)})
    assert build("constant")(outputs, batch).item() == pytest.approx(math.log1p(math.exp(-1.2)), abs=1e-6)


def test_arcface_margin_is_in_radians():
    term = LOSSES.build("arcface", num_classes=2, embedding_size=2, margin=0.5, scale=2.0)
    term.loss.W.data.copy_(torch.eye(2))
    loss = term({"features": torch.tensor([[1.0, 0.0]])}, {"item": torch.tensor([0])})
    # target logit 2 cos(0 + 0.5), other 2 cos(pi/2) = 0
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0 * math.cos(0.5))), abs=1e-5)
    with pytest.raises(ConfigError, match="radians"):
        LOSSES.build("arcface", num_classes=2, embedding_size=2, margin=28.6)


def test_learned_margins_keep_the_negative_margin_above_the_positive_one():
    term = dml(positive_margin=0.2, negative_margin=0.3, learn_margins=True, margin_reward=0.01, learn_scale=True)
    optimizer = torch.optim.SGD([term.raw_positive_margin, term.raw_margin_gap], lr=5.0)
    for _ in range(200):  # push the negative margin below the positive one as hard as possible
        optimizer.zero_grad()
        positive, negative, _ = term.margins_and_scale()
        (negative - positive).backward()
        optimizer.step()
    margins = term.current_margins()
    assert margins["negative_margin"] > margins["positive_margin"] > 0
    assert margins["negative_margin"] - margins["positive_margin"] < 1e-3  # it did try


def test_learned_margins_need_a_reward_and_ordered_margins():
    with pytest.raises(ConfigError, match="margin_reward"):
        dml(positive_margin=0.2, negative_margin=0.3, learn_margins=True)
    with pytest.raises(ConfigError, match="positive_margin <= negative_margin"):
        dml(positive_margin=0.4, negative_margin=0.3)


def _sphereface_by_hand(features, labels, weight, scale, blend):
    """The paper's annealed A-softmax, margin 4: ψ(θ) = (−1)^k cos 4θ − 2k, k = floor(4θ/π)."""
    norms = features.norm(dim=1, keepdim=True)
    cosine = torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(weight, dim=1).t()
    theta = torch.acos(cosine.clamp(-1, 1))
    k = torch.floor(theta / (math.pi / 4))
    psi = (-1) ** k * torch.cos(4 * theta) - 2 * k
    target = (blend * cosine + psi) / (1 + blend)
    is_target = torch.nn.functional.one_hot(labels, weight.shape[0]).bool()
    logits = scale * norms * torch.where(is_target, target, cosine)
    return torch.nn.functional.cross_entropy(logits, labels)


@pytest.mark.parametrize("steps,blend", [(0, 1000.0), (50, 1000.0 / 7.0), (10_000, 5.0)])
def test_sphereface_anneals_from_softmax_as_the_paper(steps, blend):
    term = LOSSES.build("sphereface", num_classes=5, embedding_size=4, scale=2.0)
    term.steps.fill_(steps)
    assert term.softmax_blend() == pytest.approx(blend)
    outputs, batch = random_batch(3)
    expected = _sphereface_by_hand(outputs["features"], batch["item"], term.class_weights.detach(), 2.0, blend)
    assert term(outputs, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    assert int(term.steps) == steps + 1, "a training step advances the schedule"
    term.eval()
    term(outputs, batch)
    assert int(term.steps) == steps + 1, "evaluation does not"
    assert "steps" in term.state_dict(), "the schedule is checkpointed"


def test_sphereface_without_annealing_is_plain_pml():
    from pytorch_metric_learning.losses import SphereFaceLoss

    term = LOSSES.build("sphereface", num_classes=5, embedding_size=4, softmax_blend_start=0)
    reference = SphereFaceLoss(num_classes=5, embedding_size=4, margin=4, scale=1.0)
    reference.W.data.copy_(term.loss.W.data)
    outputs, batch = random_batch(4)
    assert term(outputs, batch).item() == pytest.approx(reference(outputs["features"], batch["item"]).item(), rel=1e-6)
    assert term.learned_values() == {}
    with pytest.raises(ConfigError, match="softmax_blend"):
        LOSSES.build("sphereface", num_classes=5, embedding_size=4, softmax_blend_decay=-1)


@pytest.mark.parametrize("name,kwargs", [
    ("softmax", {}), ("normalized_softmax", {}), ("cosface", {}), ("arcface", {}), ("sphereface", {}),
    ("dml", {"learn_margins": True, "margin_reward": 0.1, "learn_scale": True}),
])
def test_gradient_reaches_class_weights_and_learned_parameters(name, kwargs):
    term = LOSSES.build(name, num_classes=5, embedding_size=4, **kwargs)
    outputs, batch = random_batch(2)
    term(outputs, batch).backward()
    assert outputs["features"].grad.abs().sum() > 0
    for param_name, param in term.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


# --- objective -----------------------------------------------------------------------------

CONTEXT = {"num_classes": 2, "embedding_size": 2, "attribute_sizes": [2], "feat_dim": 2}


def test_objective_reports_each_term_and_the_weighted_total():
    objective = build_objective([
        {"name": "trihard", "weight": 1.0, "margin": 0.5},
        {"name": "cross_entropy", "weight": 0.5, "label": "id", "label_smoothing": 0.2},
        {"name": "center", "weight": 0.1, "center_lr": 0.5},
    ], CONTEXT)
    with torch.no_grad():
        objective.terms[2].centers.zero_()
    features = points(*MIXED)
    outputs = {"features": features, "logits": torch.tensor([[1.0, 0.0]] * 4)}
    total, values = objective(outputs, {"item": ITEMS})
    center = 0.5 * (0 + 4 + 1 + 25) / 4  # squared distances to the zero centers
    ce = (2 * (math.log1p(math.e) - 0.9) + 2 * (math.log1p(math.e) - 0.1)) / 4
    assert values == pytest.approx({"trihard": 2.0, "id": ce, "center": center}, abs=1e-5)
    assert total.item() == pytest.approx(2.0 + 0.5 * ce + 0.1 * center, abs=1e-5)
    total.backward()
    assert objective.terms[2].centers.grad.abs().sum() > 0
    assert any(p is objective.terms[2].centers for p in objective.parameters())
    groups = objective.parameter_groups()
    assert groups == [{"params": [objective.terms[2].centers], "lr": 0.5, "weight_decay": 0.0}]


def test_objective_config_errors_name_the_offender():
    with pytest.raises(ConfigError, match="'margn'"):
        build_objective([{"name": "trihard", "weight": 1.0, "margn": 0.3}], CONTEXT)
    with pytest.raises(ConfigError, match="'trihrad'.*did you mean 'trihard'"):
        build_objective([{"name": "trihrad", "weight": 1.0}], CONTEXT)
    with pytest.raises(ConfigError, match="'trihard' is used twice"):
        build_objective([{"name": "trihard"}, {"name": "trihard", "input": "branch_features"}], CONTEXT)
    with pytest.raises(ConfigError, match="weight"):
        build_objective([{"name": "trihard", "weight": -1}], CONTEXT)


def test_objective_passes_context_only_to_terms_that_take_it_and_user_keys_win():
    class TermConfig:  # pydantic-like: attributes, loss kwargs nested
        def __init__(self, **fields):
            self.__dict__.update(fields)

    objective = build_objective([
        TermConfig(name="dml", weight=1.0, label=None, kwargs={"embedding_size": 3}),
        TermConfig(name="trihard", weight=1.0, label=None, kwargs={}),
    ], CONTEXT)
    assert tuple(objective.terms[0].weight.shape) == (2, 3)
    assert objective.labels == ["dml", "trihard"]
    with pytest.raises(ConfigError):
        Objective([])


def test_missing_output_is_a_config_error_naming_it():
    term = LOSSES.build("trihard", input="branch_features")
    with pytest.raises(ConfigError, match="branch_features"):
        term({"features": torch.zeros(4, 2)}, {"item": ITEMS})
