"""Metric and classification loss terms of MMFL-Net: trihard, improved trihard, center, ID
cross-entropy and multi-label attribute BCE.

Every term is an ``nn.Module`` called as ``term(outputs, batch) -> scalar Tensor``. ``input``
names the model output it reads: a tensor key (``"features"``), a list key
(``"branch_features"``: the loss is averaged over the branches) or one element of a list
(``"branch_features.1"``). Terms with their own parameters (center loss, margin softmaxes) need
one tensor, so they accept a single element but not a whole list. Identity labels are always
``batch["item"]``.

Inputs are cast to float32 first: under autocast the heads emit float16, where ``exp`` in the
softmaxes overflows and pytorch-metric-learning switches to a slow per-pair distance loop (and
casts its own weight matrices to the input dtype).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ConfigError
from . import LOSSES


def resolve_input(outputs: dict, key: str) -> list[torch.Tensor]:
    """The tensors a term reads: ``[outputs[key]]``, every element of a list output, or with
    ``"name.i"`` the i-th element of the list ``outputs["name"]``."""
    name, _, index = key.partition(".")
    if name not in outputs:
        raise ConfigError(f"loss input '{key}' is not among the model outputs: {', '.join(sorted(outputs))}")
    value = outputs[name]
    if index:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"loss input '{key}': output '{name}' is a tensor, not a list")
        if not index.isdigit() or int(index) >= len(value):
            raise ConfigError(f"loss input '{key}': output '{name}' has {len(value)} elements")
        return [value[int(index)].float()]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"loss input '{key}' is an empty list")
        return [v.float() for v in value]
    return [value.float()]


def resolve_single_input(outputs: dict, key: str, term: str) -> torch.Tensor:
    """One tensor, for terms whose parameters (centers, class weights) fit one feature space."""
    tensors = resolve_input(outputs, key)
    if len(tensors) != 1:
        raise ConfigError(
            f"{term}: input '{key}' is a list of {len(tensors)} tensors, but this term has parameters "
            f"for one feature space; use one term per element, e.g. input: {key}.0"
        )
    return tensors[0]


def item_labels(batch: dict, device: torch.device, num_classes: int | None = None) -> torch.Tensor:
    labels = batch["item"].to(device=device, dtype=torch.long)
    # Checked here because an out-of-range class is a device-side assert on CUDA, far from its cause.
    if num_classes is not None and labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"batch has item label {int(labels.max())} but the loss was built for {num_classes} classes")
    return labels


def required_size(value: int | None, name: str, term: str) -> int:
    if value is None or value <= 0:
        raise ConfigError(f"{term} needs a positive {name} (passed by the objective builder from the model)")
    return int(value)


class _BatchHard(nn.Module):
    """Hardest positive and negative distance per anchor, mined by pytorch-metric-learning.

    Euclidean distance (``LpDistance``, p=2, power 1), optionally on L2-normalised embeddings.
    Anchors without a positive or without a negative in the batch are dropped.
    """

    def __init__(self, normalize: bool):
        super().__init__()
        from pytorch_metric_learning import distances, miners

        self.distance = distances.LpDistance(normalize_embeddings=normalize, p=2, power=1)
        self.miner = miners.BatchHardMiner(distance=self.distance)


def _triplet_margin(margin: float | None, soft_margin: bool, term: str) -> float:
    if margin is None:
        return 0.0 if soft_margin else 0.3
    if margin < 0:
        raise ConfigError(f"{term}: margin must be >= 0, got {margin}")
    return float(margin)


def _zero(like: torch.Tensor) -> torch.Tensor:
    # Connected to the graph so that backward() works when no anchor contributes.
    return like.sum() * 0.0


@LOSSES.register("trihard")
class TriHardLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al. 2017, "In defense of the triplet loss").

    For each anchor a: d_ap = max distance to a same-item sample, d_an = min distance to another
    item's sample; loss = mean over anchors of ``[d_ap - d_an + margin]_+``, or with
    ``soft_margin`` ``log(1 + exp(d_ap - d_an + margin))``. ``margin`` defaults to 0.3 for the
    hinge and to 0 for the soft margin (the paper's soft margin is exactly ``log(1+exp(d_ap-d_an))``).
    Distances are Euclidean, on L2-normalised embeddings when ``normalize``. Mining and the hinge are
    pytorch-metric-learning's ``BatchHardMiner`` + ``TripletMarginLoss`` with a plain mean, which is
    this definition exactly; the batch needs several images per item (a P×K sampler).
    """

    def __init__(self, margin: float | None = None, soft_margin: bool = False, normalize: bool = False,
                 input: str = "features"):
        super().__init__()
        from pytorch_metric_learning import losses, reducers

        self.margin = _triplet_margin(margin, soft_margin, "trihard")
        self.input = input
        self.mining = _BatchHard(normalize)
        self.triplet = losses.TripletMarginLoss(
            margin=self.margin, smooth_loss=soft_margin, distance=self.mining.distance,
            # The default AvgNonZeroReducer averages over violating anchors only; the paper averages over all.
            reducer=reducers.MeanReducer(),
        )

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        per_input = []
        for embeddings in resolve_input(outputs, self.input):
            labels = item_labels(batch, embeddings.device)
            triplets = self.mining.miner(embeddings, labels)
            per_input.append(self.triplet(embeddings, labels, triplets))
        return torch.stack(per_input).mean()


@LOSSES.register("improved_trihard")
class ImprovedTriHardLoss(nn.Module):
    """MMFL-Net's improved trihard: batch-hard triplet plus an intra-class distance constraint.

    loss = mean_a ( [d_ap - d_an + margin]_+  +  positive_weight · [d_ap - positive_threshold · s]_+ )

    with d_ap, d_an the hardest positive / negative distances of anchor a as in ``trihard``
    (``soft_margin`` softens the first hinge the same way) and s the batch's mean d_an (or 1 with
    ``threshold_scale="absolute"``).

    Why this form: MMFL-Net (Bao et al. 2023) says its improved trihard loss "jointly optimises
    intra-class and inter-class distance" to improve intra-class compactness. The plain triplet
    constrains only the *difference* d_ap - d_an, so a class may stay spread out as long as other
    classes are farther still. The established "improved triplet loss" (Cheng et al., CVPR 2016,
    person re-identification) adds exactly the missing absolute constraint on positive pairs,
    ``[d_ap - tau]_+``; we apply it to the batch-hard positive, which makes it a compactness term on
    each anchor's farthest same-item sample. The paper's equations were not available to us (only
    its abstract), so this is our reading; ``positive_weight=0`` gives plain ``trihard``.

    The loss is zero exactly when every anchor's farthest positive is closer than its nearest
    negative by ``margin`` and lies within the threshold.

    Where τ acts: with ``threshold_scale="relative"`` (default) the threshold is τ times the
    batch's mean hardest-negative distance (detached): the farthest positive of every anchor must
    lie within τ times the typical distance to the nearest other item. The triplet only asks each
    anchor's positives to be closer than *its own* negatives, so a class whose negatives are far
    may stay spread out; this bound does not depend on the anchor's own negatives. Relative, τ
    keeps its meaning whatever the feature width, norm, image size and training stage: on raw
    features MMFL-Net's metric distances are 14–24 at the start (1,024-d, 96×72 images; 26–38
    with the stripes' 2,304 dimensions) and 8–11 twenty steps later, so the absolute τ = 0.1 used
    until 2026-12 was active for every anchor, an unconditional pull β·d_ap rather than a
    threshold. A fixed τ on normalised features does not travel either: the normalised hardest
    positive distances are 0.40–0.51 at 96×72 but 0.24–0.32 at 256×192. The ratio d_ap / mean
    d_an is 0.91–1.58 (5th–95th percentile) in all of these cases, and τ = 1.0 is active for
    83–88 % of the anchors, off for the compact rest, which grows as training tightens the
    classes (``scripts/trihard_distances.py``; the numbers are in docs/losses.md).
    ``threshold_scale="absolute"`` reads τ as a distance (on normalised features with ``normalize``).
    """

    def __init__(self, margin: float | None = None, soft_margin: bool = False, normalize: bool = False,
                 positive_threshold: float = 1.0, positive_weight: float = 0.5, threshold_scale: str = "relative",
                 input: str = "features"):
        super().__init__()
        if positive_threshold < 0 or positive_weight < 0:
            raise ConfigError("improved_trihard: positive_threshold and positive_weight must be >= 0")
        if threshold_scale not in ("relative", "absolute"):
            raise ConfigError(f"improved_trihard: threshold_scale must be relative or absolute, got {threshold_scale!r}")
        self.margin = _triplet_margin(margin, soft_margin, "improved_trihard")
        self.soft_margin = soft_margin
        self.positive_threshold = float(positive_threshold)
        self.positive_weight = float(positive_weight)
        self.relative = threshold_scale == "relative"
        self.input = input
        self.mining = _BatchHard(normalize)

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        per_input = []
        for embeddings in resolve_input(outputs, self.input):
            labels = item_labels(batch, embeddings.device)
            anchor, positive, negative = self.mining.miner(embeddings, labels)  # mined without gradient
            if anchor.numel() == 0:
                per_input.append(_zero(embeddings))
                continue
            matrix = self.mining.distance(embeddings)  # recomputed with gradient
            d_ap, d_an = matrix[anchor, positive], matrix[anchor, negative]
            violation = d_ap - d_an + self.margin
            ranking = F.softplus(violation) if self.soft_margin else F.relu(violation)
            # Detached: the scale says where the bound is; pushing negatives closer must not lower it.
            threshold = self.positive_threshold * (d_an.detach().mean() if self.relative else 1.0)
            compactness = F.relu(d_ap - threshold)
            per_input.append((ranking + self.positive_weight * compactness).mean())
        return torch.stack(per_input).mean()


@LOSSES.register("center")
class CenterLoss(nn.Module):
    """Center loss (Wen et al. 2016): ``0.5 · mean_i ||f_i - c_{y_i}||²`` with one learnable
    center per item, ``centers`` [num_classes, embedding_size].

    The centers are parameters of this term, so ``Objective.parameters()`` hands them to the
    optimiser. Like the papers, they can be trained with their own SGD learning rate
    (``center_lr``, typically 0.5, no weight decay): ``Objective.parameter_groups()`` then puts them
    into a group of their own (``param_group_overrides``). Note that the term weight (often 5e-4)
    also scales the centers' gradient; some implementations divide it out, which you get by
    choosing ``center_lr`` = intended lr / weight.
    """

    def __init__(self, num_classes: int | None = None, embedding_size: int | None = None,
                 center_lr: float | None = None, input: str = "features"):
        super().__init__()
        self.num_classes = required_size(num_classes, "num_classes", "center")
        size = required_size(embedding_size, "embedding_size", "center")
        self.centers = nn.Parameter(torch.randn(self.num_classes, size))
        if center_lr is not None and center_lr <= 0:
            raise ConfigError(f"center: center_lr must be positive, got {center_lr}")
        self.param_group_overrides = {"lr": float(center_lr), "weight_decay": 0.0} if center_lr is not None else None
        self.input = input

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        features = resolve_single_input(outputs, self.input, "center")
        if features.shape[1] != self.centers.shape[1]:
            raise ValueError(f"center: features have {features.shape[1]} dims, centers {self.centers.shape[1]}")
        labels = item_labels(batch, features.device, self.num_classes)
        own_centers = self.centers.float()[labels]
        return 0.5 * (features - own_centers).pow(2).sum(dim=1).mean()


@LOSSES.register("cross_entropy")
class CrossEntropyLoss(nn.Module):
    """ID classification: cross-entropy of ``logits`` (or the mean over ``branch_logits``) against
    the item labels, with torch's ``label_smoothing`` ε: target ``(1-ε)·onehot + ε/C``."""

    def __init__(self, label_smoothing: float = 0.0, input: str = "logits"):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.input = input

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        per_input = []
        for logits in resolve_input(outputs, self.input):
            labels = item_labels(batch, logits.device, logits.shape[1])
            per_input.append(F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing))
        return torch.stack(per_input).mean()


def frequency_pos_weights(counts: dict | None) -> torch.Tensor:
    """Negatives per positive of each attribute value, from the training table's counts."""
    if not counts or "positives" not in counts or "images" not in counts:
        raise ConfigError("attribute_multilabel_bce: pos_weight: frequency needs the training labels' value counts "
                          "(attribute_value_counts), which the trainer passes; none were given here")
    positives = torch.tensor([float(n) for n in counts["positives"]])
    negatives = float(counts["images"]) - positives
    return negatives.clamp(min=1.0) / positives.clamp(min=1.0)


@LOSSES.register("attribute_multilabel_bce")
class AttributeMultiLabelBCELoss(nn.Module):
    """Multi-label attribute recognition: BCE of ``attr_logits`` [B, V] against
    ``batch["attr_multi_hot"]`` [B, V], averaged over the entries that count.

    Each image has few of the V attribute values, so unweighted BCE is minimised early by saying
    "absent" everywhere. Positives are weighted by ``pos_weight``:

    * a number for all values, or a list of V numbers;
    * ``"frequency"``: negatives / positives of each value in the training table, which gives both
      sides of every value equal total weight. The trainer passes the table's counts as
      ``attribute_value_counts`` (``{"positives": [V], "images": N}``); an image without the
      value counts as a negative, as it does in the loss (training batches carry no
      ``attr_multi_mask``). Computed as max(N - n_v, 1) / max(n_v, 1), so a value that no
      training image has gets the cap (it never has a positive to weigh) and one that every image
      has gets 1/N rather than 0;
    * or from ``label_frequencies`` p_v (fractions of images with each value) as ``(1 - p) / p``.

    ``max_pos_weight`` caps the weights for very rare values; it needs one of the above (alone it
    would silently leave the loss unweighted, so it is refused).

    Missing labels: if the batch has ``attr_multi_mask`` ([B] per image or [B, V] per entry,
    1 = labelled), only labelled entries count.
    """

    def __init__(self, pos_weight: float | Sequence[float] | str | None = None,
                 label_frequencies: Sequence[float] | None = None, max_pos_weight: float | None = None,
                 attribute_sizes: Sequence[int] | None = None,
                 attribute_value_counts: dict | None = None, input: str = "attr_logits"):
        super().__init__()
        if pos_weight is not None and label_frequencies is not None:
            raise ConfigError("attribute_multilabel_bce: give pos_weight or label_frequencies, not both")
        if max_pos_weight is not None and pos_weight is None and label_frequencies is None:
            raise ConfigError(f"attribute_multilabel_bce: max_pos_weight: {max_pos_weight} caps positive weights, "
                              "but none are set, so the loss would stay unweighted; add pos_weight: frequency "
                              "(negatives/positives of each value in the training labels) or a number")
        if max_pos_weight is not None and max_pos_weight <= 0:
            raise ConfigError(f"attribute_multilabel_bce: max_pos_weight must be positive, got {max_pos_weight}")
        weights: torch.Tensor | None = None
        if isinstance(pos_weight, str):
            if pos_weight != "frequency":
                raise ConfigError(f"attribute_multilabel_bce: pos_weight must be a number, a list or 'frequency', "
                                  f"got {pos_weight!r}")
            weights = frequency_pos_weights(attribute_value_counts)
        elif label_frequencies is not None:
            frequencies = torch.tensor([float(p) for p in label_frequencies])
            if bool(((frequencies <= 0) | (frequencies >= 1)).any()):
                raise ConfigError("attribute_multilabel_bce: label_frequencies must lie strictly between 0 and 1")
            weights = (1.0 - frequencies) / frequencies
        elif pos_weight is not None:
            weights = torch.tensor([float(pos_weight)] if isinstance(pos_weight, (int, float)) else
                                   [float(w) for w in pos_weight])
            if bool((weights <= 0).any()):
                raise ConfigError("attribute_multilabel_bce: pos_weight must be positive")
        if weights is not None and max_pos_weight is not None:
            weights = weights.clamp(max=float(max_pos_weight))
        total_values = sum(attribute_sizes) if attribute_sizes else None
        if weights is not None and weights.numel() > 1 and total_values is not None and weights.numel() != total_values:
            raise ConfigError(f"attribute_multilabel_bce: {weights.numel()} positive weights for "
                              f"{total_values} attribute values")
        self.register_buffer("pos_weight", weights, persistent=False)
        self.input = input

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        logits = resolve_single_input(outputs, self.input, "attribute_multilabel_bce")
        target = batch["attr_multi_hot"].to(device=logits.device, dtype=logits.dtype)
        if target.shape != logits.shape:
            raise ValueError(f"attribute_multilabel_bce: logits {tuple(logits.shape)} vs targets {tuple(target.shape)}")
        per_entry = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight, reduction="none")
        if "attr_multi_mask" not in batch:
            return per_entry.mean()
        mask = batch["attr_multi_mask"].to(device=logits.device, dtype=logits.dtype)
        if mask.dim() == 1:
            mask = mask[:, None]
        mask = mask.expand_as(per_entry)
        counted = mask.sum()
        if float(counted) == 0.0:
            return _zero(logits)
        return (per_entry * mask).sum() / counted


__all__ = [
    "AttributeMultiLabelBCELoss", "CenterLoss", "CrossEntropyLoss", "ImprovedTriHardLoss", "TriHardLoss",
    "frequency_pos_weights", "item_labels", "required_size", "resolve_input", "resolve_single_input",
]
