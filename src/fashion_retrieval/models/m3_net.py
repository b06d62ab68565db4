"""M3-Net: multi-granularity, attribute- and class-conditioned attention for attribute-specific
fashion retrieval. Design decisions are explained in docs/models.md (attribute-specific models).

For an image and an attribute ``a``:

1. The backbone gives feature maps at several granularities (default C4, stride 16: local detail
   such as a neckline's edge; C5, stride 32: shape and layout).
2. Attribute-conditioned attention (ASEN-style spatial + channel attention, conditioned on the
   embedding of ``a``) pools each level into a vector.
3. A per-attribute value classifier reads those vectors and predicts a distribution over ``a``'s
   values ("classes"), trained with weighted BCE (``attribute_bce``).
4. Class-conditioned attention pools each level again, now conditioned on
   ``attribute embedding + Σ_v p(v) · prototype[a, v]``: the predicted value distribution mixes
   learnt per-(attribute, value) class prototypes, so the second look can focus on what
   distinguishes *that* kind of collar. The mixture is soft and used identically in training and
   at query time (the true value is unknown when a user searches), so there is no train/test gap.
   p(v) = σ(z_v) / Σ_u σ(z_u) (``class_mixture_weights``): the classifier is trained with
   independent sigmoids (weighted BCE, the paper's Loss 1), so its sigmoids are what carry
   meaning; a softmax over the same logits would read them as a distribution they were never
   trained to be (reconstructed: only the paper's abstract and slides were available).
5. A linear layer maps the concatenated level vectors to the embedding.

``classify_every_attribute``: in training, also run the value classifier for every attribute of
every image (``all_attr_logits``, a list of [B, V_a], the attribute attention run once per
attribute over one backbone pass), for ``attribute_bce`` with ``every_attribute: true``. The
default (kept for older checkpoints) trains Loss 1 on the one attribute a batch is sampled for,
as the triplets are. Whether the paper's Loss 1 covers every attribute of an image is not in its
abstract or slides; on fashion-product every attribute scored about 5 val MAP@all points more at
every epoch of the converged schedule, so the recipes whose images are labelled for every
attribute set it (docs/models.md, results/analysis.md).

``attention`` picks the ablation: ``"attribute"`` (M3-Net_a: steps 1, 2, 5; the classifier is
still trained as an auxiliary task), ``"class"`` (M3-Net_c: the classifier reads plain
average-pooled levels, the class attention is conditioned on the class mixture alone, with no
attribute embedding, and only class-conditioned vectors reach the embedding) or ``"both"``
(full M3-Net).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ConfigError
from . import MODELS
from .attention import ConditionedAttentionPool, PerAttributeValueClassifier, check_attribute_sizes, require_attribute
from .backbones import BackboneSpec, build_backbone
from .base import RetrievalModel, per_image

ATTENTION_MODES = ("attribute", "class", "both")
LEVEL_INDEX = {"c2": 0, "c3": 1, "c4": 2, "c5": 3}


def class_mixture_weights(value_logits: torch.Tensor) -> torch.Tensor:
    """σ(z_v) / Σ_u σ(z_u) over each row, computed as a softmax of log σ(z) (stable even when every
    σ underflows). Padded slots (``PADDED_LOGIT``) get weight 0."""
    return F.logsigmoid(value_logits.float()).softmax(dim=1).to(value_logits.dtype)


@MODELS.register("m3_net")
class M3Net(RetrievalModel):
    attribute_conditioned = True

    def __init__(
        self,
        attribute_sizes: Sequence[int],
        num_items: int | None = None,  # unused: M3-Net learns from attribute values only
        backbone: BackboneSpec = "resnet18",
        embedding_dim: int = 1024,
        attention: str = "both",
        levels: Sequence[str] = ("c4", "c5"),
        attr_dim: int = 512,
        joint_dim: int = 512,
        channel_reduction: int = 4,
        classify_every_attribute: bool = False,
    ):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ConfigError(f"m3_net: unknown attention '{attention}'; use one of {', '.join(ATTENTION_MODES)}")
        unknown = [level for level in levels if level not in LEVEL_INDEX]
        if unknown or not levels:
            raise ConfigError(f"m3_net: levels must be a non-empty list of {', '.join(LEVEL_INDEX)}; got {list(levels)}")
        sizes = check_attribute_sizes(attribute_sizes, "m3_net")
        self.attribute_sizes = sizes
        self.attention_mode = attention
        self.classify_every_attribute = bool(classify_every_attribute)
        self.use_attribute_attention = attention in ("attribute", "both")
        self.use_class_attention = attention in ("class", "both")
        self.level_indices = [LEVEL_INDEX[level] for level in levels]

        self.backbone = build_backbone(backbone)
        channels = [self.backbone.channels[i] for i in self.level_indices]
        # M3-Net_c conditions on the class alone, so it has no attribute embedding.
        self.attribute_embedding = nn.Embedding(len(sizes), attr_dim) if self.use_attribute_attention else None

        def attention_per_level() -> nn.ModuleList:
            return nn.ModuleList(ConditionedAttentionPool(c, attr_dim, joint_dim, channel_reduction) for c in channels)

        self.attribute_attention = attention_per_level() if self.use_attribute_attention else None
        self.class_attention = attention_per_level() if self.use_class_attention else None
        if self.use_class_attention:
            # Scaled like the attribute embedding (N(0, 1)) so neither term dominates the condition at start.
            self.class_prototypes = nn.Parameter(torch.randn(len(sizes), max(sizes), attr_dim))
        self.value_classifier = PerAttributeValueClassifier(sum(channels), sizes)
        kinds = int(self.use_attribute_attention) + int(self.use_class_attention)
        self.fc = nn.Linear(sum(channels) * kinds, embedding_dim)
        self.feat_dim = embedding_dim

    def classifier_input(self, level_maps: list[torch.Tensor], attribute_condition: torch.Tensor | None
                         ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(each level pooled by the attribute-conditioned attention, empty without it, as for
        M3-Net_c; what the value classifier reads: those vectors, else the plain level means)."""
        if self.attribute_attention is None:
            return [], torch.cat([fmap.mean(dim=(2, 3)) for fmap in level_maps], dim=1)
        parts = [pool(fmap, attribute_condition)[0] for pool, fmap in zip(self.attribute_attention, level_maps)]
        return parts, torch.cat(parts, dim=1)

    def value_logits(self, images: torch.Tensor, attribute: torch.Tensor) -> torch.Tensor:
        """The value classifier's logits [B, max values] alone (padded slots very negative), in any
        mode: what ``scripts/m3_net_value_probe.py`` ranks with."""
        level_maps = self.level_maps(images)
        condition = self.attribute_embedding(attribute) if self.attribute_embedding is not None else None
        return self.value_classifier(self.classifier_input(level_maps, condition)[1], attribute)[0]

    def level_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's maps at the model's levels: the part of the forward that does not read
        the attribute."""
        feature_maps = self.backbone(images)
        return [feature_maps[i] for i in self.level_indices]

    def forward(self, images: torch.Tensor, attribute: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        attribute = require_attribute(attribute, images.shape[0], "m3_net").to(images.device)
        level_maps = self.level_maps(images)
        outputs = self.attend(level_maps, attribute)
        if self.training and self.classify_every_attribute:
            outputs["all_attr_logits"] = self.every_attribute_logits(level_maps)
        return outputs

    def every_attribute_logits(self, level_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """The value classifier's logits for every attribute of every image, [B, V_a] each."""
        images = level_maps[0]
        shared_input = None if self.attribute_embedding is not None else self.classifier_input(level_maps, None)[1]
        all_logits = []
        for attribute, size in enumerate(self.attribute_sizes):
            index = per_image(attribute, images)
            features = shared_input if shared_input is not None else \
                self.classifier_input(level_maps, self.attribute_embedding(index))[1]
            all_logits.append(self.value_classifier(features, index)[0][:, :size])
        return all_logits

    def embed_attributes(self, images: torch.Tensor, attributes: Sequence[int]) -> list[torch.Tensor]:
        level_maps = self.level_maps(images)
        return [self.attend(level_maps, per_image(attribute, images))["embedding"] for attribute in attributes]

    def attend(self, level_maps: list[torch.Tensor], attribute: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything after the backbone, for one attribute index per image."""
        attribute_condition = self.attribute_embedding(attribute) if self.attribute_embedding is not None else None

        parts, classifier_input = self.classifier_input(level_maps, attribute_condition)

        value_logits = value_mask = None
        if self.training or self.class_attention is not None:
            value_logits, value_mask = self.value_classifier(classifier_input, attribute)
        if self.class_attention is not None:
            value_probs = class_mixture_weights(value_logits)
            prototype = torch.einsum("bv,bvd->bd", value_probs, self.class_prototypes[attribute])
            class_condition = prototype if attribute_condition is None else attribute_condition + prototype
            parts += [pool(fmap, class_condition)[0] for pool, fmap in zip(self.class_attention, level_maps)]

        embedding = self.fc(torch.cat(parts, dim=1))
        outputs = {"embedding": embedding}
        if self.training:
            outputs["features"] = embedding
            outputs["attr_value_logits"] = value_logits
            outputs["attr_value_mask"] = value_mask
        return outputs
