"""The plain baseline attribute-specific retrieval must beat: one softmax head per attribute.

Backbone → global average pool → one linear head per attribute, trained with cross-entropy on every
attribute of every image (loss term ``multihead_ce``). For retrieval under attribute ``a`` the
embedding is either head ``a``'s softmax probabilities (images are similar when the classifier
believes the same values) or the shared pooled feature (the same vector for every attribute).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ConfigError
from . import MODELS
from .attention import PADDED_LOGIT, check_attribute_sizes, require_attribute, value_mask
from .backbones import BackboneSpec, build_backbone
from .base import RetrievalModel

EMBEDDINGS = ("softmax", "penultimate")


@MODELS.register("attribute_classifier")
class AttributeClassifier(RetrievalModel):
    """``embedding="softmax"``: feat_dim = max(attribute_sizes); the probabilities of head ``a`` are
    zero-padded to that width so every attribute's embedding has the same size (the padded slots
    are zero for every image of that attribute, so cosine similarity is unchanged).
    ``embedding="penultimate"``: feat_dim = backbone channels, identical for every attribute."""

    attribute_conditioned = True

    def __init__(
        self,
        attribute_sizes: Sequence[int],
        num_items: int | None = None,  # unused: the baseline learns from attribute values only
        backbone: BackboneSpec = "resnet18",
        embedding: str = "softmax",
        dropout: float = 0.0,
    ):
        super().__init__()
        if embedding not in EMBEDDINGS:
            raise ConfigError(f"attribute_classifier: unknown embedding '{embedding}'; use one of {', '.join(EMBEDDINGS)}")
        sizes = check_attribute_sizes(attribute_sizes, "attribute_classifier")
        self.attribute_sizes = sizes
        self.embedding_kind = embedding
        self.max_values = max(sizes)
        self.register_buffer("sizes", torch.tensor(sizes, dtype=torch.long), persistent=False)
        self.backbone = build_backbone(backbone)
        channels = self.backbone.channels[-1]
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(channels, size) for size in sizes)
        self.feat_dim = self.max_values if embedding == "softmax" else channels

    def forward(self, images: torch.Tensor, attribute: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        attribute = require_attribute(attribute, images.shape[0], "attribute_classifier").to(images.device)
        pooled = self.backbone(images)[-1].mean(dim=(2, 3))
        all_logits = [head(self.dropout(pooled)) for head in self.heads]
        padded = torch.stack([F.pad(logits, (0, self.max_values - logits.shape[1]), value=PADDED_LOGIT)
                              for logits in all_logits])  # [A, B, max_values]
        own_logits = padded[attribute, torch.arange(images.shape[0], device=images.device)]
        embedding = own_logits.softmax(dim=1) if self.embedding_kind == "softmax" else pooled
        outputs: dict[str, torch.Tensor | list[torch.Tensor]] = {"embedding": embedding}
        if self.training:
            outputs["features"] = embedding
            outputs["attr_value_logits"] = own_logits
            outputs["attr_value_mask"] = value_mask(self.sizes, attribute, self.max_values)
            outputs["all_attr_logits"] = all_logits
        return outputs

    def embed_attributes(self, images: torch.Tensor, attributes: Sequence[int]) -> list[torch.Tensor]:
        pooled = self.backbone(images)[-1].mean(dim=(2, 3))
        if self.embedding_kind != "softmax":
            return [pooled for _ in attributes]
        return [F.pad(self.heads[attribute](pooled).softmax(dim=1), (0, self.max_values - self.sizes[attribute]))
                for attribute in attributes]
