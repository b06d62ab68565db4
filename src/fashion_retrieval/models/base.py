"""What every model in ``MODELS`` is: :class:`RetrievalModel`.

The rest of the package talks to a model only through this interface: ``feat_dim`` (the
retrieval embedding's width), ``attribute_conditioned`` (one embedding space per attribute, as
ASEN and M3-Net learn) with ``attribute_names``, and :meth:`RetrievalModel.embed`, the one
forward that evaluation, index build, search, the server and the ONNX export all run
(:meth:`RetrievalModel.embed_attributes`: the same under several attributes at once). Training
calls ``forward`` for the training outputs (logits, features, ...) described in
docs/architecture.md.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn


def per_image(attribute: int | torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``attribute`` as a LongTensor[B] on the images' device (an int is broadcast to the batch)."""
    if isinstance(attribute, torch.Tensor):
        return attribute
    return torch.full((images.shape[0],), int(attribute), dtype=torch.long, device=images.device)


class RetrievalModel(nn.Module):
    """Subclasses set ``feat_dim`` in ``__init__`` and implement
    ``forward(images, attribute=None) -> {"embedding": [B, feat_dim], ...}``, images RGB in
    [0, 1]. Unconditioned models accept and ignore ``attribute`` (one embedding serves every
    attribute), so a caller never needs to know which kind it holds."""

    attribute_conditioned: ClassVar[bool] = False
    feat_dim: int

    def __init__(self) -> None:
        super().__init__()
        # the label space's attribute names, in the order of the attribute indices; set by whoever
        # knows them (training from its label space, loading from meta.json): the weights do not
        self.attribute_names: tuple[str, ...] = ()

    @property
    def features_dim(self) -> int:
        """Width of the training output ``"features"`` (what metric losses see); the embedding's
        unless a model feeds its metric losses a subset of its branches (MMFL-Net)."""
        return self.feat_dim

    def name_attributes(self, names: Sequence[str]) -> "RetrievalModel":
        self.attribute_names = tuple(str(name) for name in names)
        return self

    def embed(self, images: torch.Tensor, attribute: int | torch.Tensor | None = None) -> torch.Tensor:
        """The retrieval embedding [B, feat_dim], not normalised (retrieval compares cosines).

        ``attribute``: the attribute index, one for the batch (int) or per image (LongTensor[B]);
        required by attribute-conditioned models, ignored by the others. Call it in eval mode:
        in train mode BatchNorm and dropout make the embedding depend on the batch."""
        if not self.attribute_conditioned:
            return self(images)["embedding"]
        if attribute is None:
            names = f" (one of {', '.join(self.attribute_names)})" if self.attribute_names else ""
            raise ValueError(f"{type(self).__name__} is attribute-conditioned: pass attribute=<index>{names}")
        return self(images, attribute=per_image(attribute, images))["embedding"]

    def embed_attributes(self, images: torch.Tensor, attributes: Sequence[int]) -> list[torch.Tensor]:
        """:meth:`embed` of ``images`` for each attribute index in ``attributes``, in that order.

        Evaluating or indexing an attribute-conditioned model needs every image under every
        attribute; models whose backbone does not read the attribute (ASEN, M3-Net) override this
        to run the backbone once for all of them, which is most of the cost."""
        return [self.embed(images, attribute) for attribute in attributes]

    def backbones(self) -> list[nn.Module]:
        """The model's backbones (ASEN++ has two), for options that act on every one of them
        such as freezing the first stages."""
        return [module for module in self.modules() if hasattr(module, "stage_modules")]
