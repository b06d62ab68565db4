"""Softmax-family loss terms with their own class weights, for the DML comparison.

Each term owns a class-weight matrix (one proxy per item) and reads one feature tensor
(``input``, default ``"features"``) and ``batch["item"]``. The standard ones wrap
pytorch-metric-learning (PML): ``normalized_softmax``, ``cosface``, ``arcface``, ``sphereface``;
``softmax`` is a plain linear classifier; ``dml`` (the paper's loss) is written here.
Class weights start as random unit vectors for every term, so the comparison starts from the
same kind of proxies (PML's default is N(0, 1) entries, i.e. norms around sqrt(D), which slows
their learning under SGD because the cosine's gradient scales with 1/norm).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ConfigError
from . import LOSSES
from .metric import required_size, item_labels, resolve_single_input


def _unit_columns_(weight: torch.Tensor) -> None:
    """PML keeps class weights as [embedding_size, num_classes]: one unit-norm column per class."""
    with torch.no_grad():
        nn.init.normal_(weight)
        weight.div_(weight.norm(dim=0, keepdim=True))


def _inverse_softplus(value: float) -> float:
    # log(exp(v) - 1), written to stay finite for large v.
    return value + math.log(-math.expm1(-value))


class _ProxyTerm(nn.Module):
    """Shared forward of the PML-backed terms: one float32 feature tensor + item labels."""

    term_name = "proxy loss"

    def __init__(self, loss: nn.Module, num_classes: int, input: str):
        super().__init__()
        self.loss = loss
        self.num_classes = num_classes
        self.input = input

    @property
    def class_weights(self) -> torch.Tensor:
        """[num_classes, embedding_size] view of the PML weight matrix."""
        return self.loss.W.t()

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        features = resolve_single_input(outputs, self.input, self.term_name)
        return self.loss(features, item_labels(batch, features.device, self.num_classes))


@LOSSES.register("softmax")
class SoftmaxLoss(nn.Module):
    """Plain softmax: cross-entropy over a linear classifier (weights and bias) on the raw,
    unnormalised features. The baseline the margin losses improve on."""

    def __init__(self, num_classes: int | None = None, embedding_size: int | None = None, input: str = "features"):
        super().__init__()
        self.num_classes = required_size(num_classes, "num_classes", "softmax")
        self.classifier = nn.Linear(required_size(embedding_size, "embedding_size", "softmax"), self.num_classes)
        self.input = input

    @property
    def class_weights(self) -> torch.Tensor:
        return self.classifier.weight

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        features = resolve_single_input(outputs, self.input, "softmax")
        return F.cross_entropy(self.classifier(features), item_labels(batch, features.device, self.num_classes))


@LOSSES.register("normalized_softmax")
class NormalizedSoftmaxLoss(_ProxyTerm):
    """Normalised softmax (PML ``NormalizedSoftmaxLoss``): logits ``cos θ_j / temperature`` with
    L2-normalised features and class weights, no margin."""

    term_name = "normalized_softmax"

    def __init__(self, num_classes: int | None = None, embedding_size: int | None = None,
                 temperature: float = 0.05, input: str = "features"):
        from pytorch_metric_learning import losses

        classes = required_size(num_classes, "num_classes", self.term_name)
        if temperature <= 0:
            raise ConfigError(f"normalized_softmax: temperature must be positive, got {temperature}")
        loss = losses.NormalizedSoftmaxLoss(num_classes=classes, embedding_size=required_size(
            embedding_size, "embedding_size", self.term_name), temperature=temperature, weight_init_func=_unit_columns_)
        super().__init__(loss, classes, input)


@LOSSES.register("cosface")
class CosFaceLoss(_ProxyTerm):
    """CosFace / AM-softmax (PML ``CosFaceLoss``): target logit ``s·(cos θ_y − margin)``, other
    logits ``s·cos θ_j``, on L2-normalised features and class weights."""

    term_name = "cosface"

    def __init__(self, num_classes: int | None = None, embedding_size: int | None = None,
                 margin: float = 0.35, scale: float = 30.0, input: str = "features"):
        from pytorch_metric_learning import losses

        classes = required_size(num_classes, "num_classes", self.term_name)
        if margin < 0 or scale <= 0:
            raise ConfigError(f"cosface: need margin >= 0 and scale > 0, got {margin}, {scale}")
        loss = losses.CosFaceLoss(num_classes=classes, embedding_size=required_size(
            embedding_size, "embedding_size", self.term_name), margin=margin, scale=scale, weight_init_func=_unit_columns_)
        super().__init__(loss, classes, input)


@LOSSES.register("arcface")
class ArcFaceLoss(_ProxyTerm):
    """ArcFace (PML ``ArcFaceLoss``): target logit ``s·cos(θ_y + margin)``, ``margin`` in
    **radians** as in the paper (PML takes degrees; converted here). Past θ_y > π − margin PML
    switches to ``cos θ − margin·sin(margin)`` so the logit keeps decreasing in θ."""

    term_name = "arcface"

    def __init__(self, num_classes: int | None = None, embedding_size: int | None = None,
                 margin: float = 0.5, scale: float = 30.0, input: str = "features"):
        from pytorch_metric_learning import losses

        classes = required_size(num_classes, "num_classes", self.term_name)
        if not 0 <= margin < math.pi / 2:
            raise ConfigError(f"arcface: margin is in radians and must be in [0, pi/2), got {margin}")
        if scale <= 0:
            raise ConfigError(f"arcface: scale must be positive, got {scale}")
        loss = losses.ArcFaceLoss(num_classes=classes, embedding_size=required_size(
            embedding_size, "embedding_size", self.term_name), margin=math.degrees(margin), scale=scale,
            weight_init_func=_unit_columns_)
        super().__init__(loss, classes, input)


@LOSSES.register("sphereface")
class SphereFaceLoss(_ProxyTerm):
    """SphereFace / A-softmax (PML ``SphereFaceLoss``): target logit ``||x||·ψ(θ_y)`` with the
    multiplicative angular margin ψ(θ) = (−1)^k cos(margin·θ) − 2k, class weights normalised but
    the feature norm kept (as in the paper), times ``scale``. ``margin`` is an integer ≥ 1.

    **Annealing, as the paper trains it**: the target logit is ``||x||·(λ·cos θ_y + ψ(θ_y)) /
    (1 + λ)`` with ``λ = max(softmax_blend_min, softmax_blend_start / (1 + softmax_blend_decay·t))``
    at training step t, so training starts as a (weight-normalised) softmax and the margin comes
    in gradually. Without it (``softmax_blend_start: 0``) the margin-4 target logit is so far
    below the others that the network escapes by shrinking the feature norm: every logit goes
    to 0 and the loss sits at log(num_classes) (VITON: 145 nats at the start, then 8.38 = log
    4,363 for the rest of the run, top-1 0.07 %; docs/losses.md). The step count is a buffer, so
    it is checkpointed and a resumed run continues the schedule."""

    term_name = "sphereface"

    def __init__(self, num_classes: int | None = None, embedding_size: int | None = None,
                 margin: int = 4, scale: float = 1.0, softmax_blend_start: float = 1000.0,
                 softmax_blend_min: float = 5.0, softmax_blend_decay: float = 0.12, input: str = "features"):
        from pytorch_metric_learning import losses

        classes = required_size(num_classes, "num_classes", self.term_name)
        if int(margin) != margin or margin < 1:
            raise ConfigError(f"sphereface: margin is an integer angle multiplier >= 1, got {margin}")
        if min(softmax_blend_start, softmax_blend_min, softmax_blend_decay) < 0:
            raise ConfigError("sphereface: softmax_blend_start, softmax_blend_min and softmax_blend_decay must be >= 0")
        blend = self.softmax_blend

        class _Annealed(losses.SphereFaceLoss):
            def modify_cosine_of_target_classes(self, cosine: torch.Tensor) -> torch.Tensor:
                weight = blend()
                return (weight * cosine + super().modify_cosine_of_target_classes(cosine)) / (1.0 + weight)

        loss = _Annealed(num_classes=classes, embedding_size=required_size(
            embedding_size, "embedding_size", self.term_name), margin=int(margin), scale=scale,
            weight_init_func=_unit_columns_)
        super().__init__(loss, classes, input)
        self.blend_start, self.blend_min, self.blend_decay = softmax_blend_start, softmax_blend_min, softmax_blend_decay
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def softmax_blend(self) -> float:
        """λ at the current step (0 when annealing is off)."""
        if self.blend_start == 0:
            return 0.0
        return max(self.blend_min, self.blend_start / (1.0 + self.blend_decay * int(self.steps)))

    def learned_values(self) -> dict[str, float]:
        return {"softmax_blend": self.softmax_blend()} if self.blend_start else {}

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        loss = super().forward(outputs, batch)
        if self.training and torch.is_grad_enabled():
            self.steps += 1
        return loss


@LOSSES.register("dml")
class DiscriminativeMarginLoss(nn.Module):
    r"""Discriminative margin loss: a cosine softmax with a positive and a larger negative margin.

    **The paper** (Alirezazadeh, Dornaika, Moujahid, "Deep learning with discriminative margin loss
    for cross-domain consumer-to-shop clothes retrieval", Sensors 2022) argues that CosFace uses one
    margin for positive and negative pairs, while in fashion negatives range from very different to
    near-identical garments; DML "learns two different margins for positive and negative pairs such
    that the negative margin is larger than the positive margin". Only the abstract was available
    to us, not the equations, so the formula below is our design; it is checked against the
    properties the paper states.

    **Why not the literal reading.** Logits ``s(cos θ_y − m_p)`` for the target and
    ``s(cos θ_j + m_n)`` for the others are CosFace with margin ``m_p + m_n``: subtracting the
    constant ``s·m_n`` from every logit leaves the softmax unchanged and gives ``s(cos θ_y − m_p −
    m_n)`` and ``s·cos θ_j``. One softmax with constant margins therefore has only one effective
    margin; the two margins cannot be learned separately (their gradients are equal).

    **What we do.** With cosines ``c_j = cos θ_j`` between the L2-normalised feature and class
    weights, ``m_pos ≤ m_neg`` and ``δ = m_neg − m_pos``::

        target logit      s·(c_y − m_pos)
        non-target logit  s·(c_j + δ·h_j)     h_j = (1 + c_j)/2  ("hardness", the default)
                                              h_j = 1             (negative_margin_shape="constant")
        loss = cross-entropy(logits, y)

    The decision boundary against class j is ``c_y − c_j = m_pos + δ·h_j``: the required gap is
    ``m_pos`` for a dissimilar negative (c_j = −1) and grows to ``m_neg`` for a negative whose class
    weight points at the sample (c_j = 1), so a larger negative margin pushes the similar, hard
    negatives further. Both margins stay identifiable (``∂/∂m_neg`` weighs each negative by its
    hardness). The "constant" shape is the literal reading re-parametrised; by the argument above it
    equals CosFace with margin ``m_neg``.

    **Reduction to CosFace.** If ``m_neg = m_pos`` then δ = 0, so in both shapes every non-target
    logit is ``s·c_j`` and the target logit ``s(c_y − m_pos)``: these are CosFace's logits with
    margin ``m_pos``, term for term, hence the same loss (no shift argument needed). If ``m_neg >
    m_pos``, every non-target logit grows by ``s·δ·h_j ≥ 0`` (> 0 unless c_j = −1), and the
    cross-entropy grows strictly with any non-target logit, so DML > CosFace(m_pos).

    **Learned margins** (``learn_margins``): ``m_pos = softplus(ρ)`` and ``m_neg = m_pos +
    softplus(γ)``, so ``m_neg > m_pos > 0`` holds after any update. Minimising the cross-entropy
    alone drives margins towards zero, so learned margins need ``margin_reward`` λ > 0: the term
    adds ``−λ·(m_pos + m_neg)/2`` (the margin regulariser of AdaptiveFace, Liu et al. 2019), and the
    margins settle where the cross-entropy's pull balances λ. **Learned scale** (``learn_scale``):
    ``s = exp(log s)``. Read the current values with ``current_margins()``.
    """

    def __init__(self, num_classes: int | None = None, embedding_size: int | None = None,
                 positive_margin: float = 0.25, negative_margin: float = 0.4, scale: float = 30.0,
                 learn_margins: bool = False, learn_scale: bool = False, margin_reward: float = 0.0,
                 negative_margin_shape: str = "hardness", input: str = "features"):
        super().__init__()
        self.num_classes = required_size(num_classes, "num_classes", "dml")
        size = required_size(embedding_size, "embedding_size", "dml")
        if negative_margin_shape not in ("hardness", "constant"):
            raise ConfigError(f"dml: unknown negative_margin_shape '{negative_margin_shape}'; use hardness or constant")
        if not 0.0 <= positive_margin <= negative_margin:
            raise ConfigError(f"dml: need 0 <= positive_margin <= negative_margin, got {positive_margin}, {negative_margin}")
        if scale <= 0:
            raise ConfigError(f"dml: scale must be positive, got {scale}")
        if learn_margins and not 0.0 < positive_margin < negative_margin:
            raise ConfigError("dml: learned margins start from 0 < positive_margin < negative_margin (strict)")
        if learn_margins and margin_reward <= 0:
            raise ConfigError("dml: learn_margins needs margin_reward > 0, otherwise the margins only shrink")
        if margin_reward < 0:
            raise ConfigError(f"dml: margin_reward must be >= 0, got {margin_reward}")
        self.negative_margin_shape = negative_margin_shape
        self.learn_margins = learn_margins
        self.learn_scale = learn_scale
        self.margin_reward = float(margin_reward)
        self.input = input

        weight = torch.randn(self.num_classes, size)
        self.weight = nn.Parameter(weight / weight.norm(dim=1, keepdim=True))
        if learn_margins:
            self.raw_positive_margin = nn.Parameter(torch.tensor(_inverse_softplus(positive_margin)))
            self.raw_margin_gap = nn.Parameter(torch.tensor(_inverse_softplus(negative_margin - positive_margin)))
        else:
            self.fixed_margins = (float(positive_margin), float(negative_margin))
        if learn_scale:
            self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        else:
            self.fixed_scale = float(scale)

    @property
    def class_weights(self) -> torch.Tensor:
        return self.weight

    def margins_and_scale(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(m_pos, m_neg, s) as tensors, differentiable when learned."""
        device = self.weight.device
        if self.learn_margins:
            positive = F.softplus(self.raw_positive_margin)
            negative = positive + F.softplus(self.raw_margin_gap)
        else:
            positive, negative = (torch.tensor(m, device=device) for m in self.fixed_margins)
        scale = self.log_scale.exp() if self.learn_scale else torch.tensor(self.fixed_scale, device=device)
        return positive, negative, scale

    def current_margins(self) -> dict[str, float]:
        """For logging: the margins and scale now in effect."""
        positive, negative, scale = (v.item() for v in self.margins_and_scale())
        return {"positive_margin": positive, "negative_margin": negative, "scale": scale}

    def learned_values(self) -> dict[str, float]:
        """The margins and scale, when any of them is learned (for the training log)."""
        if not (self.learn_margins or self.learn_scale):
            return {}
        return self.current_margins()

    def logits(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = F.normalize(features, dim=1) @ F.normalize(self.weight.float(), dim=1).t()
        positive, negative, scale = self.margins_and_scale()
        gap = negative - positive
        shift = gap * (1.0 + cosine) / 2.0 if self.negative_margin_shape == "hardness" else gap
        is_target = F.one_hot(labels, self.num_classes).bool()
        return scale * torch.where(is_target, cosine - positive, cosine + shift)

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        features = resolve_single_input(outputs, self.input, "dml")
        labels = item_labels(batch, features.device, self.num_classes)
        loss = F.cross_entropy(self.logits(features, labels), labels)
        if self.learn_margins:
            positive, negative, _ = self.margins_and_scale()
            loss = loss - self.margin_reward * (positive + negative) / 2.0
        return loss


__all__ = [
    "ArcFaceLoss", "CosFaceLoss", "DiscriminativeMarginLoss", "NormalizedSoftmaxLoss", "SoftmaxLoss",
    "SphereFaceLoss",
]
