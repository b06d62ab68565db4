"""Loss terms for attribute-specific retrieval (ASEN, M3-Net, the classifier baseline).

Batch keys read here: ``attribute`` LongTensor[B] (the attribute each sample is embedded for),
``attr_value`` LongTensor[B] (its value for that attribute, -1 = unknown), ``attrs``
LongTensor[B, A] (all attribute values, -1 = missing). Embeddings are only ever compared between
samples that share ``attribute``: embeddings for different attributes live in different spaces.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ConfigError
from . import LOSSES


def _metric_embeddings(outputs: dict) -> torch.Tensor:
    return outputs["features"] if "features" in outputs else outputs["embedding"]


def _attribute_groups(batch: dict, device: torch.device) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(attribute, sample indices, their values) for each attribute in the batch; unknown values dropped."""
    attribute = batch["attribute"].to(device)
    values = batch["attr_value"].to(device)
    known = values >= 0
    for attr in attribute[known].unique().tolist():
        index = ((attribute == attr) & known).nonzero().squeeze(1)
        yield attr, index, values[index]


def _zero(like: torch.Tensor) -> torch.Tensor:
    # Connected to the graph so that backward() works even when no sample contributes.
    return like.sum() * 0.0


@LOSSES.register("attribute_bce")
class AttributeBCELoss(nn.Module):
    """Weighted BCE of each sample's value logits against the one-hot of its value.

    Only the value slots valid for the sample's attribute (``attr_value_mask``) count. One value is
    positive and V-1 are negative, so unweighted BCE is minimised early by saying "no" everywhere;
    ``pos_weight=None`` (default) weights the positive by V-1 of the sample's attribute so positive
    and negative evidence weigh the same. A number sets a fixed weight instead. The result is the
    mean over valid slots, i.e. ``binary_cross_entropy_with_logits(pos_weight=...)`` restricted to
    the mask.
    """

    def __init__(self, pos_weight: float | None = None):
        super().__init__()
        if pos_weight is not None and pos_weight <= 0:
            raise ConfigError(f"attribute_bce: pos_weight must be positive, got {pos_weight}")
        self.pos_weight = pos_weight

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        logits = outputs["attr_value_logits"]
        mask = outputs["attr_value_mask"].bool()
        values = batch["attr_value"].to(logits.device)
        mask = mask & (values >= 0)[:, None]
        target = F.one_hot(values.clamp(min=0), logits.shape[1]).to(logits.dtype)
        if self.pos_weight is None:
            weight = (mask.sum(dim=1, keepdim=True) - 1).clamp(min=1).to(logits.dtype)
        else:
            weight = torch.full_like(logits[:, :1], float(self.pos_weight))
        per_slot = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight, reduction="none")
        if not mask.any():
            return _zero(logits)
        return per_slot[mask].mean()


@LOSSES.register("attribute_triplet")
class AttributeTripletLoss(nn.Module):
    """Instance-level triplet loss inside each attribute's space.

    Anchor and positive share the attribute value, the negative has another value of the same
    attribute. Distances are cosine (pytorch-metric-learning's ``CosineSimilarity`` normalises the
    embeddings), hinge ``[s(a, n) - s(a, p) + margin]_+``. ``mining="all"`` (default): every valid
    triplet, closest to the papers' random triplets; ``"batch_hard"``: per anchor the farthest
    positive and the closest negative (PML ``BatchHardMiner``), which noisy attribute labels make
    a poor choice (docs/models.md). ``reduction="nonzero_mean"`` averages over triplets that still violate the margin
    (keeps the gradient from vanishing as most triplets become easy); ``"mean"`` over all triplets.
    With several attributes in one batch, each group's loss is weighted by its size.
    """

    def __init__(self, margin: float = 0.2, mining: str = "all", reduction: str = "nonzero_mean"):
        super().__init__()
        from pytorch_metric_learning import distances, losses, miners, reducers

        if mining not in ("batch_hard", "all"):
            raise ConfigError(f"attribute_triplet: unknown mining '{mining}'; use batch_hard or all")
        if reduction not in ("nonzero_mean", "mean"):
            raise ConfigError(f"attribute_triplet: unknown reduction '{reduction}'; use nonzero_mean or mean")
        distance = distances.CosineSimilarity()
        reducer = reducers.AvgNonZeroReducer() if reduction == "nonzero_mean" else reducers.MeanReducer()
        self.triplet = losses.TripletMarginLoss(margin=margin, distance=distance, reducer=reducer)
        self.miner = miners.BatchHardMiner(distance=distance) if mining == "batch_hard" else None

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        embeddings = _metric_embeddings(outputs)
        total, counted = _zero(embeddings), 0
        for _, index, values in _attribute_groups(batch, embeddings.device):
            if values.unique().numel() < 2:
                continue  # no negative for anyone in this group
            group = embeddings[index]
            triplets = self.miner(group, values) if self.miner is not None else None
            total = total + self.triplet(group, values, triplets) * index.numel()
            counted += index.numel()
        return total / max(counted, 1)


@LOSSES.register("cluster_triplet")
class ClusterTripletLoss(nn.Module):
    """M3-Net's cluster-level triplet: each embedding must be closer to its own class center than to
    the nearest other class center of the same attribute, by ``margin`` (cosine distance on
    normalised embeddings; a class is an (attribute, value) pair; a center is the normalised mean).

    ``centers="batch"``: centers are the means of the batch's normalised embeddings per class (the
    sample itself included), with gradient, so the loss also pulls whole clusters apart; it needs
    at least two values of an attribute in the batch, which the P×K sampler guarantees.
    ``centers="ema"``: centers are buffers [A, max_values, feat_dim] updated as an exponential moving
    average of batch means (``momentum``) after the loss is computed, without gradient. Negatives
    then include values absent from the batch, at the cost of slightly stale centers; needs
    ``attribute_sizes`` and ``feat_dim`` (passed by the objective builder).
    """

    def __init__(self, margin: float = 0.2, centers: str = "batch", momentum: float = 0.9,
                 attribute_sizes: Sequence[int] | None = None, feat_dim: int | None = None):
        super().__init__()
        if centers not in ("batch", "ema"):
            raise ConfigError(f"cluster_triplet: unknown centers '{centers}'; use batch or ema")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"cluster_triplet: momentum must be in [0, 1), got {momentum}")
        self.margin = margin
        self.mode = centers
        self.momentum = momentum
        if centers == "ema":
            if not attribute_sizes or not feat_dim:
                raise ConfigError("cluster_triplet with centers: ema needs attribute_sizes and feat_dim")
            self.register_buffer("centers", torch.zeros(len(attribute_sizes), max(attribute_sizes), feat_dim))
            self.register_buffer("initialised", torch.zeros(len(attribute_sizes), max(attribute_sizes), dtype=torch.bool))

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        embeddings = F.normalize(_metric_embeddings(outputs), dim=1)
        total, counted = _zero(embeddings), 0
        for attr, index, values in _attribute_groups(batch, embeddings.device):
            group = embeddings[index]
            classes, inverse = values.unique(return_inverse=True)
            one_hot = F.one_hot(inverse, classes.numel()).to(group.dtype)  # [n, k]
            batch_means = (one_hot.t() @ group) / one_hot.sum(0)[:, None]
            if self.mode == "batch":
                centers, own = F.normalize(batch_means, dim=1), inverse
                available = torch.ones(classes.numel(), dtype=torch.bool, device=group.device)
            else:
                if self.training:
                    self._update(attr, classes, batch_means.detach().to(self.centers.dtype))
                centers, own = F.normalize(self.centers[attr], dim=1).to(group.dtype), values
                available = self.initialised[attr]
                has_center = available[own]  # in eval mode a class may not have a center yet
                group, own, index = group[has_center], own[has_center], index[has_center]
            if int(available.sum()) < 2:
                continue
            distance = 1.0 - group @ centers.t()  # [n, classes]
            own_distance = distance.gather(1, own[:, None]).squeeze(1)
            others = distance.masked_fill(~available[None, :], float("inf"))
            others = others.scatter(1, own[:, None], float("inf"))
            nearest_other = others.min(dim=1).values
            total = total + F.relu(own_distance - nearest_other + self.margin).sum()
            counted += index.numel()
        return total / max(counted, 1)

    @torch.no_grad()
    def _update(self, attr: int, classes: torch.Tensor, batch_means: torch.Tensor) -> None:
        # Updated before the distances are taken so that a class seen for the first time has a center.
        fresh = ~self.initialised[attr, classes]
        blended = self.momentum * self.centers[attr, classes] + (1.0 - self.momentum) * batch_means
        self.centers[attr, classes] = torch.where(fresh[:, None], batch_means, blended)
        self.initialised[attr, classes] = True


@LOSSES.register("multihead_ce")
class MultiHeadCrossEntropy(nn.Module):
    """Cross-entropy of every attribute head at once (``outputs["all_attr_logits"]``, a list of
    [B, V_a]) against ``batch["attrs"]`` [B, A]; -1 (missing) is ignored. ``reduction="sum"``
    (default) adds the per-attribute means, so every labelled attribute of an image trains its
    head in every step; ``"mean"`` divides by the number of attributes labelled in the batch."""

    def __init__(self, reduction: str = "sum", label_smoothing: float = 0.0):
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ConfigError(f"multihead_ce: unknown reduction '{reduction}'; use sum or mean")
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        all_logits = outputs["all_attr_logits"]
        attrs = batch["attrs"].to(all_logits[0].device)
        if attrs.shape[1] != len(all_logits):
            raise ValueError(f"multihead_ce: batch has {attrs.shape[1]} attributes, model has {len(all_logits)} heads")
        total, labelled = _zero(all_logits[0]), 0
        for attr, logits in enumerate(all_logits):
            target = attrs[:, attr]
            if not bool((target >= 0).any()):
                continue  # cross_entropy over zero targets is NaN
            total = total + F.cross_entropy(logits, target, ignore_index=-1, label_smoothing=self.label_smoothing)
            labelled += 1
        return total if self.reduction == "sum" else total / max(labelled, 1)
