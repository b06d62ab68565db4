"""Loss terms for attribute-specific retrieval (ASEN, M3-Net, the classifier baseline).

Batch keys read here: ``attribute`` LongTensor[B] (the attribute each sample is embedded for),
``attr_value`` LongTensor[B] (its value for that attribute, -1 = unknown; the lowest when it has
several), ``attr_value_multi_hot`` FloatTensor[B, max_values] (optional: every value the sample has
for that attribute), ``attrs`` LongTensor[B, A] (all attribute values, -1 = missing). Embeddings
are only ever compared between samples that share ``attribute``: embeddings for different
attributes live in different spaces.

Multi-label attributes (DeepFashion's types: an image may be floral and striped): with
``attr_value_multi_hot`` in the batch, the weighted BCE takes every value of the sample as a
positive, and two samples are positives of a triplet when they share at least one value,
negatives when they share none; a class of the cluster triplet holds every sample that has its
value. With one value per sample all of this is the single-label loss exactly. The papers train
on single-label FashionAI and DARN and do not spell the multi-label case out; "shares a value"
is our reading, chosen to match the evaluation's relevance.
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


def _value_sets(batch: dict, index: torch.Tensor, values: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """[n, width] bool: the values each sample of a group has for the group's attribute, all of
    them from ``attr_value_multi_hot`` when the batch has it, else its one ``attr_value``.
    ``width`` defaults to the multi-hot's (else the largest value + 1)."""
    multi = batch.get("attr_value_multi_hot")
    if multi is None:
        return F.one_hot(values, width or int(values.max()) + 1).bool()
    sets = multi.to(index.device)[index] > 0
    if width is not None and width != sets.shape[1]:
        sets = F.pad(sets, (0, max(0, width - sets.shape[1])))[:, :width]
    return sets


def _shared_value_triplets(embeddings: torch.Tensor, shares: torch.Tensor, hardest: bool):
    """(anchor, positive, negative) indices: positive shares a value with the anchor, negative
    none. ``hardest``: per anchor only the least similar positive and the most similar negative
    (cosine), as PML's ``BatchHardMiner`` picks them from labels; else every such triplet."""
    positive = shares & ~torch.eye(shares.shape[0], dtype=torch.bool, device=shares.device)
    negative = ~shares
    if hardest:
        with torch.no_grad():
            normalised = F.normalize(embeddings, dim=1)
            similarity = normalised @ normalised.t()
        usable = positive.any(1) & negative.any(1)
        anchors = usable.nonzero().squeeze(1)
        positives = similarity.masked_fill(~positive, float("inf")).argmin(1)[anchors]
        negatives = similarity.masked_fill(~negative, float("-inf")).argmax(1)[anchors]
        return anchors, positives, negatives
    anchors, positives, negatives = (positive[:, :, None] & negative[:, None, :]).nonzero(as_tuple=True)
    return anchors, positives, negatives


def _zero(like: torch.Tensor) -> torch.Tensor:
    # Connected to the graph so that backward() works even when no sample contributes.
    return like.sum() * 0.0


def _weighted_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                  pos_weight: float | None) -> torch.Tensor:
    """Mean BCE over the ``mask``ed slots, positives weighted by (negatives / positives) of their
    row when ``pos_weight`` is None, else by that number."""
    if not mask.any():
        return _zero(logits)
    if pos_weight is None:
        positives = (target * mask).sum(dim=1, keepdim=True)
        negatives = mask.sum(dim=1, keepdim=True) - positives
        weight = (negatives.clamp(min=1) / positives.clamp(min=1)).to(logits.dtype)
    else:
        weight = torch.full_like(logits[:, :1], float(pos_weight))
    per_slot = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight, reduction="none")
    return per_slot[mask].mean()


def _per_attribute_multi_hot(all_logits: Sequence[torch.Tensor], batch: dict, loss: str
                             ) -> list[torch.Tensor | None]:
    """Each attribute's columns of the flat ``attr_multi_hot`` (``LabelSpace.encode``'s layout,
    the heads' order), or None per attribute when the batch has no multi-hot."""
    multi_hot = batch.get("attr_multi_hot")
    if multi_hot is None:
        return [None] * len(all_logits)
    sizes = [logits.shape[1] for logits in all_logits]
    if multi_hot.shape[1] != sum(sizes):
        raise ValueError(f"{loss}: attr_multi_hot has {multi_hot.shape[1]} values, the heads {sum(sizes)}")
    return list(multi_hot.to(all_logits[0].device).split(sizes, dim=1))


@LOSSES.register("attribute_bce")
class AttributeBCELoss(nn.Module):
    """Weighted BCE of each sample's value logits against the multi-hot of its values (Loss 1 of
    M3-Net): the one-hot of ``attr_value``, or ``attr_value_multi_hot`` when the batch has it, so
    every value of a multi-label attribute is a positive.

    Only the value slots valid for the sample's attribute (``attr_value_mask``) count. With P of
    the V values positive, unweighted BCE is minimised early by saying "no" everywhere;
    ``pos_weight=None`` (default) weights the positives by (V-P)/P of the sample (V-1 for one
    value), so positive and negative evidence weigh the same. A number sets a fixed weight
    instead. The result is the mean over valid slots, i.e.
    ``binary_cross_entropy_with_logits(pos_weight=...)`` restricted to the mask.

    ``every_attribute: true``: the same BCE for every labelled attribute of every image, from the
    model's ``all_attr_logits`` (M3-Net with ``classify_every_attribute``) against ``attrs`` /
    ``attr_multi_hot``; the per-attribute means are summed, so each attribute's classifier gets in
    every step the signal it gets when a batch is sampled for it (as ``multihead_ce`` sums its heads).
    """

    def __init__(self, pos_weight: float | None = None, every_attribute: bool = False):
        super().__init__()
        if pos_weight is not None and pos_weight <= 0:
            raise ConfigError(f"attribute_bce: pos_weight must be positive, got {pos_weight}")
        self.pos_weight = pos_weight
        self.every_attribute = bool(every_attribute)

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        if self.every_attribute:
            return self._every_attribute(outputs, batch)
        logits = outputs["attr_value_logits"]
        mask = outputs["attr_value_mask"].bool()
        values = batch["attr_value"].to(logits.device)
        mask = mask & (values >= 0)[:, None]
        if "attr_value_multi_hot" in batch:
            every = torch.arange(values.shape[0], device=logits.device)
            target = _value_sets(batch, every, values, logits.shape[1]).to(logits.dtype)
        else:
            target = F.one_hot(values.clamp(min=0), logits.shape[1]).to(logits.dtype)
        return _weighted_bce(logits, target, mask, self.pos_weight)

    def _every_attribute(self, outputs: dict, batch: dict) -> torch.Tensor:
        if "all_attr_logits" not in outputs:
            raise ConfigError("attribute_bce with every_attribute: true needs a model that classifies every "
                              "attribute in training (m3_net: model.kwargs.classify_every_attribute: true)")
        all_logits = outputs["all_attr_logits"]
        attrs = batch["attrs"].to(all_logits[0].device)
        if attrs.shape[1] != len(all_logits):
            raise ValueError(f"attribute_bce: batch has {attrs.shape[1]} attributes, the model classifies "
                             f"{len(all_logits)}")
        total = _zero(all_logits[0])
        hots = _per_attribute_multi_hot(all_logits, batch, "attribute_bce")
        for attr, (logits, hot) in enumerate(zip(all_logits, hots)):
            values = attrs[:, attr]
            target = hot.to(logits) if hot is not None else F.one_hot(values.clamp(min=0), logits.shape[1]).to(logits)
            total = total + _weighted_bce(logits, target, (values >= 0)[:, None].expand_as(logits), self.pos_weight)
        return total


@LOSSES.register("attribute_ce")
class AttributeCrossEntropy(nn.Module):
    """Softmax cross-entropy of each sample's value logits for the attribute it is embedded for
    (``attr_value_logits``; padded slots hold ``PADDED_LOGIT`` and get no probability), against
    ``attr_value`` (-1 ignored), or the uniform distribution over ``attr_value_multi_hot``'s
    values when a sample has several (as ``multihead_ce``).

    ``attribute_bce`` with a softmax instead of independent sigmoids: trained on a model with
    value logits (M3-Net, the attribute classifier), it separates what the loss's form does from
    what training one attribute per batch does (results/analysis.md, the M3-Net gap diagnosis)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        logits = outputs["attr_value_logits"]
        values = batch["attr_value"].to(logits.device)
        rows = values >= 0
        if not bool(rows.any()):
            return _zero(logits)
        if "attr_value_multi_hot" in batch:
            every = torch.arange(values.shape[0], device=logits.device)
            target = _value_sets(batch, every, values, logits.shape[1]).to(logits.dtype)[rows]
            target = target / target.sum(1, keepdim=True)
            return F.cross_entropy(logits[rows], target, label_smoothing=self.label_smoothing)
        return F.cross_entropy(logits[rows], values[rows], label_smoothing=self.label_smoothing)


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

    A group where a sample has several values (``attr_value_multi_hot``): anchor and positive
    share at least one value, the negative shares none; the triplets are formed from that mask
    (the same rule for ``batch_hard``) and passed to the same PML loss.
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
            group = embeddings[index]
            sets = _value_sets(batch, index, values) if "attr_value_multi_hot" in batch else None
            if sets is not None and bool((sets.sum(1) > 1).any()):
                shared = sets.to(group.dtype)
                triplets = _shared_value_triplets(group, (shared @ shared.t()) > 0, self.miner is not None)
                if triplets[0].numel() == 0:
                    continue  # nobody has both a positive and a negative
            else:  # one value per sample: "shares a value" is "same value"
                if values.unique().numel() < 2:
                    continue  # no negative for anyone in this group
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

    A sample with several values (``attr_value_multi_hot``) belongs to the class of each: it
    enters each of their centers, and pays the hinge once per own class against the nearest
    class it does not have, averaged over its own classes.
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
            width = self.centers.shape[1] if self.mode == "ema" else None
            sets = _value_sets(batch, index, values, width)  # [n, values]: the classes each sample is in
            classes = sets.any(0).nonzero().squeeze(1)
            members = sets[:, classes].to(group.dtype)  # [n, k]
            batch_means = (members.t() @ group) / members.sum(0)[:, None]
            if self.mode == "batch":
                centers, own = F.normalize(batch_means, dim=1), members.bool()
                available = torch.ones(classes.numel(), dtype=torch.bool, device=group.device)
            else:
                if self.training:
                    self._update(attr, classes, batch_means.detach().to(self.centers.dtype))
                centers = F.normalize(self.centers[attr], dim=1).to(group.dtype)
                available = self.initialised[attr]
                own = sets & available[None, :]  # in eval mode a class may not have a center yet
            if int(available.sum()) < 2:
                continue
            distance = 1.0 - group @ centers.t()  # [n, classes]
            others = distance.masked_fill(own | ~available[None, :], float("inf"))
            nearest_other = others.min(dim=1).values
            counts = own.sum(1)
            valid = (counts > 0) & torch.isfinite(nearest_other)
            if not bool(valid.any()):
                continue
            hinge = F.relu(distance - nearest_other[:, None] + self.margin).masked_fill(~own, 0.0)
            total = total + (hinge.sum(1)[valid] / counts[valid]).sum()
            counted += int(valid.sum())
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
    head in every step; ``"mean"`` divides by the number of attributes labelled in the batch.

    A multi-label attribute (an image with several values of one type, as DeepFashion's lists
    have; ``batch["attr_multi_hot"]``, the flat layout of ``LabelSpace.encode``) is trained
    towards the uniform distribution over the image's values, so the softmax embedding spreads
    over every value the image has and meets the images that share any of them (the benchmark's
    relevance). Our choice: the classifier is the reference baseline, not a paper's model; the
    alternative, the likelihood of the values' union, lets the head settle on one of them. A
    head whose images all have one value gets exactly the plain cross-entropy."""

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
        hots = _per_attribute_multi_hot(all_logits, batch, "multihead_ce")
        for attr, (logits, hot) in enumerate(zip(all_logits, hots)):
            target = attrs[:, attr]
            if not bool((target >= 0).any()):
                continue  # cross_entropy over zero targets is NaN
            hot = None if hot is None else hot.to(logits)
            if hot is not None and bool((hot.sum(1) > 1).any()):
                rows = target >= 0
                values = hot[rows]
                total = total + F.cross_entropy(logits[rows], values / values.sum(1, keepdim=True),
                                                label_smoothing=self.label_smoothing)
            else:
                total = total + F.cross_entropy(logits, target, ignore_index=-1, label_smoothing=self.label_smoothing)
            labelled += 1
        return total if self.reduction == "sum" else total / max(labelled, 1)
