"""Attribute-conditioned attention and the per-attribute value classifier, shared by ASEN
(``asen.py``), M3-Net (``m3_net.py``) and the classifier baseline (``attribute_classifier.py``).

ASEN (Ma et al., AAAI 2020) introduced the pair of attentions steered by an attribute embedding:
a spatial one (where on the garment to look) and a channel one (which patterns matter there).
M3-Net runs the same pair a second time under a class-conditioned vector; the value classifier
and the attribute checks are what M3-Net and the classifier baseline have in common.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..registry import ConfigError

# Logit written into the padded value slots (values an attribute does not have): softmax gives them
# exactly zero probability, and it stays finite in float16 so no NaN can appear downstream.
PADDED_LOGIT = -1e4


def check_attribute_sizes(attribute_sizes: Sequence[int], model: str) -> list[int]:
    sizes = [int(v) for v in attribute_sizes]
    if not sizes:
        raise ConfigError(f"{model} needs attribute_sizes (values per attribute); got an empty list")
    bad = [v for v in sizes if v < 1]
    if bad:
        raise ConfigError(f"{model}: every attribute needs at least one value; got attribute_sizes={sizes}")
    return sizes


def require_attribute(attribute: torch.Tensor | None, batch_size: int, model: str) -> torch.Tensor:
    if attribute is None:
        raise ValueError(f"{model} is attribute-conditioned: call it as model(images, attribute=LongTensor[B])")
    attribute = torch.as_tensor(attribute, dtype=torch.long)
    if attribute.dim() == 0:  # one attribute for the whole batch
        attribute = attribute.expand(batch_size)
    if attribute.shape != (batch_size,):
        raise ValueError(f"{model}: attribute must have shape [{batch_size}], got {tuple(attribute.shape)}")
    return attribute


def value_mask(attribute_sizes: torch.Tensor, attribute: torch.Tensor, max_values: int) -> torch.Tensor:
    """[B, max_values] bool, True on the value slots that exist for each sample's attribute."""
    slots = torch.arange(max_values, device=attribute.device)
    return slots[None, :] < attribute_sizes.to(attribute.device)[attribute][:, None]


class AttributeSpatialAttention(nn.Module):
    """Where to look for this attribute: a softmax over the feature map's locations.

    As in ASEN, the feature map (1x1 conv) and the condition vector (linear) are mapped into a joint
    space with tanh, multiplied element-wise (the condition is replicated over locations) and scored
    by a 1x1 conv. The softmax weights pool the *original* features so the output stays in backbone
    feature space, which the channel attention then gates.
    """

    def __init__(self, in_channels: int, cond_dim: int, joint_dim: int = 512, score_tanh: bool = False):
        super().__init__()
        self.image_proj = nn.Conv2d(in_channels, joint_dim, kernel_size=1)
        self.cond_proj = nn.Linear(cond_dim, joint_dim)
        # Without the tanh below, this bias shifts every location's score alike and the softmax
        # ignores it (it gets no gradient); it stays so that both variants share their keys.
        self.score = nn.Conv2d(joint_dim, 1, kernel_size=1)
        # The authors' code squashes the scores with tanh before the softmax, which bounds the
        # ratio between two locations' weights by e^2: the attention can never collapse to one cell.
        self.score_tanh = score_tanh

    def scores(self, feature_map: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """[B, h*w] pre-softmax location scores."""
        joint = torch.tanh(self.image_proj(feature_map)) * torch.tanh(self.cond_proj(condition))[:, :, None, None]
        scores = self.score(joint).flatten(1)
        return torch.tanh(scores) if self.score_tanh else scores

    def forward(self, feature_map: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, height, width = feature_map.shape
        weights = self.scores(feature_map, condition).softmax(dim=1)  # [B, h*w]
        attended = torch.einsum("bn,bcn->bc", weights, feature_map.flatten(2))
        return attended, weights.view(batch, height, width)


class AttributeChannelAttention(nn.Module):
    """Which channels matter for this attribute: a sigmoid gate from [condition, attended feature].

    Feeding the spatially attended feature as well as the condition (ASEN's design) lets the gate
    depend on what was actually found in the attended region, not on the attribute alone.
    """

    def __init__(self, in_channels: int, cond_dim: int, reduction: int = 4):
        super().__init__()
        hidden = max(in_channels // reduction, 16)
        self.gate = nn.Sequential(
            nn.Linear(cond_dim + in_channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, in_channels),
            nn.Sigmoid(),
        )

    def forward(self, attended: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return attended * self.gate(torch.cat([condition, attended], dim=1))


class ConditionedAttentionPool(nn.Module):
    """Spatial then channel attention under one condition vector: feature map → [B, C] vector."""

    def __init__(self, in_channels: int, cond_dim: int, joint_dim: int = 512, reduction: int = 4,
                 spatial_tanh: bool = False):
        super().__init__()
        self.spatial = AttributeSpatialAttention(in_channels, cond_dim, joint_dim, spatial_tanh)
        self.channel = AttributeChannelAttention(in_channels, cond_dim, reduction)

    def forward(self, feature_map: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, attention_map = self.spatial(feature_map, condition)
        return self.channel(attended, condition), attention_map


class PerAttributeValueClassifier(nn.Module):
    """One linear value classifier per attribute, evaluated only for each sample's own attribute.

    Weights are stored padded as [A, max_values, D] so a batch with mixed attributes is one batched
    matmul; slots beyond an attribute's value count get ``PADDED_LOGIT`` and are False in the mask.
    """

    def __init__(self, in_dim: int, attribute_sizes: Sequence[int]):
        super().__init__()
        self.max_values = max(attribute_sizes)
        self.register_buffer("sizes", torch.tensor(list(attribute_sizes), dtype=torch.long), persistent=False)
        bound = 1.0 / in_dim**0.5  # nn.Linear's default init range
        self.weight = nn.Parameter(torch.empty(len(attribute_sizes), self.max_values, in_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(len(attribute_sizes), self.max_values))

    def forward(self, features: torch.Tensor, attribute: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One matmul against every attribute's weights, then pick the own attribute's block: cheaper
        # in memory than gathering a [B, max_values, D] weight tensor per sample when D is large.
        num_attributes = self.weight.shape[0]
        every = (features @ self.weight.flatten(0, 1).t()).view(-1, num_attributes, self.max_values) + self.bias
        logits = every[torch.arange(features.shape[0], device=features.device), attribute]
        mask = value_mask(self.sizes, attribute, self.max_values)
        return logits.masked_fill(~mask, PADDED_LOGIT), mask
