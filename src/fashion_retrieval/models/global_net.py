"""The global-embedding baseline for consumer-to-shop retrieval (and the DML model).

backbone → pool C5 → BNNeck: one vector per image. This is the strong re-identification baseline
(Luo et al., "Bag of Tricks", 2019) the multi-branch MMFL-Net is compared against, and the
embedding network the DML margin losses train.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import MODELS
from .backbones import BackboneSpec, build_backbone
from .base import RetrievalModel
from .heads import BNNeck, MultiLabelAttributeHead, check_attribute_sizes_or_none
from .pooling import build_pooling


@MODELS.register("global_net")
class GlobalNet(RetrievalModel):
    """Outputs (``forward(images)``, images RGB in [0, 1]):

    * always ``"embedding"`` [B, feat_dim]: post-BN, the retrieval embedding;
    * in train mode also ``"features"`` [B, feat_dim] (pre-BN, for metric losses), ``"logits"``
      [B, num_items] when ``num_items`` is given, ``"attr_logits"`` [B, V_total] when
      ``attribute_sizes`` is given.

    ``embedding_dim``: None keeps the backbone width (no reduction layer).
    ``backbone``: a name or a ``model.backbone`` section; its ``last_stride`` defaults to 1 here,
    which removes the backbone's last downsampling: C5 keeps stride 16, a finer final
    map that re-identification models use for small details, for 4× the positions (and compute)
    in the last stage.
    """

    def __init__(
        self,
        num_items: int | None = None,
        attribute_sizes: Sequence[int] | None = None,
        backbone: BackboneSpec = "resnet18",
        pooling: str = "gem",
        embedding_dim: int | None = 512,
    ):
        super().__init__()
        self.backbone = build_backbone(backbone, default_last_stride=1)
        self.pool = build_pooling(pooling)
        self.neck = BNNeck(self.backbone.channels[-1], embedding_dim, num_items)
        sizes = check_attribute_sizes_or_none(attribute_sizes, "global_net")
        self.attribute_head = MultiLabelAttributeHead(self.neck.embedding_dim, sizes) if sizes else None
        self.feat_dim = self.neck.embedding_dim

    def forward(self, images: torch.Tensor, attribute: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        del attribute  # one embedding for every attribute: accepted so all models share a call
        neck = self.neck(self.pool(self.backbone(images)[-1]), with_logits=self.training)
        outputs = {"embedding": neck.embedding}
        if self.training:
            outputs["features"] = neck.features
            if neck.logits is not None:
                outputs["logits"] = neck.logits
            if self.attribute_head is not None:
                outputs["attr_logits"] = self.attribute_head(neck.embedding)
        return outputs
