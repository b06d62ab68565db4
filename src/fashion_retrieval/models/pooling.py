"""Global pooling of a feature map [B, C, H, W] into a vector [B, C], chosen by name.

``gem``: generalised mean (Radenović et al., "Fine-tuning CNN Image Retrieval with No Human
Annotation", TPAMI 2018), ``(mean x^p)^(1/p)`` with a learnable ``p``: p = 1 is average pooling,
p → ∞ max pooling, and retrieval training typically settles near p ≈ 3, between the two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ConfigError, Registry

# A model's ``pooling=`` argument names one of these; a new pooling is one registered class here.
POOLINGS: Registry = Registry("pooling")


@POOLINGS.register("gem")
class GeM(nn.Module):
    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True):
        super().__init__()
        if p <= 0:
            raise ConfigError(f"GeM p must be positive, got {p}")
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps  # x^p needs x > 0; ReLU outputs are often exactly 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32: under float16 autocast x^p for p ≈ 3 underflows small activations to 0
        p = self.p.float().clamp(min=1.0)  # below 1 the "mean" favours the weakest activations
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(2, 3))
        return pooled.pow(1.0 / p).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}"


@POOLINGS.register("avg")
class AvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@POOLINGS.register("max")
class MaxPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))


def build_pooling(name: str) -> nn.Module:
    return POOLINGS.build(name)
