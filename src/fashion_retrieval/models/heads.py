"""Embedding and classification heads shared by the consumer-to-shop models."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..registry import ConfigError


class NeckOutput(NamedTuple):
    features: torch.Tensor  # before BatchNorm: what metric losses (triplet, center) read
    embedding: torch.Tensor  # after BatchNorm: the retrieval embedding
    logits: torch.Tensor | None  # ID classes, None without a classifier


class BNNeck(nn.Module):
    """BNNeck (Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person
    Re-identification", CVPRW 2019): optional linear reduction → BatchNorm1d → bias-free classifier.
    The reduction exists when ``embedding_dim`` differs from ``in_dim`` or with ``reduce=True``
    (branches that share an input need their own projection to learn different features).

    Triplet-style losses act on the features before the BatchNorm, cross-entropy on the normalised
    ones after it, so the two losses stop pulling one space in different directions. The BN bias
    is frozen at zero and the classifier has no bias, so the classes are separated by angle around
    the origin, which is what cosine retrieval on the post-BN embedding measures.
    """

    def __init__(self, in_dim: int, embedding_dim: int | None = None, num_classes: int | None = None,
                 reduce: bool = False):
        super().__init__()
        embedding_dim = embedding_dim or in_dim
        self.reduce: nn.Module = nn.Identity()
        if reduce or embedding_dim != in_dim:
            self.reduce = nn.Linear(in_dim, embedding_dim, bias=False)
            nn.init.kaiming_normal_(self.reduce.weight, mode="fan_out")
        self.bn = nn.BatchNorm1d(embedding_dim)
        self.bn.bias.requires_grad_(False)
        self.classifier: nn.Linear | None = None
        if num_classes:
            self.classifier = nn.Linear(embedding_dim, num_classes, bias=False)
            # Small weights: the first logits are near uniform, so the ID loss starts at log(C)
            # instead of pushing large random gradients into the pretrained backbone.
            nn.init.normal_(self.classifier.weight, std=0.001)
        self.embedding_dim = embedding_dim

    def forward(self, pooled: torch.Tensor, with_logits: bool = True) -> NeckOutput:
        features = self.reduce(pooled)
        embedding = self.bn(features)
        logits = self.classifier(embedding) if with_logits and self.classifier is not None else None
        return NeckOutput(features, embedding, logits)


def check_attribute_sizes_or_none(attribute_sizes: Sequence[int] | None, model: str) -> list[int] | None:
    """None or an empty list: no attribute head (consumer-to-shop data often has no attributes)."""
    if not attribute_sizes:
        return None
    sizes = [int(v) for v in attribute_sizes]
    if any(v < 1 for v in sizes):
        raise ConfigError(f"{model}: every attribute needs at least one value; got attribute_sizes={sizes}")
    return sizes


class MultiLabelAttributeHead(nn.Module):
    """One logit per attribute value over all attributes (V_total = sum of attribute_sizes), for
    multi-label BCE against ``batch["attr_multi_hot"]``: an image may have several values."""

    def __init__(self, in_dim: int, attribute_sizes: Sequence[int]):
        super().__init__()
        self.attribute_sizes = [int(v) for v in attribute_sizes]
        self.linear = nn.Linear(in_dim, sum(self.attribute_sizes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)
