"""ASEN: Attribute-Specific Embedding Network (Ma et al., AAAI 2020) with the ASEN++ local branch
(Dong et al., "Fine-Grained Fashion Similarity Prediction by Attribute-Specific Embedding
Learning", TIP 2021).

One network learns one embedding space per attribute: the attribute index selects an attribute
embedding, which steers an attribute-aware spatial attention (where on the garment to look) and an
attribute-aware channel attention (which patterns matter there). Similarity for attribute ``a`` is
the cosine between two images' embeddings computed with ``a``.

The attention blocks and the per-attribute value classifier live in ``attention.py``, shared with
M3-Net (``m3_net.py``) and the classifier baseline (``attribute_classifier.py``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ConfigError
from . import MODELS
from .attention import ConditionedAttentionPool, check_attribute_sizes, require_attribute
from .backbones import BackboneSpec, build_backbone
from .base import RetrievalModel, per_image

def attention_box(attention_map: torch.Tensor, image_size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Image-space box [B, 4] (x1, y1, x2, y2) around the cells whose attention is at least
    ``threshold`` × the uniform weight 1/(h·w) (capped at the maximum so the box is never empty)."""
    batch, height, width = attention_map.shape
    flat = attention_map.flatten(1)
    level = torch.minimum(torch.full_like(flat[:, :1], threshold / (height * width)), flat.max(1, keepdim=True).values)
    keep = (flat >= level).view(batch, height, width)
    rows = torch.arange(height, device=keep.device)
    cols = torch.arange(width, device=keep.device)
    any_row, any_col = keep.any(2), keep.any(1)
    big = max(height, width) + 1
    y1 = torch.where(any_row, rows, big).min(1).values
    y2 = torch.where(any_row, rows, -1).max(1).values + 1
    x1 = torch.where(any_col, cols, big).min(1).values
    x2 = torch.where(any_col, cols, -1).max(1).values + 1
    image_h, image_w = image_size
    scale = torch.tensor([image_w / width, image_h / height] * 2, device=keep.device)
    return torch.stack([x1, y1, x2, y2], dim=1).float() * scale


ATTENTION_STAGES = {"c4": 3, "c5": 4}  # how many backbone levels the branch keeps


class AsenBranch(nn.Module):
    """Backbone C5 (or C4) → attribute embedding → spatial + channel attention → FC (one ASEN stream)."""

    def __init__(self, backbone: BackboneSpec, num_attributes: int, embedding_dim: int, attr_dim: int, joint_dim: int, channel_reduction: int,
                 attention_stage: str = "c5", spatial_tanh: bool = False):
        super().__init__()
        self.backbone = build_backbone(backbone)
        # Reading C4, the last stage would only cost compute and leave parameters without gradient.
        self.backbone.keep_levels(ATTENTION_STAGES[attention_stage])
        channels = self.backbone.channels[-1]
        self.attribute_embedding = nn.Embedding(num_attributes, attr_dim)
        self.attention = ConditionedAttentionPool(channels, attr_dim, joint_dim, channel_reduction, spatial_tanh)
        self.fc = nn.Linear(channels, embedding_dim)

    def forward(self, images: torch.Tensor, attribute: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attend(self.backbone(images)[-1], attribute)

    def attend(self, feature_map: torch.Tensor, attribute: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding, attention map) from the backbone's last kept map, for one attribute index per image."""
        pooled, attention_map = self.attention(feature_map, self.attribute_embedding(attribute))
        return self.fc(pooled), attention_map


@MODELS.register("asen")
class ASEN(RetrievalModel):
    """ASEN (AAAI 2020); ``local_branch=True`` adds the ASEN++ local branch.

    ``attention_stage="c4"`` + ``spatial_tanh=True`` is the authors' variant: their public code
    (github.com/Maryeon/asen, ``ASENet``) attends over ResNet's layer3 (C4, stride 16: 14×14 at
    224 px) and applies tanh to the location scores before the spatial softmax. The default
    (C5, no tanh) is our reading of the paper's text, kept for the existing results.

    Without the local branch ``embedding`` is the FC output [B, embedding_dim]. With it, a second
    branch re-encodes the crop of the image around the global branch's attention map, and
    ``embedding`` = [normalise(global), normalise(local)] ([B, 2·embedding_dim]) so that its cosine
    is the mean of the two branches' cosines, ASEN++'s summed similarity.
    """

    attribute_conditioned = True

    def __init__(
        self,
        attribute_sizes: Sequence[int],
        num_items: int | None = None,  # unused: ASEN learns from attribute values only
        backbone: BackboneSpec = "resnet18",
        embedding_dim: int = 1024,
        attr_dim: int = 512,
        joint_dim: int = 512,
        channel_reduction: int = 4,
        local_branch: bool = False,
        local_threshold: float = 1.0,
        attention_stage: str = "c5",
        spatial_tanh: bool = False,
    ):
        super().__init__()
        sizes = check_attribute_sizes(attribute_sizes, "asen")
        if attention_stage not in ATTENTION_STAGES:
            raise ConfigError(f"asen: attention_stage must be one of {', '.join(ATTENTION_STAGES)}, "
                              f"got {attention_stage!r}")
        self.attribute_sizes = sizes
        branch_args = (backbone, len(sizes), embedding_dim, attr_dim, joint_dim,
                       channel_reduction, attention_stage, spatial_tanh)
        self.global_branch = AsenBranch(*branch_args)
        # ASEN++ gives the local branch its own parameters: the crop is a different input distribution.
        self.local_branch = AsenBranch(*branch_args) if local_branch else None
        self.local_threshold = local_threshold
        self.feat_dim = embedding_dim * (2 if local_branch else 1)

    def forward(self, images: torch.Tensor, attribute: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        attribute = require_attribute(attribute, images.shape[0], "asen").to(images.device)
        global_embedding, attention_map = self.global_branch(images, attribute)
        if self.local_branch is None:
            outputs: dict[str, torch.Tensor | list[torch.Tensor]] = {"embedding": global_embedding}
            if self.training:
                outputs["features"] = global_embedding
            return outputs
        local_embedding = self.local_branch(self._crop(images, attention_map), attribute)[0]
        embedding = torch.cat([F.normalize(global_embedding, dim=1), F.normalize(local_embedding, dim=1)], dim=1)
        outputs = {"embedding": embedding}
        if self.training:
            outputs["features"] = embedding
            outputs["branch_features"] = [global_embedding, local_embedding]
        return outputs

    def embed_attributes(self, images: torch.Tensor, attributes: Sequence[int]) -> list[torch.Tensor]:
        if self.local_branch is not None:  # ASEN++ crops per attribute: its local pass cannot be shared
            return super().embed_attributes(images, attributes)
        feature_map = self.global_branch.backbone(images)[-1]
        return [self.global_branch.attend(feature_map, per_image(attribute, images))[0] for attribute in attributes]

    def _crop(self, images: torch.Tensor, attention_map: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        height, width = images.shape[-2:]
        with torch.no_grad():  # the box is a discrete choice; ASEN++ does not backpropagate through it
            boxes = attention_box(attention_map.detach(), (height, width), self.local_threshold)
        index = torch.arange(images.shape[0], device=images.device, dtype=boxes.dtype)[:, None]
        # Resample the crop back to the input size, as ASEN++ resizes the attended region.
        return roi_align(images, torch.cat([index, boxes], dim=1), output_size=(height, width),
                         spatial_scale=1.0, sampling_ratio=2, aligned=True)

