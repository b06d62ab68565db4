"""MMFL-Net: multi-scale and multi-granularity feature learning for consumer-to-shop retrieval.

A street photo and a shop photo of the same garment agree on the whole garment (shape, colour),
on its regions (collar, sleeves, hem) and on small details (buttons, prints, logos), while pose,
background and occlusion differ. MMFL-Net learns one embedding per view of the garment:

1. **semantic-spatial fusion** (``fusion.py``): FPN top-down + PANet bottom-up over C2..C5 →
   N2..N5, so every level has both semantics and spatial detail;
2. **global branch** on N5: pooled → BNNeck → ID classifier (and the multi-label attribute head);
3. **part branches** (MGN-style, Wang et al., "Learning Discriminative Features with Multiple
   Granularities for Person Re-Identification", ACM MM 2018) on N4: for each granularity g in
   ``part_stripes`` a granularity-specific conv block, then the whole map and g horizontal
   stripes, each pooled → 1×1 reduction (linear) → BNNeck → its own ID classifier. Stripes force
   every region to be discriminative on its own, which is robust to a region being occluded or
   cropped in the street photo;
4. **local-detail branch** on N3 (stride 8): a learned spatial attention map pools the cells it
   finds discriminative. Average or GeM pooling dilutes a button or a print occupying a few of
   the ~750 cells of a 256×192 image's N3; fixed max pooling keeps one cell per channel but also
   picks background clutter, while a learned softmax attention keeps what the ID loss rewards.

The retrieval embedding is the concatenation of all branches' post-BN embeddings (each branch
weighs by its width in the cosine), and the training outputs expose each branch for per-branch
losses.

Which features the metric losses see follows MGN: softmax ID loss on every branch, stripes
included (``branch_logits``), but triplet losses on each branch's whole-map feature only
(``features`` / ``branch_features`` leave the stripes out). A stripe sees a third of the garment,
and two photos of one garment may show that third differently (pose, crop, occlusion), so pulling
stripe features of a pair together is a noisy target, which MGN found to hurt. ``metric_on_stripes``
puts the stripes back, for the ablation. (The MMFL-Net paper was available only as an abstract;
the placement is MGN's, which the part branches follow.)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from ..registry import ConfigError
from . import MODELS
from .backbones import BackboneSpec, build_backbone
from .base import RetrievalModel
from .fusion import SemanticSpatialFusion
from .heads import BNNeck, MultiLabelAttributeHead, NeckOutput, check_attribute_sizes_or_none
from .pooling import build_pooling

LEVELS = (2, 3, 4, 5)  # N2..N5


def stripe_bounds(height: int, stripes: int) -> list[tuple[int, int]]:
    """Row ranges of ``stripes`` horizontal stripes, like adaptive pooling's bins: start
    floor(i·H/n), end ceil((i+1)·H/n), so uneven heights share a boundary row and no stripe is
    ever empty (end > start for any H ≥ 1). Only non-negative floor divisions: the ONNX tracer
    records them on traced sizes, and ONNX integer division truncates, unlike Python's // on
    negative numbers."""
    return [((i * height) // stripes, ((i + 1) * height + stripes - 1) // stripes) for i in range(stripes)]


class PartBranch(nn.Module):
    """One granularity: its own conv block (so granularities learn different features from the
    shared map), the whole map plus ``stripes`` horizontal stripes, one BNNeck each."""

    def __init__(self, channels: int, stripes: int, embedding_dim: int, num_items: int | None, pooling: str):
        super().__init__()
        self.stripes = stripes
        self.block = Conv2dNormActivation(channels, channels, 3)
        self.pool = build_pooling(pooling)
        self.necks = nn.ModuleList(BNNeck(channels, embedding_dim, num_items, reduce=True)
                                   for _ in range(stripes + 1))

    def forward(self, feature_map: torch.Tensor, with_logits: bool) -> list[NeckOutput]:
        x = self.block(feature_map)
        pooled = [self.pool(x)] + [self.pool(x[:, :, top:bottom]) for top, bottom in stripe_bounds(x.shape[2], self.stripes)]
        return [neck(p, with_logits) for neck, p in zip(self.necks, pooled)]


class AttentionPooling(nn.Module):
    """Softmax spatial attention over the map's cells; returns the attention-weighted mean
    [B, C]. At initialisation the scores are near zero, i.e. almost average pooling, and they
    sharpen onto discriminative cells as the branch's ID loss trains. The score layer has no bias:
    a softmax over locations ignores a constant shift, so a bias could never learn."""

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        self.score = nn.Sequential(Conv2dNormActivation(channels, hidden, 1), nn.Conv2d(hidden, 1, 1, bias=False))
        # Small, not zero: zero weights would also zero the gradient of the layer before.
        nn.init.normal_(self.score[-1].weight, std=0.01)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W], summing to 1 over H×W."""
        scores = self.score(x).float()
        return scores.flatten(1).softmax(dim=1).view_as(scores).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.attention(x)).sum(dim=(2, 3))


class LocalDetailBranch(nn.Module):
    def __init__(self, channels: int, embedding_dim: int, num_items: int | None):
        super().__init__()
        self.block = Conv2dNormActivation(channels, channels, 3)
        self.pool = AttentionPooling(channels)
        self.neck = BNNeck(channels, embedding_dim, num_items, reduce=True)

    def forward(self, feature_map: torch.Tensor, with_logits: bool) -> NeckOutput:
        return self.neck(self.pool(self.block(feature_map)), with_logits)


@MODELS.register("mmfl_net")
class MMFLNet(RetrievalModel):
    """Outputs (``forward(images)``, images RGB in [0, 1]):

    * always ``"embedding"`` [B, feat_dim]: the concatenated post-BN branch embeddings;
    * in train mode: ``"branch_logits"``: a list with one entry per branch in the order of
      ``branch_names`` (global, then per granularity g: ``part{g}``, ``part{g}_stripe{i}``, then
      ``local``); ``"branch_features"`` (pre-BN) and their concatenation ``"features"``
      [B, features_dim], for the branches of ``metric_branch_names``: every branch but the stripes,
      or all of them with ``metric_on_stripes``; ``"logits"`` = the global branch's ID logits, and
      ``"attr_logits"`` [B, V_total] from the global embedding when ``attribute_sizes`` is given.

    feat_dim = embedding_dim × (1 + Σ_g (g + 1) [part branches] + 1 [local branch]):
    2304 with the defaults (9 branches × 256).
    """

    def __init__(
        self,
        num_items: int | None = None,
        attribute_sizes: Sequence[int] | None = None,
        backbone: BackboneSpec = "resnet18",
        fusion_channels: int = 256,
        embedding_dim: int = 256,
        pooling: str = "gem",
        part_stripes: Sequence[int] = (2, 3),
        part_level: int = 4,
        local_level: int = 3,
        use_part_branches: bool = True,
        use_local_branch: bool = True,
        metric_on_stripes: bool = False,
    ):
        super().__init__()
        for name, level in (("part_level", part_level), ("local_level", local_level)):
            if level not in LEVELS:
                raise ConfigError(f"mmfl_net: {name} must be one of {LEVELS} (N2..N5), got {level}")
        stripes = [int(g) for g in part_stripes] if use_part_branches else []
        if any(g < 1 for g in stripes) or (use_part_branches and not stripes):
            raise ConfigError(f"mmfl_net: part_stripes must be positive stripe counts, got {list(part_stripes)}")
        self.part_level, self.local_level = part_level, local_level

        self.backbone = build_backbone(backbone, default_last_stride=1)
        self.fusion = SemanticSpatialFusion(self.backbone.channels, fusion_channels, self.backbone.strides)
        self.global_pool = build_pooling(pooling)
        self.global_neck = BNNeck(fusion_channels, embedding_dim, num_items, reduce=True)
        self.part_branches = nn.ModuleList(
            PartBranch(fusion_channels, g, embedding_dim, num_items, pooling) for g in stripes)
        self.local_branch = LocalDetailBranch(fusion_channels, embedding_dim, num_items) if use_local_branch else None
        sizes = check_attribute_sizes_or_none(attribute_sizes, "mmfl_net")
        self.attribute_head = MultiLabelAttributeHead(embedding_dim, sizes) if sizes else None

        self.branch_names = ["global"]
        for g in stripes:
            self.branch_names += [f"part{g}"] + [f"part{g}_stripe{i}" for i in range(g)]
        if use_local_branch:
            self.branch_names.append("local")
        self.feat_dim = embedding_dim * len(self.branch_names)
        self.metric_branch_names = [name for name in self.branch_names
                                    if metric_on_stripes or "_stripe" not in name]
        self._metric_branches = [self.branch_names.index(name) for name in self.metric_branch_names]
        self._features_dim = embedding_dim * len(self.metric_branch_names)

    @property
    def features_dim(self) -> int:
        """Width of ``"features"``: the metric branches only (the stripes are left out by default)."""
        return self._features_dim

    def forward(self, images: torch.Tensor, attribute: torch.Tensor | None = None) -> dict:
        del attribute  # one embedding for every attribute: accepted so all models share a call
        fused = dict(zip(LEVELS, self.fusion(self.backbone(images))))
        with_logits = self.training
        global_out = self.global_neck(self.global_pool(fused[5]), with_logits)
        branches = [global_out]
        for part in self.part_branches:
            branches += part(fused[self.part_level], with_logits)
        if self.local_branch is not None:
            branches.append(self.local_branch(fused[self.local_level], with_logits))

        outputs: dict = {"embedding": torch.cat([b.embedding for b in branches], dim=1)}
        if self.training:
            metric_features = [branches[i].features for i in self._metric_branches]
            outputs["features"] = torch.cat(metric_features, dim=1)
            outputs["branch_features"] = metric_features
            if global_out.logits is not None:
                outputs["logits"] = global_out.logits
                outputs["branch_logits"] = [b.logits for b in branches]
            if self.attribute_head is not None:
                outputs["attr_logits"] = self.attribute_head(global_out.embedding)
        return outputs
