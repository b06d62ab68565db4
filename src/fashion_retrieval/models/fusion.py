"""Semantic-spatial fusion of the backbone pyramid C2..C5 into N2..N5 (MMFL-Net's fusion).

Deep levels know *what* a garment is but have coarse positions; shallow levels keep the fine
spatial detail (stitching, prints, buttons) but little semantics. Two passes mix them:

1. top-down (FPN, Lin et al., CVPR 2017, torchvision's ``FeaturePyramidNetwork``): lateral 1×1
   convolutions to a common width, upsample-and-add from coarse to fine, 3×3 smoothing → P2..P5,
   so fine levels receive semantics;
2. bottom-up path aggregation (PANet, Liu et al., CVPR 2018): N2 = P2 and
   N(i+1) = conv3×3(conv3×3_stride2(N(i)) + P(i+1)), a short path that carries the fine spatial
   detail back up to the coarse levels (through a handful of layers instead of the whole
   backbone).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from ..registry import ConfigError


class SemanticSpatialFusion(nn.Module):
    """[C2, C3, C4, C5] → [N2, N3, N4, N5], each with ``channels`` channels and the resolution of
    its input level. ``strides`` are the input levels' strides, e.g. (4, 8, 16, 16) for a backbone
    with ``last_stride=1``: where two levels share a resolution the bottom-up step does not
    downsample. BatchNorm in every convolution: the fusion starts from random weights on top of a
    pretrained backbone and BN keeps its output scale in check from the first step."""

    def __init__(self, in_channels: Sequence[int], channels: int = 256, strides: Sequence[int] = (4, 8, 16, 32)):
        super().__init__()
        if len(in_channels) != len(strides):
            raise ConfigError(f"fusion: {len(in_channels)} input levels but {len(strides)} strides")
        ratios = [coarse // fine for fine, coarse in zip(strides, strides[1:])]
        if any(r not in (1, 2) for r in ratios):
            raise ConfigError(f"fusion: consecutive levels must have the same or double stride, got {list(strides)}")
        self.top_down = FeaturePyramidNetwork(list(in_channels), channels, norm_layer=nn.BatchNorm2d)
        self.downsample = nn.ModuleList(
            Conv2dNormActivation(channels, channels, 3, stride=ratio) for ratio in ratios)
        self.aggregate = nn.ModuleList(Conv2dNormActivation(channels, channels, 3) for _ in ratios)
        self.channels = channels

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        pyramid = list(self.top_down(OrderedDict((str(i), f) for i, f in enumerate(features))).values())
        fused = [pyramid[0]]
        for down, aggregate, lateral in zip(self.downsample, self.aggregate, pyramid[1:]):
            # A 3×3/2 conv with padding 1 halves rounding up, as the backbones do, so odd sizes match.
            fused.append(aggregate(down(fused[-1]) + lateral))
        return fused
